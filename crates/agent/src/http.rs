//! The agent's small HTTP endpoint: Prometheus metrics, recent flows, health.
//!
//! Served on an optional TCP address (for Prometheus) and always on a Unix
//! socket in the state directory (for local tools such as `palisade demo`,
//! which can reach it from outside the host's network namespace). The
//! datapath publishes a [`Published`] snapshot a few times a second; requests
//! only read that snapshot, so a slow or hostile client never touches the
//! packet path. Requests are bounded (size and time) and anything but
//! `GET /metrics`, `GET /flows` and `GET /health` is answered 404 or 405.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// What the endpoint serves, replaced whole by the datapath.
#[derive(Debug, Clone, Default)]
pub struct Published {
    /// Prometheus text exposition.
    pub metrics: String,
    /// JSON array of recent flow records.
    pub flows: String,
    /// JSON health document.
    pub health: String,
}

/// A shared, swappable snapshot.
pub type Shared = Arc<Mutex<Arc<Published>>>;

const MAX_REQUEST: usize = 8192;

/// Start serving `shared` on `tcp` (if any) and on the Unix socket `unix`
/// (replacing a stale socket file). Threads stop when `stop` is set.
pub fn serve(
    shared: Shared,
    tcp: Option<SocketAddr>,
    unix: &Path,
    stop: Arc<AtomicBool>,
) -> std::io::Result<Vec<std::thread::JoinHandle<()>>> {
    let mut handles = Vec::new();
    if let Some(addr) = tcp {
        let listener = TcpListener::bind(addr)?;
        listener.set_nonblocking(true)?;
        let (shared, stop) = (shared.clone(), stop.clone());
        handles.push(
            std::thread::Builder::new()
                .name("palisade-http".into())
                .spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        match listener.accept() {
                            Ok((s, _)) => {
                                let _ = s.set_nonblocking(false);
                                let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
                                let _ = s.set_write_timeout(Some(Duration::from_secs(2)));
                                handle(s, &shared);
                            }
                            Err(_) => std::thread::sleep(Duration::from_millis(50)),
                        }
                    }
                })?,
        );
    }
    if unix.exists() {
        std::fs::remove_file(unix)?;
    }
    let listener = UnixListener::bind(unix)?;
    listener.set_nonblocking(true)?;
    handles.push(
        std::thread::Builder::new()
            .name("palisade-unix".into())
            .spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((s, _)) => {
                            let _ = s.set_nonblocking(false);
                            let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
                            let _ = s.set_write_timeout(Some(Duration::from_secs(2)));
                            handle(s, &shared);
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(50)),
                    }
                }
            })?,
    );
    Ok(handles)
}

fn handle<S: Read + Write>(stream: S, shared: &Shared) {
    let mut reader = BufReader::new(stream.take(MAX_REQUEST as u64));
    let mut line = String::new();
    if reader.read_line(&mut line).is_err() {
        return;
    }
    // Drain the headers (bounded by `take`) so the client sees a clean close.
    let mut h = String::new();
    while reader.read_line(&mut h).is_ok_and(|n| n > 2) {
        h.clear();
    }
    let snapshot = shared.lock().map(|g| g.clone()).unwrap_or_default();
    let (status, ctype, body) = route(&line, &snapshot);
    let mut stream = reader.into_inner().into_inner();
    let _ = write!(
        stream,
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
}

/// The response to a request line: status, content type, body.
pub fn route<'a>(request_line: &str, p: &'a Published) -> (&'static str, &'static str, &'a str) {
    let mut parts = request_line.split_whitespace();
    let (Some(method), Some(target)) = (parts.next(), parts.next()) else {
        return ("400 Bad Request", "text/plain", "malformed request line\n");
    };
    let path = target.split('?').next().unwrap_or(target);
    match (method, path) {
        ("GET", "/metrics") => ("200 OK", "text/plain; version=0.0.4", &p.metrics),
        ("GET", "/flows") => ("200 OK", "application/json", &p.flows),
        ("GET", "/health") => ("200 OK", "application/json", &p.health),
        (_, "/metrics" | "/flows" | "/health") => ("405 Method Not Allowed", "text/plain", "only GET\n"),
        _ => (
            "404 Not Found",
            "text/plain",
            "not found: try /metrics, /flows or /health\n",
        ),
    }
}

/// Fetch `path` from an agent's Unix socket (used by local tools and tests).
pub fn get_unix(socket: &Path, path: &str) -> std::io::Result<String> {
    let mut s = std::os::unix::net::UnixStream::connect(socket)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: agent\r\n\r\n")?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    match out.split_once("\r\n\r\n") {
        Some((head, body)) if head.starts_with("HTTP/1.1 200") => Ok(body.to_string()),
        Some((head, _)) => Err(std::io::Error::other(head.lines().next().unwrap_or("").to_string())),
        None => Err(std::io::Error::other("truncated response")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        let p = Published {
            metrics: "m".into(),
            flows: "[]".into(),
            health: "{}".into(),
        };
        let cases = [
            ("GET /metrics HTTP/1.1\r\n", "200 OK", "m"),
            ("GET /flows?x=1 HTTP/1.1\r\n", "200 OK", "[]"),
            ("GET /health HTTP/1.0\r\n", "200 OK", "{}"),
            ("POST /metrics HTTP/1.1\r\n", "405 Method Not Allowed", "only GET\n"),
            ("GET /../../etc/passwd HTTP/1.1\r\n", "404 Not Found", ""),
            ("\r\n", "400 Bad Request", ""),
            ("GARBAGE", "400 Bad Request", ""),
        ];
        for (line, status, body) in cases {
            let (s, _, b) = route(line, &p);
            assert_eq!(s, status, "{line:?}");
            if !body.is_empty() {
                assert_eq!(b, body);
            }
        }
    }

    #[test]
    fn serves_over_a_unix_socket_and_survives_junk() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("agent.sock");
        let shared: Shared = Arc::new(Mutex::new(Arc::new(Published {
            metrics: "palisade_up 1\n".into(),
            ..Default::default()
        })));
        let stop = Arc::new(AtomicBool::new(false));
        let handles = serve(shared.clone(), None, &sock, stop.clone()).unwrap();
        // A client that sends an endless header line is cut off at the size bound.
        let mut junk = std::os::unix::net::UnixStream::connect(&sock).unwrap();
        let _ = junk.write_all(&vec![b'A'; 3 * MAX_REQUEST]);
        drop(junk);
        assert_eq!(get_unix(&sock, "/metrics").unwrap(), "palisade_up 1\n");
        *shared.lock().unwrap() = Arc::new(Published {
            metrics: "palisade_up 2\n".into(),
            ..Default::default()
        });
        assert_eq!(get_unix(&sock, "/metrics").unwrap(), "palisade_up 2\n");
        assert!(get_unix(&sock, "/nope").is_err());
        stop.store(true, Ordering::Relaxed);
        for h in handles {
            h.join().unwrap();
        }
    }
}
