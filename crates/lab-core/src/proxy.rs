//! A TCP proxy in front of a backing service, which a test or a chaos
//! command can cut and restore: it breaks the network path between a service
//! and its broker or database without touching the shared server, which other
//! tests and other people are using.
//!
//! Three faults, each a real network's: `cut` closes every connection (a
//! restarted server), `silence` stops every open connection's bytes for good
//! without a word (a dropped NAT entry), and `hold` stops them until
//! `release` delivers them late (a congested or partitioned link that heals:
//! a command the client gave up on still arrives).

use std::{
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream, tcp::OwnedReadHalf, tcp::OwnedWriteHalf},
    sync::watch,
};

pub struct Proxy {
    pub addr: SocketAddr,
    up: Arc<AtomicBool>,
    cuts: watch::Sender<u64>,
    silences: watch::Sender<u64>,
    /// One pause switch per open connection, for `hold` and `release`.
    pauses: Arc<Mutex<Vec<watch::Sender<bool>>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    /// Listens on 127.0.0.1:0 and forwards every connection to `target`.
    pub async fn start(target: &str) -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let up = Arc::new(AtomicBool::new(true));
        let (cuts, _) = watch::channel(0u64);
        let (silences, _) = watch::channel(0u64);
        let pauses: Arc<Mutex<Vec<watch::Sender<bool>>>> = Arc::default();
        let task = tokio::spawn({
            let (up, cuts, silences, pauses, target) = (
                up.clone(),
                cuts.clone(),
                silences.clone(),
                pauses.clone(),
                target.to_owned(),
            );
            async move {
                while let Ok((client, _)) = listener.accept().await {
                    if !up.load(Ordering::SeqCst) {
                        continue; // dropped: the client sees the connection close
                    }
                    let mut cut = cuts.subscribe();
                    let mut silence = silences.subscribe();
                    let (pause, paused) = watch::channel(false);
                    pauses.lock().expect("pauses lock").push(pause);
                    let target = target.clone();
                    tokio::spawn(async move {
                        let Ok(server) = TcpStream::connect(&target).await else {
                            return;
                        };
                        let _ = client.set_nodelay(true);
                        let _ = server.set_nodelay(true);
                        let (client_read, client_write) = client.into_split();
                        let (server_read, server_write) = server.into_split();
                        let up = pump(client_read, server_write, paused.clone());
                        let down = pump(server_read, client_write, paused);
                        // The pumps own the sockets: pinned here, they live
                        // (and keep the sockets open) until this task ends.
                        let pumps = async { tokio::join!(up, down) };
                        tokio::pin!(pumps);
                        tokio::select! {
                            _ = &mut pumps => {}
                            _ = cut.changed() => {}
                            _ = silence.changed() => {
                                // Both sockets stay open; nothing is polled,
                                // so nothing passes, until a cut.
                                let _ = cut.changed().await;
                            }
                        }
                    });
                }
            }
        });
        Ok(Self {
            addr,
            up,
            cuts,
            silences,
            pauses,
            task,
        })
    }

    /// Stops every open connection's bytes, in both directions, without
    /// closing it; `release` delivers what waited. New connections pass.
    pub fn hold(&self) {
        self.set_paused(true);
    }

    /// Lets held connections go on: what waited is delivered, late.
    pub fn release(&self) {
        self.set_paused(false);
    }

    fn set_paused(&self, paused: bool) {
        let mut pauses = self.pauses.lock().expect("pauses lock");
        // A connection that ended has dropped its receiver: forget it.
        pauses.retain(|pause| pause.send(paused).is_ok());
    }

    /// Closes every open connection and refuses new ones.
    pub fn cut(&self) {
        self.up.store(false, Ordering::SeqCst);
        self.cuts.send_modify(|n| *n += 1);
    }

    /// Silences every open connection without closing it, as a dropped NAT
    /// entry or a pulled cable would: bytes stop and neither side is told.
    /// New connections pass as usual.
    pub fn silence(&self) {
        self.silences.send_modify(|n| *n += 1);
    }

    /// Lets connections through again.
    pub fn restore(&self) {
        self.up.store(true, Ordering::SeqCst);
    }

    /// `redis://127.0.0.1:<port>` and friends: the target's URL via the proxy.
    pub fn url(&self, scheme: &str) -> String {
        format!("{scheme}://{}", self.addr)
    }
}

/// Copies one direction of a connection, waiting while it is paused. What
/// was read before a pause is written after it: held, never lost.
async fn pump(mut from: OwnedReadHalf, mut to: OwnedWriteHalf, mut paused: watch::Receiver<bool>) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        while *paused.borrow_and_update() {
            if paused.changed().await.is_err() {
                return;
            }
        }
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
        self.cut();
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        net::{TcpListener, TcpStream},
    };

    use super::Proxy;

    /// An echo server, and a client connected to it through a proxy.
    async fn echo_through_proxy() -> (Proxy, TcpStream) {
        let server = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let target = server.local_addr().unwrap().to_string();
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = server.accept().await {
                tokio::spawn(async move {
                    let mut buf = [0u8; 1024];
                    while let Ok(n @ 1..) = socket.read(&mut buf).await {
                        if socket.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
        let proxy = Proxy::start(&target).await.unwrap();
        let client = TcpStream::connect(proxy.addr).await.unwrap();
        (proxy, client)
    }

    async fn echo(client: &mut TcpStream, bytes: &[u8]) -> Option<Vec<u8>> {
        client.write_all(bytes).await.ok()?;
        let mut buf = vec![0u8; bytes.len()];
        match tokio::time::timeout(Duration::from_millis(500), client.read_exact(&mut buf)).await {
            Ok(Ok(_)) => Some(buf),
            _ => None,
        }
    }

    /// Silence is a link that died without a word: no bytes, and no close
    /// either (a read waits, it does not see end-of-file).
    #[tokio::test]
    async fn a_silenced_connection_passes_nothing_and_stays_open() {
        let (proxy, mut client) = echo_through_proxy().await;
        assert_eq!(
            echo(&mut client, b"ping").await.as_deref(),
            Some(&b"ping"[..])
        );
        proxy.silence();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(echo(&mut client, b"ping").await, None, "nothing passes");
        let mut buf = [0u8; 1];
        let read = tokio::time::timeout(Duration::from_millis(300), client.read(&mut buf)).await;
        assert!(
            read.is_err(),
            "the connection must stay open, not close: {read:?}"
        );
    }

    /// Held bytes are delivered late, not lost.
    #[tokio::test]
    async fn held_bytes_arrive_after_release() {
        let (proxy, mut client) = echo_through_proxy().await;
        assert!(echo(&mut client, b"one").await.is_some());
        proxy.hold();
        assert_eq!(echo(&mut client, b"two").await, None, "held");
        proxy.release();
        let mut buf = [0u8; 3];
        tokio::time::timeout(Duration::from_secs(2), client.read_exact(&mut buf))
            .await
            .expect("delivered after release")
            .unwrap();
        assert_eq!(&buf, b"two");
    }
}
