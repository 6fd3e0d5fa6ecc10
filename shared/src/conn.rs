//! Accepted TCP connections that close gently. When the server is done with a connection, our
//! side is shut down and whatever the client still sends (HTTP/2 window updates, pings) is read
//! and dropped until it closes too, or a second passes. Closing a socket with unread data makes
//! the kernel reset it, and the client can lose the end of a response it has not read yet —
//! exactly what happens to in-flight requests during a graceful shutdown otherwise.

use std::{
    io,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use tokio::{
    io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _, ReadBuf},
    net::TcpStream,
    sync::mpsc,
};
use tonic::transport::server::{Connected, TcpConnectInfo};

/// How long a closing connection waits for the client to close its side.
const LINGER: Duration = Duration::from_secs(1);

pub struct Conn {
    stream: Option<TcpStream>,
    info: TcpConnectInfo,
    /// Held until the connection has closed, so that the server can wait for all of them.
    closing: mpsc::Sender<()>,
}

impl Conn {
    pub fn new(stream: TcpStream, closing: mpsc::Sender<()>) -> Self {
        // Requests and answers are small messages: send them without delay.
        let _ = stream.set_nodelay(true);
        let info = stream.connect_info();
        Self {
            stream: Some(stream),
            info,
            closing,
        }
    }

    fn stream(&mut self) -> io::Result<Pin<&mut TcpStream>> {
        self.stream
            .as_mut()
            .map(Pin::new)
            .ok_or_else(|| io::ErrorKind::NotConnected.into())
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        let (Some(mut stream), Ok(runtime)) =
            (self.stream.take(), tokio::runtime::Handle::try_current())
        else {
            return;
        };
        let closing = self.closing.clone();
        runtime.spawn(async move {
            let _ = stream.shutdown().await;
            let mut sink = [0u8; 4096];
            let drained = async {
                while let Ok(n) = stream.read(&mut sink).await {
                    if n == 0 {
                        break;
                    }
                }
            };
            let _ = tokio::time::timeout(LINGER, drained).await;
            drop(closing);
        });
    }
}

impl Connected for Conn {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        self.info.clone()
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut().stream() {
            Ok(stream) => stream.poll_read(cx, buf),
            Err(err) => Poll::Ready(Err(err)),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut().stream() {
            Ok(stream) => stream.poll_write(cx, buf),
            Err(err) => Poll::Ready(Err(err)),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut().stream() {
            Ok(stream) => stream.poll_flush(cx),
            Err(err) => Poll::Ready(Err(err)),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut().stream() {
            Ok(stream) => stream.poll_shutdown(cx),
            Err(err) => Poll::Ready(Err(err)),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut().stream() {
            Ok(stream) => stream.poll_write_vectored(cx, bufs),
            Err(err) => Poll::Ready(Err(err)),
        }
    }

    fn is_write_vectored(&self) -> bool {
        true
    }
}
