//! The listeners of the front ends: accepted TCP connections, at most
//! `server.max_connections` open at once on each, with TLS when it is set.
//! A connection beyond the limit is closed at once (the client sees it
//! refused and can go elsewhere) instead of being served with memory the
//! server does not have. TLS handshakes run concurrently, each within
//! [`HANDSHAKE_TIMEOUT`], so a client that stalls in one holds nothing but
//! its own place.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::Stream;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tonic::transport::server::Connected;

use crate::tls::Tls;

/// How long a client may take over its TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Who is at the other end of a connection.
#[derive(Clone, Debug)]
pub struct Peer {
    pub addr: SocketAddr,
    /// The name in the client certificate it presented (mutual TLS).
    pub certificate: Option<Arc<str>>,
}

enum Io {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

/// One accepted connection, holding its place among the open ones until
/// it is closed (dropped).
pub struct Connection {
    io: Io,
    peer: Peer,
    _place: OwnedSemaphorePermit,
}

impl Connection {
    pub fn peer(&self) -> &Peer {
        &self.peer
    }
}

impl Connected for Connection {
    type ConnectInfo = Peer;

    fn connect_info(&self) -> Peer {
        self.peer.clone()
    }
}

macro_rules! io {
    ($self:ident, $s:ident => $e:expr) => {
        match &mut $self.io {
            Io::Plain($s) => {
                let $s = Pin::new($s);
                $e
            }
            Io::Tls($s) => {
                let $s = Pin::new($s.as_mut());
                $e
            }
        }
    };
}

impl AsyncRead for Connection {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        io!(self, s => s.poll_read(cx, buf))
    }
}

impl AsyncWrite for Connection {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        io!(self, s => s.poll_write(cx, buf))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        io!(self, s => s.poll_flush(cx))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        io!(self, s => s.poll_shutdown(cx))
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        io!(self, s => s.poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        match &self.io {
            Io::Plain(s) => s.is_write_vectored(),
            Io::Tls(s) => s.is_write_vectored(),
        }
    }
}

/// The connections accepted on one address: a stream for tonic, an axum
/// [`axum::serve::Listener`] for the HTTP front ends. Dropping it closes
/// the socket.
pub struct Incoming {
    local: SocketAddr,
    accepted: mpsc::Receiver<Connection>,
}

impl Incoming {
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }
}

impl Stream for Incoming {
    type Item = io::Result<Connection>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.accepted.poll_recv(cx).map(|c| c.map(Ok))
    }
}

impl axum::serve::Listener for Incoming {
    type Io = Connection;
    type Addr = Peer;

    async fn accept(&mut self) -> (Connection, Peer) {
        match self.accepted.recv().await {
            Some(connection) => {
                let peer = connection.peer.clone();
                (connection, peer)
            }
            // The accept loop ends only once this is dropped.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> io::Result<Peer> {
        Ok(Peer { addr: self.local, certificate: None })
    }
}

impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, Incoming>> for Peer {
    fn connect_info(stream: axum::serve::IncomingStream<'_, Incoming>) -> Peer {
        stream.remote_addr().clone()
    }
}

/// Binds `addr` and accepts connections, at most `max` open at once, with
/// TLS if `tls` is set; the loop ends when the [`Incoming`] is dropped.
pub async fn bind(addr: SocketAddr, max: usize, tls: Option<Arc<Tls>>) -> io::Result<Incoming> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    let places = Arc::new(Semaphore::new(max));
    // Connections wait here for the server to take them; their places
    // bound how many.
    let (tx, accepted) = mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            let (stream, peer) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(error) => {
                        // Out of file descriptors, say: the server goes on
                        // accepting once some are back.
                        tracing::warn!(%error, "accepting a connection failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                () = tx.closed() => return,
            };
            let Ok(place) = places.clone().try_acquire_owned() else {
                tracing::warn!(%peer, "refusing a connection over server.max_connections");
                metrics::counter!("strata_connections_refused_total").increment(1);
                drop(stream);
                continue;
            };
            // Without it, a small answer can wait for a delayed ACK.
            let _ = stream.set_nodelay(true);
            let Some(tls) = &tls else {
                let connection =
                    Connection { io: Io::Plain(stream), peer: Peer { addr: peer, certificate: None }, _place: place };
                if tx.send(connection).await.is_err() {
                    return;
                }
                continue;
            };
            let (acceptor, tx) = (tls.acceptor(), tx.clone());
            tokio::spawn(async move {
                let stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                    Ok(Ok(stream)) => stream,
                    Ok(Err(error)) => {
                        tracing::debug!(%peer, %error, "TLS handshake failed");
                        metrics::counter!("strata_tls_handshake_failures_total", "reason" => "refused").increment(1);
                        return;
                    }
                    Err(_) => {
                        tracing::debug!(%peer, "TLS handshake timed out");
                        metrics::counter!("strata_tls_handshake_failures_total", "reason" => "timeout").increment(1);
                        return;
                    }
                };
                let certificate = stream
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|chain| chain.first())
                    .and_then(crate::tls::certificate_name)
                    .map(Arc::from);
                let connection =
                    Connection { io: Io::Tls(Box::new(stream)), peer: Peer { addr: peer, certificate }, _place: place };
                let _ = tx.send(connection).await;
            });
        }
    });
    Ok(Incoming { local, accepted })
}
