//! A TCP proxy in front of a backing service, which a test or a chaos
//! command can cut and restore: it breaks the network path between a service
//! and its broker or database without touching the shared server, which other
//! tests and other people are using.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use tokio::{
    net::{TcpListener, TcpStream},
    sync::watch,
};

pub struct Proxy {
    pub addr: SocketAddr,
    up: Arc<AtomicBool>,
    cuts: watch::Sender<u64>,
    silences: watch::Sender<u64>,
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
        let task = tokio::spawn({
            let (up, cuts, silences, target) = (
                up.clone(),
                cuts.clone(),
                silences.clone(),
                target.to_owned(),
            );
            async move {
                while let Ok((mut client, _)) = listener.accept().await {
                    if !up.load(Ordering::SeqCst) {
                        continue; // dropped: the client sees the connection close
                    }
                    let mut cut = cuts.subscribe();
                    let mut silence = silences.subscribe();
                    let target = target.clone();
                    tokio::spawn(async move {
                        let Ok(mut server) = TcpStream::connect(&target).await else {
                            return;
                        };
                        let _ = client.set_nodelay(true);
                        let _ = server.set_nodelay(true);
                        tokio::select! {
                            _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                            _ = cut.changed() => {}
                            _ = silence.changed() => {
                                // Hold both sockets open, pass nothing.
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
            task,
        })
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

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
        self.cut();
    }
}
