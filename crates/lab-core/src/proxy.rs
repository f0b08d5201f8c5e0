//! A TCP proxy in front of a backing service, which a test or a chaos
//! command can cut and restore: it breaks the network path between a service
//! and its broker or database without touching the shared server, which other
//! tests and other people are using.
//!
//! Five faults, each a real network's: `cut` closes every connection (a
//! restarted server), `silence` stops every open connection's bytes for good
//! without a word (a dropped NAT entry), `hold` stops them until `release`
//! delivers them late (a congested or partitioned link that heals: a command
//! the client gave up on still arrives), `delay` adds latency to every byte
//! (a far-away or overloaded link: a timeout has something to do), and
//! `throttle` caps each direction's bandwidth (a thin link: a backlog
//! builds).
//!
//! Each direction of a connection is a reader and a writer joined by a
//! short queue of chunks stamped with the instant they were read. The
//! writer waits until a chunk's stamp plus the latency, so a delay does not
//! cap throughput (chunks in flight overlap, as packets on a long link do);
//! a full queue stops the reader, so the sender feels backpressure.

use std::{
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream, tcp::OwnedReadHalf, tcp::OwnedWriteHalf},
    sync::{mpsc, watch},
    time::Instant,
};

/// How the link behaves when it is up: latency and bandwidth.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Shape {
    /// Added to every byte, in each direction.
    latency: Duration,
    /// Bytes per second, per connection and direction; `None`: no cap.
    bytes_per_sec: Option<u64>,
}

/// One direction's end points and switches, handed to [`pump`].
struct Direction {
    from: OwnedReadHalf,
    to: OwnedWriteHalf,
    paused: watch::Receiver<bool>,
    shape: watch::Receiver<Shape>,
}

pub struct Proxy {
    pub addr: SocketAddr,
    up: Arc<AtomicBool>,
    cuts: watch::Sender<u64>,
    silences: watch::Sender<u64>,
    /// One pause switch per open connection, for `hold` and `release`.
    pauses: Arc<Mutex<Vec<watch::Sender<bool>>>>,
    shape: watch::Sender<Shape>,
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
        let (shape, _) = watch::channel(Shape::default());
        let task = tokio::spawn({
            let (up, cuts, silences, pauses, target) = (
                up.clone(),
                cuts.clone(),
                silences.clone(),
                pauses.clone(),
                target.to_owned(),
            );
            let shape = shape.clone();
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
                    let shape = shape.subscribe();
                    tokio::spawn(async move {
                        let Ok(server) = TcpStream::connect(&target).await else {
                            return;
                        };
                        let _ = client.set_nodelay(true);
                        let _ = server.set_nodelay(true);
                        let (client_read, client_write) = client.into_split();
                        let (server_read, server_write) = server.into_split();
                        let up = pump(Direction {
                            from: client_read,
                            to: server_write,
                            paused: paused.clone(),
                            shape: shape.clone(),
                        });
                        let down = pump(Direction {
                            from: server_read,
                            to: client_write,
                            paused,
                            shape,
                        });
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
            shape,
            task,
        })
    }

    /// Adds `latency` to every byte in each direction, of open and new
    /// connections alike (so a request and its answer take twice as long);
    /// `Duration::ZERO` takes it away. `restore` leaves it as it is.
    pub fn delay(&self, latency: Duration) {
        self.shape.send_modify(|shape| shape.latency = latency);
    }

    /// Caps each connection's bandwidth, in each direction, at
    /// `bytes_per_sec`; `None` lifts the cap. `restore` leaves it as it is.
    pub fn throttle(&self, bytes_per_sec: Option<u64>) {
        self.shape
            .send_modify(|shape| shape.bytes_per_sec = bytes_per_sec.map(|b| b.max(1)));
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
/// was read before a pause is written after it: held, never lost. Both
/// halves run inside this future, so a connection that is not polled (a
/// silence) moves nothing at all.
async fn pump(direction: Direction) {
    let Direction {
        mut from,
        mut to,
        mut paused,
        shape,
    } = direction;
    let (chunks, mut queued) = mpsc::channel::<(Instant, Vec<u8>)>(64);
    let read = async move {
        let mut buf = vec![0u8; 16 * 1024];
        while let Ok(n @ 1..) = from.read(&mut buf).await {
            if chunks
                .send((Instant::now(), buf[..n].to_vec()))
                .await
                .is_err()
            {
                break;
            }
        }
    };
    let write = async move {
        while let Some((read_at, chunk)) = queued.recv().await {
            let latency = shape.borrow().latency;
            tokio::time::sleep_until(read_at + latency).await;
            while *paused.borrow_and_update() {
                if paused.changed().await.is_err() {
                    return;
                }
            }
            if write_shaped(&mut to, &chunk, &shape).await.is_err() {
                return;
            }
        }
        let _ = to.shutdown().await;
    };
    tokio::join!(read, write);
}

/// Writes `chunk`, in slices paced to the bandwidth cap when there is one.
async fn write_shaped(
    to: &mut OwnedWriteHalf,
    chunk: &[u8],
    shape: &watch::Receiver<Shape>,
) -> std::io::Result<()> {
    let mut rest = chunk;
    while !rest.is_empty() {
        let Some(rate) = shape.borrow().bytes_per_sec else {
            return to.write_all(rest).await;
        };
        // Fifty slices a second, at least a kilobyte each.
        let slice = ((rate / 50).max(1024) as usize).min(rest.len());
        to.write_all(&rest[..slice]).await?;
        rest = &rest[slice..];
        tokio::time::sleep(Duration::from_secs_f64(slice as f64 / rate as f64)).await;
    }
    Ok(())
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

    /// A delayed link delivers every byte, late and in order, and goes
    /// back to normal when the delay is taken away.
    #[tokio::test]
    async fn a_delayed_connection_delivers_late_but_whole_and_in_order() {
        let (proxy, mut client) = echo_through_proxy().await;
        assert!(echo(&mut client, b"one").await.is_some());
        // 400 ms each way: the echo's 500 ms wait sees nothing.
        proxy.delay(Duration::from_millis(400));
        assert_eq!(echo(&mut client, b"two!").await, None, "delayed");
        let mut buf = [0u8; 4];
        tokio::time::timeout(Duration::from_secs(3), client.read_exact(&mut buf))
            .await
            .expect("delivered after the delay")
            .unwrap();
        assert_eq!(&buf, b"two!");
        proxy.delay(Duration::ZERO);
        assert_eq!(
            echo(&mut client, b"three").await.as_deref(),
            Some(&b"three"[..])
        );
    }

    /// A throttled link delivers everything, in order, at its pace: 32 KiB
    /// through 16 KiB/s each way is not back within half a second.
    #[tokio::test]
    async fn a_throttled_connection_delivers_everything_in_order() {
        let (proxy, client) = echo_through_proxy().await;
        proxy.throttle(Some(16 * 1024));
        let sent: Vec<u8> = (0..32 * 1024).map(|i| (i % 251) as u8).collect();
        let (mut read, mut write) = client.into_split();
        let writing = tokio::spawn({
            let sent = sent.clone();
            async move { write.write_all(&sent).await.map(|_| write) }
        });
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        let started = tokio::time::Instant::now();
        let mut early = None;
        tokio::time::timeout(Duration::from_secs(10), async {
            while got.len() < sent.len() {
                let n = read.read(&mut buf).await.unwrap();
                assert!(n > 0, "closed early");
                got.extend_from_slice(&buf[..n]);
                if early.is_none() && started.elapsed() >= Duration::from_millis(500) {
                    early = Some(got.len());
                }
            }
        })
        .await
        .expect("everything delivered within 10 s");
        writing.await.unwrap().unwrap();
        assert!(
            early.is_some_and(|n| n < sent.len()),
            "32 KiB came back within 0.5 s at 16 KiB/s"
        );
        assert_eq!(got, sent, "bytes lost or reordered");
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
