//! The gRPC listener: accepted TCP connections, at most
//! `server.max_connections` open at once. A connection beyond that is
//! closed at once (the client sees it refused and can go elsewhere) instead
//! of being served with memory the server does not have.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures::Stream;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::transport::server::{Connected, TcpConnectInfo};

/// One accepted connection, holding its place among the open ones until
/// it is closed (dropped).
pub struct Connection {
    stream: TcpStream,
    _place: OwnedSemaphorePermit,
}

impl Connected for Connection {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        self.stream.connect_info()
    }
}

impl AsyncRead for Connection {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Connection {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

/// Binds `addr` and returns its local address and the stream of accepted
/// connections, at most `max` open at once.
pub async fn bind(
    addr: SocketAddr,
    max: usize,
) -> io::Result<(SocketAddr, impl Stream<Item = io::Result<Connection>> + Send + 'static)> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    let places = Arc::new(Semaphore::new(max));
    let accepted = futures::stream::unfold((listener, places), |(listener, places)| async move {
        loop {
            match listener.accept().await {
                Ok((stream, peer)) => {
                    let Ok(place) = places.clone().try_acquire_owned() else {
                        tracing::warn!(%peer, "refusing a connection over server.max_connections");
                        metrics::counter!("strata_connections_refused_total").increment(1);
                        drop(stream);
                        continue;
                    };
                    // Without it, a small answer can wait for a delayed ACK.
                    let _ = stream.set_nodelay(true);
                    return Some((Ok(Connection { stream, _place: place }), (listener, places)));
                }
                // A failed accept (out of file descriptors, say) is passed
                // on; the server logs it and goes on accepting.
                Err(error) => return Some((Err(error), (listener, places))),
            }
        }
    });
    Ok((local, accepted))
}
