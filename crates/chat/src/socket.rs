//! Each connection's TCP socket, for the two things a WebSocket library
//! cannot do: keep the kernel's send buffer small, and make room in it for a
//! close frame.
//!
//! The failure this fixes: the [`hub`](crate::hub) cuts a client whose
//! queue is full with 1008, and the writer then sends the close frame. But
//! everything in front of it is full too. Linux grows a socket's send buffer
//! with the connection (up to `net.ipv4.tcp_wmem`'s 4 MiB), so a client
//! reading 50 frames a second while the room sends far more had megabytes
//! waiting on the server, a minute's reading; a client reading nothing never
//! drains any of it. The close frame sat in user space behind all that until
//! the grace period ran out and the socket was dropped: the client saw the
//! connection end without a close frame (1006), never the 1008 that says
//! why. (A test once passed only because its client shrank its own receive
//! buffer to 4 KiB.)
//!
//! So a WebSocket's send buffer is fixed at [`SEND_BUFFER`] (the kernel
//! doubles it for its bookkeeping): what a slow client can keep waiting on
//! the server is that and its queue, no more, and the server notices a
//! client that stopped reading sooner. When the connection is stopped with a
//! close code, the buffer is grown to [`CLOSING_SEND_BUFFER`] (which wakes
//! the writer) so that the rest of the frame being written and the close
//! frame reach the kernel at once. The kernel then delivers them, after the
//! data, whenever the client reads again, even once the server has let go of
//! the socket. A client that never reads again gets nothing, of course: the
//! server's `slow_disconnects` count is the proof it was cut.
//!
//! What it costs: one more file descriptor per connection (a duplicate,
//! taken at accept through axum's `ConnectInfo`, closed with the
//! connection); and a connection can have at most 128 KiB unacknowledged,
//! which caps one client's throughput at 128 KiB per round trip (2.6 MB/s at
//! 50 ms): plenty for chat, not for a file transfer.

use std::{os::fd::AsFd, sync::Arc};

use axum::{extract::connect_info::Connected, serve::IncomingStream};
use lab_core::http::Tuned;
use tokio::net::{TcpSocket, TcpStream};

/// The send buffer asked for each WebSocket (`SO_SNDBUF`).
pub const SEND_BUFFER: u32 = 64 * 1024;
/// The send buffer asked for once the connection is closing: room for the
/// rest of a frame (any but a welcome of fifty very long messages) and the
/// close frame behind it.
pub const CLOSING_SEND_BUFFER: u32 = 512 * 1024;

/// A handle on one connection's socket, for its options only (a tokio
/// `TcpSocket` over a duplicate of the descriptor; it never reads or
/// writes). Empty when the duplicate could not be made (out of descriptors):
/// the connection then works with the kernel's defaults.
#[derive(Clone, Default)]
pub struct Socket(Option<Arc<TcpSocket>>);

impl Socket {
    fn of(stream: &TcpStream) -> Self {
        let dup = stream.as_fd().try_clone_to_owned();
        Self(
            dup.ok()
                .map(|fd| Arc::new(TcpSocket::from_std_stream(std::net::TcpStream::from(fd)))),
        )
    }

    /// Fixes the send buffer at [`SEND_BUFFER`].
    pub fn bound_send_buffer(&self) {
        self.set_send_buffer(SEND_BUFFER);
    }

    /// Grows the send buffer so the close frame fits behind what is there.
    pub fn make_room_to_close(&self) {
        self.set_send_buffer(CLOSING_SEND_BUFFER);
    }

    fn set_send_buffer(&self, size: u32) {
        if let Some(socket) = &self.0
            && let Err(err) = socket.set_send_buffer_size(size)
        {
            tracing::debug!(%err, size, "cannot set SO_SNDBUF");
        }
    }

    /// The send buffer as the kernel counts it (twice what was asked).
    #[cfg(test)]
    fn send_buffer(&self) -> Option<u32> {
        self.0.as_ref()?.send_buffer_size().ok()
    }
}

/// Called by axum once per accepted connection (after
/// [`lab_core::http::serve_with_connect_info`] has set `TCP_NODELAY`).
impl Connected<IncomingStream<'_, Tuned>> for Socket {
    fn connect_info(stream: IncomingStream<'_, Tuned>) -> Self {
        Self::of(stream.io())
    }
}

#[cfg(test)]
mod tests {
    use tokio::net::TcpListener;

    use super::*;

    #[tokio::test]
    async fn the_send_buffer_is_fixed_small_then_grown_to_close() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let _client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        let socket = Socket::of(&server);
        socket.bound_send_buffer();
        // Linux doubles what it is asked for, for its own bookkeeping.
        assert_eq!(socket.send_buffer(), Some(2 * SEND_BUFFER));
        socket.make_room_to_close();
        // At most `net.core.wmem_max`, which may be less than asked.
        assert!(socket.send_buffer() > Some(2 * SEND_BUFFER));
        // The handle is a duplicate: the connection itself still works.
        assert!(server.try_write(b"x").is_ok());
    }
}
