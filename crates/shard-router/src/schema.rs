//! Creating and checking the per-view tables on one shard.

use std::sync::Arc;

use strata_core::FeatureView;

use crate::ShardError;
use crate::sql::{column_type, key_column_type, key_columns, table};

/// Serialises concurrent migrations of one shard (several servers starting
/// at once), so `CREATE ... IF NOT EXISTS` cannot race itself.
const MIGRATION_LOCK: i64 = 0x5354_5241_5441; // "STRATA"

pub(crate) async fn migrate(
    client: &deadpool_postgres::Client,
    shard: &str,
    views: &[Arc<FeatureView>],
) -> Result<(), ShardError> {
    let query_error = |source| ShardError::Query { shard: shard.to_owned(), source };
    // The client is borrowed from the pool; a transaction needs `&mut`, so
    // the lock is taken at session level and released explicitly.
    client.execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK]).await.map_err(query_error)?;
    let result = migrate_locked(client, shard, views).await;
    client.execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK]).await.map_err(query_error)?;
    result
}

async fn migrate_locked(
    client: &deadpool_postgres::Client,
    shard: &str,
    views: &[Arc<FeatureView>],
) -> Result<(), ShardError> {
    let query_error = |source| ShardError::Query { shard: shard.to_owned(), source };
    client.batch_execute("CREATE SCHEMA IF NOT EXISTS strata").await.map_err(query_error)?;
    client.batch_execute(crate::map::CREATE).await.map_err(query_error)?;
    for view in views {
        let mut ddl = format!(
            "CREATE TABLE IF NOT EXISTS {0} (entity_key text PRIMARY KEY, event_time timestamptz NOT NULL, \
             updated_at timestamptz NOT NULL DEFAULT now());\
             ALTER TABLE {0} ADD COLUMN IF NOT EXISTS deleted boolean NOT NULL DEFAULT false;",
            table(view)
        );
        let columns = key_columns(view)
            .iter()
            .map(|k| (&k.name, key_column_type(k.ty)))
            .chain(view.features.iter().map(|f| (&f.name, column_type(f.ty))));
        let columns: Vec<(&String, &str)> = columns.collect();
        for (name, ty) in &columns {
            ddl.push_str(&format!("ALTER TABLE {} ADD COLUMN IF NOT EXISTS \"{}\" {};", table(view), name, ty));
        }
        client.batch_execute(&ddl).await.map_err(query_error)?;

        // A column that already existed with another type would silently
        // break reads; say so at start-up instead.
        let rows = client
            .query(
                "SELECT a.attname, format_type(a.atttypid, a.atttypmod) FROM pg_attribute a \
                 WHERE a.attrelid = ($1::text)::regclass AND a.attnum > 0 AND NOT a.attisdropped",
                &[&table(view)],
            )
            .await
            .map_err(query_error)?;
        for (name, expected) in columns {
            let found = rows.iter().find(|r| r.get::<_, &str>(0) == name.as_str()).map(|r| r.get::<_, String>(1));
            if found.as_deref() != Some(expected) {
                return Err(ShardError::Schema {
                    shard: shard.to_owned(),
                    view: view.name.clone(),
                    column: name.clone(),
                    found: found.unwrap_or_else(|| "nothing".into()),
                    expected: expected.into(),
                });
            }
        }
    }
    Ok(())
}
