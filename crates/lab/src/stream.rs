//! A long-lived TCP stream server: one line every 100 ms to each client.
//!
//! The demo uses it to show that an established connection is cut as soon as
//! a policy change denies it (DESIGN.md: revocation is immediate), and that a
//! connection survives a VM's migration.

use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::time::Duration;

/// The interval between lines.
pub const INTERVAL: Duration = Duration::from_millis(100);

/// Write numbered lines to one client until it goes away.
pub fn feed(mut s: TcpStream, interval: Duration) {
    let peer = s.peer_addr().map(|p| p.to_string()).unwrap_or_default();
    let _ = s.set_nodelay(true);
    for n in 0u64.. {
        let line = format!("palisade-stream {n} to {peer}\n");
        if s.write_all(line.as_bytes()).is_err() {
            return;
        }
        std::thread::sleep(interval);
    }
}

/// Accept clients forever, one thread each.
pub fn serve(listener: &TcpListener, interval: Duration) -> std::io::Result<()> {
    loop {
        let (s, _) = listener.accept()?;
        std::thread::spawn(move || feed(s, interval));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader};

    #[test]
    fn lines_keep_coming() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        std::thread::spawn(move || serve(&l, Duration::from_millis(5)));
        let c = TcpStream::connect(addr).unwrap();
        let mut r = BufReader::new(c);
        for want in 0..3 {
            let mut line = String::new();
            r.read_line(&mut line).unwrap();
            assert!(line.starts_with(&format!("palisade-stream {want} ")), "{line}");
        }
    }
}
