//! The vhost-user protocol, device side: what each request from QEMU does.
//!
//! `vhost::vhost_user::BackendReqHandler` reads and checks the messages
//! (sizes, attached file descriptors, which requests the negotiated
//! protocol features allow, `REPLY_ACK`) and calls [`Device`] through the
//! `VhostUserBackendReqHandlerMut` trait. [`Device`] keeps the session's
//! negotiated state and the mapped guest memory, and configures the queue
//! pairs' rings through their shared state ([`super::pair`]), locking one
//! pair at a time (never two, so a worker holding one pair's lock while it
//! sends to another cannot deadlock with it).
//!
//! Ring life cycle (vhost-user specification, "Ring states"): a ring is
//! *started* by `SET_VRING_KICK` and *stopped* by `GET_VRING_BASE`, and
//! frames move only while it is also *enabled* (`SET_VRING_ENABLE`, or from
//! the start when `VHOST_USER_F_PROTOCOL_FEATURES` is not negotiated). A
//! guest reboot arrives as `GET_VRING_BASE` on every ring, then a new
//! negotiation, memory table and ring setup; QEMU reconnecting after the
//! backend restarted arrives as a fresh session with ring bases restored
//! from the used rings in guest memory. A request this device refuses
//! (bad index, size or address) is answered with a failure (`REPLY_ACK`)
//! and remembered in [`Device::take_refusal`], so the control thread keeps
//! the session; a failed `GET_*` request ends it.
//!
//! Live migration: `SET_LOG_BASE` maps QEMU's dirty-page log into the
//! device's [`DirtyLog`] (its size and offset checked against the file), and
//! logging is on while the acked features hold `VHOST_F_LOG_ALL`; toggling
//! that bit alone does not restart the rings (QEMU flips it on running rings
//! when a migration starts and ends).

use std::fs::File;
use std::io;
use std::os::fd::AsFd;
use std::sync::Arc;

use vhost::VhostUserMemoryRegionBase;
use vhost::vhost_user::message::{
    VhostTransferStateDirection, VhostTransferStatePhase, VhostUserConfigFlags, VhostUserInflight, VhostUserLog,
    VhostUserMemoryRegion, VhostUserProtocolFeatures, VhostUserShMemConfig, VhostUserSharedMsg,
    VhostUserSingleMemoryRegion, VhostUserVirtioFeatures, VhostUserVringAddrFlags, VhostUserVringState,
};
use vhost::vhost_user::{Error as VhostError, GpuBackend, Result as VhostResult, VhostUserBackendReqHandlerMut};

use super::features::GuestFeatures;
use super::log::{DirtyLog, VHOST_F_LOG_ALL};
use super::memory::MemoryTable;
use super::pair::{PairShared, PairSlot, RingControl};
use super::virtqueue::MAX_QUEUE_SIZE;

/// The protocol features offered. `REPLY_ACK` is added by the vhost crate.
pub(crate) fn protocol_features() -> VhostUserProtocolFeatures {
    VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::RESET_DEVICE
        | VhostUserProtocolFeatures::LOG_SHMFD
        | VhostUserProtocolFeatures::RARP
}

/// The device's side of one vhost-user session (and of the ones after it).
#[derive(Debug)]
pub(crate) struct Device {
    offered: u64,
    pairs: Vec<Arc<PairShared>>,
    owned: bool,
    acked: Option<u64>,
    acked_protocol: u64,
    memory: Option<MemoryTable>,
    /// The dirty-page log every region's writes go to (live migration).
    log: Arc<DirtyLog>,
    refusal: Option<String>,
    /// The vNIC's MAC: the only one `SEND_RARP` may announce (none: every announcement refused).
    mac: Option<[u8; 6]>,
    /// Rings stopped by `GET_VRING_BASE` (a guest reset or shutdown stops every ring), over all sessions.
    ring_stops: u64,
}

/// Set `O_NONBLOCK` on an eventfd QEMU passed: a worker must never block reading or writing one.
fn nonblocking(file: &File) -> io::Result<()> {
    crate::sys::set_nonblocking(file.as_fd())
}

impl Device {
    pub fn new(offered: u64, pairs: Vec<Arc<PairShared>>, mac: Option<[u8; 6]>) -> Device {
        Device {
            mac,
            ring_stops: 0,
            offered,
            pairs,
            owned: false,
            acked: None,
            acked_protocol: 0,
            memory: None,
            log: Arc::default(),
            refusal: None,
        }
    }

    /// The features the current guest negotiated.
    pub fn features(&self) -> Option<GuestFeatures> {
        self.acked.map(guest_features)
    }

    /// Regions of the current memory table.
    pub fn memory_regions(&self) -> usize {
        self.memory.as_ref().map_or(0, MemoryTable::regions)
    }

    /// The protocol features QEMU acked.
    pub fn acked_protocol_features(&self) -> u64 {
        self.acked_protocol
    }

    /// Whether replies to requests that want one are on (`REPLY_ACK` negotiated).
    pub fn reply_ack(&self) -> bool {
        self.acked_protocol & VhostUserProtocolFeatures::REPLY_ACK.bits() != 0
    }

    /// Rings stopped by `GET_VRING_BASE` so far.
    pub fn ring_stops(&self) -> u64 {
        self.ring_stops
    }

    /// Change the MAC `SEND_RARP` may announce (the inventory changed the vNIC's).
    pub fn set_mac(&mut self, mac: Option<[u8; 6]>) {
        self.mac = mac;
    }

    /// `VHOST_USER_SEND_RARP`: QEMU asks the device to announce `mac` after a
    /// migration. Injected as a frame from the guest on the first queue
    /// pair ([`super::announce`]) if the `RARP` protocol feature was acked
    /// and `mac` is the vNIC's; refused with the reason otherwise.
    pub fn send_rarp(&mut self, mac: [u8; 6]) -> Result<(), String> {
        let fmt = |m: [u8; 6]| m.map(|b| format!("{b:02x}")).join(":");
        if self.acked_protocol & VhostUserProtocolFeatures::RARP.bits() == 0 {
            return Err("SEND_RARP without the RARP protocol feature".into());
        }
        match self.mac {
            None => return Err(format!("SEND_RARP for {}: the device has no MAC to announce", fmt(mac))),
            Some(own) if own != mac => {
                return Err(format!("SEND_RARP for {}, not the vNIC's MAC {}", fmt(mac), fmt(own)));
            }
            Some(_) => {}
        }
        let Some(first) = self.pairs.first() else {
            return Err("SEND_RARP: no queue pair".into());
        };
        if first.announce(mac) {
            Ok(())
        } else {
            Err("SEND_RARP: announcements already waiting for the worker".into())
        }
    }

    /// The reason the last request was refused, if it was (then the session goes on).
    pub fn take_refusal(&mut self) -> Option<String> {
        self.refusal.take()
    }

    fn refuse(&mut self, why: String) -> VhostError {
        self.refusal = Some(why);
        VhostError::InvalidParam
    }

    /// The session ended, or QEMU reset the owner: stop every ring, unmap memory, forget everything.
    pub fn reset(&mut self) {
        for pair in &self.pairs {
            let mut slot = pair.lock();
            pair.forget_kick(&slot);
            slot.rx.enabled = false;
            slot.tx.enabled = false;
            slot.rx.started = false;
            slot.tx.started = false;
            pair.refresh(&mut slot);
            slot.mem = None;
            slot.rx = RingControl::default();
            slot.tx = RingControl::default();
            slot.rings.set_features(GuestFeatures::default());
            pair.refresh(&mut slot);
        }
        self.owned = false;
        self.acked = None;
        self.acked_protocol = 0;
        self.memory = None;
        self.log.clear();
    }

    /// Run `f` on the ring with vhost-user index `index` (2i: receive of pair i, 2i+1: transmit).
    fn with_ring<T>(
        &mut self,
        index: u32,
        f: impl FnOnce(&PairShared, &mut PairSlot, bool) -> Result<T, String>,
    ) -> VhostResult<T> {
        let pair = (index / 2) as usize;
        let Some(shared) = self.pairs.get(pair).cloned() else {
            return Err(self.refuse(format!(
                "ring {index} does not exist ({} queue pairs)",
                self.pairs.len()
            )));
        };
        let mut slot = shared.lock();
        let r = f(&shared, &mut slot, index % 2 == 0);
        drop(slot);
        r.map_err(|why| self.refuse(why))
    }
}

fn guest_features(bits: u64) -> GuestFeatures {
    // The vhost-user protocol bit and the logging bit are not virtio features.
    GuestFeatures::from_bits(bits & !VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() & !VHOST_F_LOG_ALL)
}

fn ring(slot: &mut PairSlot, rx: bool) -> &mut RingControl {
    if rx { &mut slot.rx } else { &mut slot.tx }
}

/// Stop a ring's data path before its configuration changes (a running ring
/// must not change under the worker; QEMU stops rings first anyway).
fn deactivate(shared: &PairShared, slot: &mut PairSlot, rx: bool) {
    let r = ring(slot, rx);
    let (started, enabled) = (r.started, r.enabled);
    r.started = false;
    shared.refresh(slot);
    let r = ring(slot, rx);
    r.started = started;
    r.enabled = enabled;
}

fn unsupported<T>(what: &'static str) -> VhostResult<T> {
    Err(VhostError::InvalidOperation(what))
}

impl VhostUserBackendReqHandlerMut for Device {
    fn set_owner(&mut self) -> VhostResult<()> {
        if self.owned {
            return Err(VhostError::InvalidOperation("already owned"));
        }
        self.owned = true;
        Ok(())
    }

    fn reset_owner(&mut self) -> VhostResult<()> {
        self.reset();
        Ok(())
    }

    fn reset_device(&mut self) -> VhostResult<()> {
        let protocol = self.acked_protocol;
        let owned = self.owned;
        self.reset();
        self.acked_protocol = protocol;
        self.owned = owned;
        Ok(())
    }

    fn get_features(&mut self) -> VhostResult<u64> {
        Ok(self.offered)
    }

    fn set_features(&mut self, features: u64) -> VhostResult<()> {
        if features & !self.offered != 0 {
            return Err(self.refuse(format!("features {:#x} were not offered", features & !self.offered)));
        }
        // QEMU sends SET_FEATURES once per queue pair, the same value each
        // time, while earlier pairs may already run: only a change resets rings.
        // Nor does logging turned on or off (a migration's start and end).
        let changed = self.acked.map(|a| a & !VHOST_F_LOG_ALL) != Some(features & !VHOST_F_LOG_ALL);
        self.acked = Some(features);
        self.log.set_logging(features & VHOST_F_LOG_ALL != 0);
        let protocol = features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0;
        for pair in &self.pairs {
            let mut slot = pair.lock();
            if changed {
                for rx in [true, false] {
                    deactivate(pair, &mut slot, rx);
                }
                slot.rings.set_features(guest_features(features));
            }
            // Without protocol features, rings are enabled from the start.
            if !protocol {
                slot.rx.enabled = true;
                slot.tx.enabled = true;
            }
            pair.refresh(&mut slot);
        }
        Ok(())
    }

    fn set_mem_table(
        &mut self,
        ctx: &[VhostUserMemoryRegion],
        files: Vec<File>,
        postcopy_listening: Option<bool>,
    ) -> VhostResult<Option<Vec<VhostUserMemoryRegionBase>>> {
        if postcopy_listening.is_some() {
            return unsupported("postcopy");
        }
        let table = match MemoryTable::map(ctx, files, &self.log) {
            Ok(t) => t,
            Err(e) => return Err(self.refuse(format!("memory table: {e}"))),
        };
        // Rings restart over the new memory at the indices they stopped at
        // (everything used was published first).
        for pair in &self.pairs {
            let mut slot = pair.lock();
            for rx in [true, false] {
                deactivate(pair, &mut slot, rx);
            }
            slot.mem = Some(table.mem.clone());
            pair.refresh(&mut slot);
        }
        self.memory = Some(table);
        Ok(None)
    }

    fn set_vring_num(&mut self, index: u32, num: u32) -> VhostResult<()> {
        if num == 0 || num > u32::from(MAX_QUEUE_SIZE) || !num.is_power_of_two() {
            return Err(self.refuse(format!(
                "ring {index}: size {num} (a power of two up to {MAX_QUEUE_SIZE})"
            )));
        }
        self.with_ring(index, |shared, slot, rx| {
            deactivate(shared, slot, rx);
            ring(slot, rx).size = Some(num as u16);
            shared.refresh(slot);
            Ok(())
        })
    }

    fn set_vring_addr(
        &mut self,
        index: u32,
        _flags: VhostUserVringAddrFlags,
        descriptor: u64,
        used: u64,
        available: u64,
        _log: u64,
    ) -> VhostResult<()> {
        let Some(memory) = &self.memory else {
            return Err(self.refuse(format!("ring {index}: addresses before a memory table")));
        };
        let translated = (
            memory.translate(descriptor),
            memory.translate(available),
            memory.translate(used),
        );
        let (Some(desc), Some(avail), Some(used)) = translated else {
            return Err(self.refuse(format!(
                "ring {index}: addresses {descriptor:#x}/{available:#x}/{used:#x} are not in guest memory"
            )));
        };
        self.with_ring(index, |shared, slot, rx| {
            deactivate(shared, slot, rx);
            ring(slot, rx).addrs = Some((desc, avail, used));
            shared.refresh(slot);
            Ok(())
        })
    }

    fn set_vring_base(&mut self, index: u32, base: u32) -> VhostResult<()> {
        let Ok(base) = u16::try_from(base) else {
            return Err(self.refuse(format!("ring {index}: base {base} (split rings count to 65535)")));
        };
        self.with_ring(index, |shared, slot, rx| {
            deactivate(shared, slot, rx);
            ring(slot, rx).base = base;
            shared.refresh(slot);
            Ok(())
        })
    }

    fn get_vring_base(&mut self, index: u32) -> VhostResult<VhostUserVringState> {
        let base = self.with_ring(index, |shared, slot, rx| {
            if !rx {
                shared.forget_kick(slot);
            }
            let r = ring(slot, rx);
            r.started = false;
            shared.refresh(slot);
            let r = ring(slot, rx);
            // Stopped: QEMU passes new eventfds when it starts the ring again.
            r.kick = None;
            r.call = None;
            Ok(r.base)
        });
        match base {
            Ok(base) => {
                self.ring_stops += 1;
                Ok(VhostUserVringState::new(index, u32::from(base)))
            }
            Err(e) => {
                // No reply was sent, and QEMU waits for one: the session must end, not go on.
                self.refusal = None;
                Err(e)
            }
        }
    }

    fn set_vring_kick(&mut self, index: u8, fd: Option<File>) -> VhostResult<()> {
        if let Some(f) = &fd
            && let Err(e) = nonblocking(f)
        {
            return Err(self.refuse(format!("ring {index}: kick eventfd: {e}")));
        }
        self.with_ring(u32::from(index), |shared, slot, rx| {
            if !rx {
                shared.forget_kick(slot);
            }
            let r = ring(slot, rx);
            r.polled = fd.is_none();
            r.kick = fd;
            r.started = true;
            shared.refresh(slot);
            Ok(())
        })
    }

    fn set_vring_call(&mut self, index: u8, fd: Option<File>) -> VhostResult<()> {
        if let Some(f) = &fd
            && let Err(e) = nonblocking(f)
        {
            return Err(self.refuse(format!("ring {index}: call eventfd: {e}")));
        }
        self.with_ring(u32::from(index), |_, slot, rx| {
            ring(slot, rx).call = fd;
            Ok(())
        })
    }

    fn set_vring_err(&mut self, index: u8, _fd: Option<File>) -> VhostResult<()> {
        // Ring errors are counted in the queue stats; the error eventfd is not used.
        self.with_ring(u32::from(index), |_, _, _| Ok(()))
    }

    fn get_protocol_features(&mut self) -> VhostResult<VhostUserProtocolFeatures> {
        Ok(protocol_features())
    }

    fn set_protocol_features(&mut self, features: u64) -> VhostResult<()> {
        let offered = protocol_features().bits();
        if features & !offered != 0 {
            return Err(self.refuse(format!("protocol features {:#x} were not offered", features & !offered)));
        }
        self.acked_protocol = features;
        Ok(())
    }

    fn get_queue_num(&mut self) -> VhostResult<u64> {
        Ok(2 * self.pairs.len() as u64)
    }

    fn set_vring_enable(&mut self, index: u32, enable: bool) -> VhostResult<()> {
        self.with_ring(index, |shared, slot, rx| {
            ring(slot, rx).enabled = enable;
            shared.refresh(slot);
            Ok(())
        })
    }

    fn get_config(&mut self, _offset: u32, _size: u32, _flags: VhostUserConfigFlags) -> VhostResult<Vec<u8>> {
        unsupported("device configuration space (QEMU provides virtio-net's)")
    }

    fn set_config(&mut self, _offset: u32, _buf: &[u8], _flags: VhostUserConfigFlags) -> VhostResult<()> {
        unsupported("device configuration space (QEMU provides virtio-net's)")
    }

    fn set_gpu_socket(&mut self, _gpu_backend: GpuBackend) -> VhostResult<()> {
        unsupported("GPU socket")
    }

    fn get_shared_object(&mut self, _uuid: VhostUserSharedMsg) -> VhostResult<File> {
        unsupported("shared objects")
    }

    fn get_inflight_fd(&mut self, _inflight: &VhostUserInflight) -> VhostResult<(VhostUserInflight, File)> {
        unsupported("inflight tracking")
    }

    fn set_inflight_fd(&mut self, _inflight: &VhostUserInflight, _file: File) -> VhostResult<()> {
        unsupported("inflight tracking")
    }

    fn get_max_mem_slots(&mut self) -> VhostResult<u64> {
        unsupported("memory slots")
    }

    fn add_mem_region(
        &mut self,
        _region: &VhostUserSingleMemoryRegion,
        _fd: File,
        _postcopy_listening: Option<bool>,
    ) -> VhostResult<Option<VhostUserMemoryRegionBase>> {
        unsupported("memory slots")
    }

    fn remove_mem_region(&mut self, _region: &VhostUserSingleMemoryRegion) -> VhostResult<()> {
        unsupported("memory slots")
    }

    fn set_device_state_fd(
        &mut self,
        _direction: VhostTransferStateDirection,
        _phase: VhostTransferStatePhase,
        _fd: File,
    ) -> VhostResult<Option<File>> {
        unsupported("device state transfer")
    }

    fn check_device_state(&mut self) -> VhostResult<()> {
        unsupported("device state transfer")
    }

    fn get_shmem_config(&mut self) -> VhostResult<VhostUserShMemConfig> {
        unsupported("shared memory regions")
    }

    fn set_log_base(&mut self, log: &VhostUserLog, file: File) -> VhostResult<()> {
        // The message struct is packed: copy its fields out before use.
        let (size, offset) = (log.mmap_size, log.mmap_offset);
        match self.log.set_base(&file, size, offset) {
            Ok(()) => Ok(()),
            Err(e) => Err(self.refuse(format!("dirty-page log: {e}"))),
        }
    }
}
