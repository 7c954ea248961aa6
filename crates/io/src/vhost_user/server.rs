//! The device: its socket, its control thread, and the queue pairs it hands out.
//!
//! [`VhostUserNet::open`] binds the Unix socket QEMU connects to (the
//! backend is the server; QEMU, the client, reconnects by itself with
//! `reconnect=N` on its chardev), creates the queue pairs and starts one
//! control thread that accepts a connection, serves its requests
//! ([`super::device`]), and when QEMU goes away resets the device and
//! waits for the next connection. The workers own the [`QueuePair`]s and
//! never wait for the control thread.
//!
//! Dropping the [`VhostUserNet`] stops the thread, resets the device
//! (rings stop, guest memory is unmapped; the workers' pairs then report
//! nothing to receive and refuse sends as not running) and removes the
//! socket, if it is still the one this device bound. A new device on the
//! same path is what an agent restart looks like to QEMU: it reconnects and
//! the guest's link comes back.

use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use vhost::vhost_user::BackendReqHandler;
use vhost::vhost_user::VhostUserVirtioFeatures;
use vhost::vhost_user::{Error as VhostError, VhostUserBackendReqHandlerMut};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use super::device::Device;
use super::features::{GuestFeatures, Offloads, offered};
use super::pair::{PairShared, QueuePair};
use super::rings::Limits;
use super::stats::QueueStats;
use crate::error::IoError;
use crate::port::wait_readable;

/// Most queue pairs: vhost-user names a ring with 8 bits.
pub const MAX_QUEUE_PAIRS: u16 = 128;

const KIND: &str = "vhost-user";

/// How to create a vhost-user net device.
#[derive(Debug, Clone)]
pub struct VhostUserNetConfig {
    /// The Unix socket to listen on.
    pub socket: PathBuf,
    /// Queue pairs (1 to [`MAX_QUEUE_PAIRS`]): one per worker that serves the guest.
    pub queue_pairs: u16,
    /// Offloads offered to the guest.
    pub offloads: Offloads,
    /// Bounds on the work of one call.
    pub limits: Limits,
    /// Permission bits for the socket (e.g. `0o660` so libvirt's QEMU user can connect); the umask's when `None`.
    pub socket_mode: Option<u32>,
    /// The vNIC's MAC, the only one QEMU may have announced after a
    /// migration (`SEND_RARP`, see [`super::announce`]); `None` refuses every announcement.
    pub mac: Option<[u8; 6]>,
}

impl VhostUserNetConfig {
    /// One queue pair, every offload, default limits, at `socket`.
    pub fn new(socket: impl Into<PathBuf>) -> VhostUserNetConfig {
        VhostUserNetConfig {
            socket: socket.into(),
            queue_pairs: 1,
            offloads: Offloads::ALL,
            limits: Limits::default(),
            socket_mode: None,
            mac: None,
        }
    }
}

/// What the device knows about its frontend.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeviceStatus {
    /// A frontend (QEMU) is connected.
    pub connected: bool,
    /// Connections accepted so far.
    pub sessions: u64,
    /// The features the guest negotiated, once it has.
    pub features: Option<GuestFeatures>,
    /// The vhost-user protocol features the frontend acked.
    pub protocol_features: u64,
    /// Regions of the guest's memory table (0: none mapped).
    pub memory_regions: usize,
    /// Per queue pair, whether its (receive, transmit) rings run.
    pub running: Vec<(bool, bool)>,
    /// Requests refused (bad index, size, address…) while the session went on.
    pub requests_refused: u64,
    /// Rings QEMU stopped (`GET_VRING_BASE`): every ring at each guest reset,
    /// shutdown or migration, so a guest reboot shows as a step of twice the pairs.
    pub ring_stops: u64,
    /// Ring enables QEMU sent before the features were negotiated (at
    /// multiqueue start-up and on reconnect), handled outside the protocol layer.
    pub early_ring_enables: u64,
    /// Announcements QEMU asked for after a migration (`SEND_RARP`) and injected.
    pub announcements: u64,
    /// Announcements refused: not the vNIC's MAC, the feature not negotiated, too many waiting.
    pub announcements_refused: u64,
    /// The last refusal or session error, for the operator.
    pub last_error: Option<String>,
}

/// State the control thread and the device handle share.
#[derive(Debug)]
struct Control {
    stop: AtomicBool,
    stop_fd: EventFd,
    /// A clone of the current connection, to shut it down from `Drop`.
    conn: Mutex<Option<UnixStream>>,
    status: Mutex<DeviceStatus>,
    device: Arc<Mutex<Device>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A vhost-user virtio-net device (the backend QEMU's `-netdev vhost-user` connects to).
#[derive(Debug)]
pub struct VhostUserNet {
    socket: PathBuf,
    /// Device and inode of the socket this device bound (removed on drop only if still there).
    socket_id: (u64, u64),
    pairs: Vec<Arc<PairShared>>,
    control: Arc<Control>,
    thread: Option<JoinHandle<()>>,
}

impl VhostUserNet {
    /// Listen on `config.socket` and return the device and its queue pairs
    /// (hand one to each worker). A socket file left by a backend that is
    /// gone is replaced; a live one, or a path that is not a socket, is an error.
    pub fn open(config: &VhostUserNetConfig) -> Result<(VhostUserNet, Vec<QueuePair>), IoError> {
        let name = config.socket.display().to_string();
        let bad = |reason: String| IoError::Config {
            kind: KIND,
            name: name.clone(),
            reason,
        };
        let os = |step: &'static str, source: std::io::Error| IoError::Os {
            kind: KIND,
            name: name.clone(),
            step,
            source,
        };
        if config.queue_pairs == 0 || config.queue_pairs > MAX_QUEUE_PAIRS {
            return Err(bad(format!(
                "{} queue pairs (1 to {MAX_QUEUE_PAIRS})",
                config.queue_pairs
            )));
        }
        match std::fs::symlink_metadata(&config.socket) {
            Ok(m) if m.file_type().is_socket() => {
                if UnixStream::connect(&config.socket).is_ok() {
                    return Err(bad("a backend is already listening on this socket".into()));
                }
                std::fs::remove_file(&config.socket).map_err(|e| os("removing the stale socket", e))?;
            }
            Ok(_) => return Err(bad("the path exists and is not a socket".into())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(os("stat", e)),
        }
        let listener = UnixListener::bind(&config.socket).map_err(|e| os("bind", e))?;
        listener.set_nonblocking(true).map_err(|e| os("set_nonblocking", e))?;
        if let Some(mode) = config.socket_mode {
            std::fs::set_permissions(&config.socket, std::fs::Permissions::from_mode(mode))
                .map_err(|e| os("chmod", e))?;
        }
        let meta = std::fs::symlink_metadata(&config.socket).map_err(|e| os("stat", e))?;
        let socket_id = (meta.dev(), meta.ino());
        let pairs = (0..config.queue_pairs)
            .map(|_| PairShared::new(config.limits).map(Arc::new))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| os("creating eventfd/epoll", e))?;
        let device = Device::new(offered(config.offloads, config.queue_pairs), pairs.clone(), config.mac);
        let control = Arc::new(Control {
            stop: AtomicBool::new(false),
            stop_fd: EventFd::new(EFD_NONBLOCK).map_err(|e| os("eventfd", e))?,
            conn: Mutex::new(None),
            status: Mutex::new(DeviceStatus::default()),
            device: Arc::new(Mutex::new(device)),
        });
        let c = control.clone();
        let thread = std::thread::Builder::new()
            .name("vhost-user".into())
            .spawn(move || serve(&listener, &c))
            .map_err(|e| os("spawning the control thread", e))?;
        let handles = pairs
            .iter()
            .enumerate()
            .map(|(i, p)| QueuePair::new(p.clone(), i as u16))
            .collect();
        Ok((
            VhostUserNet {
                socket: config.socket.clone(),
                socket_id,
                pairs,
                control,
                thread: Some(thread),
            },
            handles,
        ))
    }

    /// The socket QEMU connects to.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The connection, the negotiated features, which rings run.
    pub fn status(&self) -> DeviceStatus {
        let mut status = lock(&self.control.status).clone();
        {
            let device = lock(&self.control.device);
            status.features = device.features();
            status.protocol_features = device.acked_protocol_features();
            status.memory_regions = device.memory_regions();
            status.ring_stops = device.ring_stops();
        }
        status.running = self
            .pairs
            .iter()
            .map(|p| {
                let slot = p.lock();
                (slot.rings.rx_running(), slot.rings.tx_running())
            })
            .collect();
        status
    }

    /// Change the MAC QEMU may announce (`SEND_RARP`): the inventory changed the vNIC's.
    pub fn set_mac(&self, mac: Option<[u8; 6]>) {
        lock(&self.control.device).set_mac(mac);
    }

    /// Counters of every queue pair.
    pub fn stats(&self) -> Vec<QueueStats> {
        self.pairs.iter().map(|p| *p.lock().rings.stats()).collect()
    }
}

impl Drop for VhostUserNet {
    fn drop(&mut self) {
        self.control.stop.store(true, Ordering::SeqCst);
        let _ = self.control.stop_fd.write(1);
        if let Some(conn) = lock(&self.control.conn).take() {
            // Unblocks a request the thread may be in the middle of reading.
            let _ = conn.shutdown(std::net::Shutdown::Both);
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        lock(&self.control.device).reset();
        if let Ok(m) = std::fs::symlink_metadata(&self.socket)
            && (m.dev(), m.ino()) == self.socket_id
        {
            let _ = std::fs::remove_file(&self.socket);
        }
    }
}

/// The control thread: accept a frontend, serve it until it leaves, reset, repeat.
fn serve(listener: &UnixListener, control: &Control) {
    let stop_fd = control.stop_fd.as_raw_fd();
    let stopped = || control.stop.load(Ordering::SeqCst);
    while !stopped() {
        match wait_readable(&[listener.as_raw_fd(), stop_fd], Duration::from_secs(1)) {
            Ok(ready) if ready.contains(&0) => {}
            Ok(_) => continue,
            Err(e) => {
                lock(&control.status).last_error = Some(format!("waiting for a connection: {e}"));
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        }
        if stopped() {
            break;
        }
        let stream = match listener.accept() {
            Ok((s, _)) => s,
            Err(e) => {
                if !matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock
                        | std::io::ErrorKind::Interrupted
                        | std::io::ErrorKind::ConnectionAborted
                ) {
                    lock(&control.status).last_error = Some(format!("accept: {e}"));
                    std::thread::sleep(Duration::from_millis(100));
                }
                continue;
            }
        };
        if stream.set_nonblocking(false).is_err() {
            continue;
        }
        session(stream, control);
        lock(&control.device).reset();
        *lock(&control.conn) = None;
        lock(&control.status).connected = false;
    }
}

/// vhost-user request codes this module looks at before the protocol layer does.
const SET_FEATURES: u32 = 2;
const SET_VRING_ENABLE: u32 = 18;
const SEND_RARP: u32 = 19;
/// Header flags: version 1, a reply, a reply wanted.
const FLAG_VERSION: u32 = 0x1;
const FLAG_REPLY: u32 = 0x4;
const FLAG_NEED_REPLY: u32 = 0x8;
/// Header (request, flags, size) and a `u64` or (index, num) body.
const HEADER_LEN: usize = 12;
const SMALL_MESSAGE_LEN: usize = HEADER_LEN + 8;

fn le32(b: &[u8]) -> u32 {
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

/// Serve one connection until the frontend leaves, a request fails, or the device stops.
fn session(stream: UnixStream, control: &Control) {
    let fd = stream.as_raw_fd();
    let Ok(mut raw) = stream.try_clone() else { return };
    *lock(&control.conn) = stream.try_clone().ok();
    {
        let mut status = lock(&control.status);
        status.connected = true;
        status.sessions += 1;
    }
    let mut handler = BackendReqHandler::from_stream(stream, control.device.clone());
    let stop_fd = control.stop_fd.as_raw_fd();
    // Whether the protocol layer has seen a SET_FEATURES with the protocol-features bit.
    let mut protocol_acked = false;
    loop {
        if control.stop.load(Ordering::SeqCst) {
            return;
        }
        match wait_readable(&[fd, stop_fd], Duration::from_secs(1)) {
            Ok(ready) if ready.contains(&0) => {}
            Ok(_) => continue,
            Err(_) => return,
        }
        if control.stop.load(Ordering::SeqCst) {
            return;
        }
        // QEMU enables and disables rings (SET_VRING_ENABLE) before it sends
        // SET_FEATURES: when it creates a multiqueue device, and on a
        // reconnect. The vhost crate checks the protocol-features bit against
        // features not negotiated yet and drops such a request without
        // calling the handler (or replying), which would leave a ring
        // disabled for good. Those few requests are taken off the socket and
        // handled here; everything else goes to the protocol layer.
        let mut head = [0u8; SMALL_MESSAGE_LEN];
        match crate::sys::peek_exact(raw.as_fd(), &mut head[..HEADER_LEN]) {
            Ok(HEADER_LEN) => {}
            _ => return,
        }
        let (request, flags, size) = (le32(&head[0..4]), le32(&head[4..8]), le32(&head[8..12]));
        // SEND_RARP is not handled by the protocol layer at all (it would end
        // the session): taken here too.
        if size == 8 && request == SEND_RARP {
            if send_rarp(&mut raw, control, flags).is_err() {
                return;
            }
            continue;
        }
        if size == 8 && (request == SET_FEATURES || (request == SET_VRING_ENABLE && !protocol_acked)) {
            if crate::sys::peek_exact(raw.as_fd(), &mut head).ok() != Some(SMALL_MESSAGE_LEN) {
                return;
            }
            if request == SET_FEATURES {
                let value = u64::from_le_bytes(head[12..20].try_into().unwrap_or_default());
                protocol_acked = value & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0;
            } else {
                if early_ring_enable(&mut raw, control, flags).is_err() {
                    return;
                }
                continue;
            }
        }
        if let Err(e) = handler.handle_request() {
            let refusal = lock(&control.device).take_refusal();
            let mut status = lock(&control.status);
            match refusal {
                Some(why) => {
                    status.requests_refused += 1;
                    status.last_error = Some(why);
                }
                None => {
                    if !matches!(e, VhostError::Disconnected) {
                        status.last_error = Some(format!("session ended: {e}"));
                    }
                    return;
                }
            }
        }
    }
}

/// Take a SET_VRING_ENABLE that came before SET_FEATURES off the socket,
/// apply it, and acknowledge it if the frontend asked.
fn early_ring_enable(stream: &mut UnixStream, control: &Control, flags: u32) -> std::io::Result<()> {
    let mut msg = [0u8; SMALL_MESSAGE_LEN];
    stream.read_exact(&mut msg)?;
    let (index, num) = (le32(&msg[12..16]), le32(&msg[16..20]));
    let (ok, reply_ack) = {
        let mut device = lock(&control.device);
        let ok = num <= 1 && device.set_vring_enable(index, num == 1).is_ok();
        if !ok {
            device.take_refusal();
        }
        (ok, device.reply_ack())
    };
    {
        let mut status = lock(&control.status);
        status.early_ring_enables += 1;
        if !ok {
            status.requests_refused += 1;
            status.last_error = Some(format!("ring {index}: enable {num} refused"));
        }
    }
    acknowledge(stream, SET_VRING_ENABLE, flags, reply_ack, ok)
}

/// Answer a request taken off the socket here with its `REPLY_ACK`
/// (0: done, 1: refused), if the frontend asked for one and negotiated them.
fn acknowledge(stream: &mut UnixStream, request: u32, flags: u32, reply_ack: bool, ok: bool) -> std::io::Result<()> {
    if flags & FLAG_NEED_REPLY != 0 && reply_ack {
        let mut reply = [0u8; SMALL_MESSAGE_LEN];
        reply[0..4].copy_from_slice(&request.to_le_bytes());
        reply[4..8].copy_from_slice(&(FLAG_VERSION | FLAG_REPLY).to_le_bytes());
        reply[8..12].copy_from_slice(&8u32.to_le_bytes());
        reply[12..20].copy_from_slice(&u64::from(!ok).to_le_bytes());
        stream.write_all(&reply)?;
    }
    Ok(())
}

/// Take a SEND_RARP off the socket: QEMU asks for the guest's announcement
/// after a migration (the MAC in the first six bytes of the `u64` body).
/// Injected if it is the vNIC's MAC, refused and counted otherwise; the
/// session goes on either way.
fn send_rarp(stream: &mut UnixStream, control: &Control, flags: u32) -> std::io::Result<()> {
    let mut msg = [0u8; SMALL_MESSAGE_LEN];
    stream.read_exact(&mut msg)?;
    let mut mac = [0u8; 6];
    mac.copy_from_slice(&msg[12..18]);
    let (result, reply_ack) = {
        let mut device = lock(&control.device);
        (device.send_rarp(mac), device.reply_ack())
    };
    {
        let mut status = lock(&control.status);
        match &result {
            Ok(()) => status.announcements += 1,
            Err(why) => {
                status.announcements_refused += 1;
                status.requests_refused += 1;
                status.last_error = Some(why.clone());
            }
        }
    }
    acknowledge(stream, SEND_RARP, flags, reply_ack, result.is_ok())
}
