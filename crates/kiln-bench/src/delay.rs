//! A TCP relay that delays every byte by a fixed time in each direction, for measuring a
//! client whose server is across a network (`kiln-bench scale --pg-delay-us`: PostgreSQL on
//! another host) on one machine. Kernel traffic shaping (`tc netem`) is not available on every
//! machine that runs the benchmarks (not on this one); this needs nothing but a port.
//!
//! Each direction of a relayed connection is a reader thread, which stamps each read with the
//! time it may be written (now + the delay) and queues it in order, and a writer thread, which
//! sleeps until that time and writes. Threads, not tasks: a thread's sleep ends within tens of
//! microseconds of its deadline, a tokio timer's only at the next millisecond tick. So the
//! delay adds to each message's trip, and messages that follow each other closely (a
//! pipeline) are not delayed one after another: a network's latency, without its bandwidth
//! limit.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// A running relay: its listening address. Dropping it stops it taking connections; the
/// connections it relays end with their client's.
pub struct Relay {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
}

impl Relay {
    /// Listens on a free loopback port and relays each connection to `target`, delaying each
    /// direction by `delay`.
    pub fn start(target: SocketAddr, delay: Duration) -> std::io::Result<Relay> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        std::thread::Builder::new()
            .name("delay-relay".into())
            .spawn(move || {
                for client in listener.incoming() {
                    if stopped.load(Ordering::Relaxed) {
                        return;
                    }
                    let Ok(client) = client else { continue };
                    let Ok(server) = TcpStream::connect(target) else {
                        continue;
                    };
                    let _ = client.set_nodelay(true);
                    let _ = server.set_nodelay(true);
                    let (Ok(c2), Ok(s2)) = (client.try_clone(), server.try_clone()) else {
                        continue;
                    };
                    pump(client, s2, delay);
                    pump(server, c2, delay);
                }
            })?;
        Ok(Relay { addr, stop })
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Wakes the accepting thread so it sees the flag.
        let _ = TcpStream::connect(self.addr);
    }
}

/// Copies `from` to `to` on two threads, each read written `delay` after it was read, in
/// order; ends when either side closes or fails (then shuts both down).
fn pump(mut from: TcpStream, mut to: TcpStream, delay: Duration) {
    let (tx, rx) = mpsc::channel::<(Instant, Vec<u8>)>();
    let reader = move || {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if tx
                        .send((Instant::now() + delay, buf[..n].to_vec()))
                        .is_err()
                    {
                        break;
                    }
                }
            }
        }
        // The other direction's writer writes to this socket: it fails now and ends.
        let _ = from.shutdown(Shutdown::Both);
        // `tx` dropped: this direction's writer ends once it wrote what was read.
    };
    let writer = move || {
        while let Ok((at, bytes)) = rx.recv() {
            let left = at.saturating_duration_since(Instant::now());
            if !left.is_zero() {
                std::thread::sleep(left);
            }
            if to.write_all(&bytes).is_err() {
                break;
            }
        }
        let _ = to.shutdown(Shutdown::Both);
    };
    let _ = std::thread::Builder::new()
        .name("delay-read".into())
        .spawn(reader);
    let _ = std::thread::Builder::new()
        .name("delay-write".into())
        .spawn(writer);
}
