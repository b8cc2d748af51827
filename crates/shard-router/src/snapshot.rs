//! Logical snapshots of the shards, for `strata backup` and `strata
//! restore`: each view's table copied out whole (every column, tombstones
//! included) as binary COPY, and merged back with the event-time rule, so a
//! restore that was cut short can simply be run again, and one into a shard
//! that has newer rows keeps them.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::{SinkExt as _, StreamExt as _};
use strata_core::FeatureView;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio_postgres::IsolationLevel;

use crate::sql::table;
use crate::{ShardError, ShardRouter};

/// Bytes read from a snapshot file per COPY message.
const CHUNK: usize = 256 * 1024;

/// A column of a view's table: its name and its type as PostgreSQL's
/// `format_type` names it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Column {
    pub name: String,
    pub ty: String,
}

/// What one view's copy holds.
#[derive(Clone, Debug)]
pub struct Exported {
    pub view: String,
    /// The columns, in the order the copy carries them.
    pub columns: Vec<Column>,
    pub rows: u64,
    pub tombstones: u64,
    pub bytes: u64,
}

/// What one view's restore did.
#[derive(Clone, Copy, Debug)]
pub struct Imported {
    /// Rows in the copy.
    pub copied: u64,
    /// Rows that replaced nothing or an older row; the rest were not newer
    /// than what the shard held.
    pub applied: u64,
}

impl ShardRouter {
    /// Copies every view's table on shard `shard` out to the writer `open`
    /// makes for it, all from one snapshot of the shard (a read-only
    /// repeatable-read transaction), so the views agree with each other. A
    /// view with no table yet gives an empty copy. `idle` bounds the wait
    /// for each piece of the copy: a shard that hangs fails the export.
    pub async fn export<W: AsyncWrite + Unpin>(
        &self,
        shard: usize,
        views: &[Arc<FeatureView>],
        idle: Duration,
        mut open: impl FnMut(&FeatureView) -> std::io::Result<W>,
    ) -> Result<Vec<Exported>, ShardError> {
        let shard = &self.shards[shard];
        let failed = |view: &FeatureView, message: String| ShardError::Snapshot {
            shard: shard.name.clone(),
            view: view.name.clone(),
            message,
        };
        let mut client = within(idle, shard, shard.client()).await?;
        let tx = client
            .build_transaction()
            .isolation_level(IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()
            .await
            .map_err(|e| shard.query_error(e))?;
        let mut out = Vec::with_capacity(views.len());
        for view in views {
            let mut writer = open(view).map_err(|e| failed(view, e.to_string()))?;
            let columns = columns(&tx, view).await.map_err(|e| shard.query_error(e))?;
            let mut exported =
                Exported { view: view.name.clone(), columns: columns.clone(), rows: 0, tombstones: 0, bytes: 0 };
            if !columns.is_empty() {
                let sql = format!(
                    "SELECT count(*) FILTER (WHERE NOT deleted), count(*) FILTER (WHERE deleted) FROM {}",
                    table(view)
                );
                let counts =
                    within(idle, shard, async { tx.query_one(&sql, &[]).await.map_err(|e| shard.query_error(e)) })
                        .await?;
                exported.rows = counts.get::<_, i64>(0).unsigned_abs();
                exported.tombstones = counts.get::<_, i64>(1).unsigned_abs();
                let sql = format!("COPY {} ({}) TO STDOUT BINARY", table(view), column_list(&columns));
                let stream = tx.copy_out(&sql).await.map_err(|e| shard.query_error(e))?;
                futures::pin_mut!(stream);
                loop {
                    let next = tokio::time::timeout(idle, stream.next())
                        .await
                        .map_err(|_| ShardError::Timeout { shard: shard.name.clone() })?;
                    let Some(chunk) = next else { break };
                    let chunk = chunk.map_err(|e| shard.query_error(e))?;
                    writer.write_all(&chunk).await.map_err(|e| failed(view, e.to_string()))?;
                    exported.bytes += chunk.len() as u64;
                }
            }
            writer.flush().await.map_err(|e| failed(view, e.to_string()))?;
            out.push(exported);
        }
        tx.commit().await.map_err(|e| shard.query_error(e))?;
        Ok(out)
    }

    /// Merges a copy that [`ShardRouter::export`] made of `view` into shard
    /// `shard`, in one transaction: a row replaces the stored one only if
    /// its event time is newer, so running it again changes nothing. The
    /// view's table must exist ([`ShardRouter::migrate`]) and have every
    /// column of the copy with the same type; columns the copy lacks get
    /// their defaults. `idle` bounds each wait on the shard.
    pub async fn import<R: AsyncRead + Unpin>(
        &self,
        shard: usize,
        view: &FeatureView,
        copied: &[Column],
        mut reader: R,
        idle: Duration,
    ) -> Result<Imported, ShardError> {
        let shard = &self.shards[shard];
        let failed =
            |message: String| ShardError::Snapshot { shard: shard.name.clone(), view: view.name.clone(), message };
        let mut client = within(idle, shard, shard.client()).await?;
        let present = columns(&client, view).await.map_err(|e| shard.query_error(e))?;
        if present.is_empty() {
            return Err(failed("the view has no table here (run strata migrate)".into()));
        }
        for column in copied {
            match present.iter().find(|c| c.name == column.name) {
                None => return Err(failed(format!("column {} of the backup does not exist here", column.name))),
                Some(found) if found.ty != column.ty => {
                    return Err(failed(format!(
                        "column {} is {} in the backup and {} here",
                        column.name, column.ty, found.ty
                    )));
                }
                Some(_) => {}
            }
        }
        if !copied.iter().any(|c| c.name == "entity_key") || !copied.iter().any(|c| c.name == "event_time") {
            return Err(failed("the backup has no entity_key or event_time column".into()));
        }

        let tx = client.transaction().await.map_err(|e| shard.query_error(e))?;
        let staging = "strata_restore";
        tx.batch_execute(&format!(
            "CREATE TEMP TABLE {staging} (LIKE {} INCLUDING DEFAULTS) ON COMMIT DROP",
            table(view)
        ))
        .await
        .map_err(|e| shard.query_error(e))?;
        let list = column_list(copied);
        let sink = tx
            .copy_in::<_, Bytes>(&format!("COPY {staging} ({list}) FROM STDIN BINARY"))
            .await
            .map_err(|e| shard.query_error(e))?;
        futures::pin_mut!(sink);
        let mut buf = vec![0; CHUNK];
        loop {
            let n = reader.read(&mut buf).await.map_err(|e| failed(e.to_string()))?;
            if n == 0 {
                break;
            }
            tokio::time::timeout(idle, sink.send(Bytes::copy_from_slice(&buf[..n])))
                .await
                .map_err(|_| ShardError::Timeout { shard: shard.name.clone() })?
                .map_err(|e| shard.query_error(e))?;
        }
        let copied_rows = tokio::time::timeout(idle, sink.as_mut().finish())
            .await
            .map_err(|_| ShardError::Timeout { shard: shard.name.clone() })?
            .map_err(|e| shard.query_error(e))?;
        let set: Vec<String> = copied
            .iter()
            .filter(|c| c.name != "entity_key")
            .map(|c| format!("\"{0}\" = EXCLUDED.\"{0}\"", c.name))
            .collect();
        // Row locks in key byte order, as every write takes them.
        let merge = format!(
            "INSERT INTO {table} AS t ({list}) SELECT {list} FROM {staging} ORDER BY entity_key COLLATE \"C\" \
             ON CONFLICT (entity_key) DO UPDATE SET {set} WHERE t.event_time < EXCLUDED.event_time",
            table = table(view),
            set = set.join(", "),
        );
        let applied = tx.execute(&merge, &[]).await.map_err(|e| shard.query_error(e))?;
        tx.commit().await.map_err(|e| shard.query_error(e))?;
        Ok(Imported { copied: copied_rows, applied })
    }
}

/// A view's table's columns in table order; none if it has no table.
async fn columns(
    client: &impl deadpool_postgres::GenericClient,
    view: &FeatureView,
) -> Result<Vec<Column>, tokio_postgres::Error> {
    let rows = client
        .query(
            "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod) FROM pg_attribute a \
             WHERE a.attrelid = to_regclass($1::text) AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum",
            &[&table(view)],
        )
        .await?;
    Ok(rows.iter().map(|r| Column { name: r.get(0), ty: r.get(1) }).collect())
}

fn column_list(columns: &[Column]) -> String {
    columns.iter().map(|c| format!("\"{}\"", c.name)).collect::<Vec<_>>().join(", ")
}

async fn within<T>(
    idle: Duration,
    shard: &crate::Shard,
    op: impl Future<Output = Result<T, ShardError>>,
) -> Result<T, ShardError> {
    tokio::time::timeout(idle, op).await.map_err(|_| ShardError::Timeout { shard: shard.name.clone() })?
}
