//! vNICs attached through vhost-user: one device per vNIC, its queue pairs
//! served by the datapath workers.
//!
//! For each `[[vnic]]` with `vhost_user = "/path.sock"` the agent listens on
//! the socket (creating its directory) and QEMU, the client, connects and
//! reconnects by itself (`reconnect=1`): a guest reboot renegotiates on the
//! same connection, an agent restart is a new device on the same path that
//! QEMU finds again. The device is a
//! [`SteeredVhostUser`]: every worker gets a [`WorkerPort`] on it, which it
//! polls with its other ports and runs through its engine's batch path with
//! the frames' offload state (partial checksums, TSO super-frames whole), and
//! each frame from the guest is passed to the worker the steering hash
//! names, so connection state stays whole per worker as for AF_PACKET ports.
//!
//! The devices are kept here, on the control side, for `/health` and
//! metrics (connection, negotiated features, rings running, frames passed
//! between workers); dropping them stops the devices and removes the sockets.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use palisade_io::vhost_user::{
    DeviceStatus, HandoffStats, Offloads, QueueStats, SteeredVhostUser, VhostUserNetConfig, WorkerPort,
};

use crate::config::{AgentConfig, VnicAttachment};
use crate::error::AgentError;

/// The vhost-user devices of the agent's vNICs.
#[derive(Debug, Default)]
pub(crate) struct VhostVnics {
    devices: Vec<VhostVnic>,
}

#[derive(Debug)]
struct VhostVnic {
    name: String,
    device: SteeredVhostUser,
    /// The MAC the device may announce: the inventory's, as last installed.
    mac: Option<[u8; 6]>,
}

/// The workers' ports on the devices, to be taken by each worker as it opens its sockets.
#[derive(Debug, Default)]
pub(crate) struct VhostPorts {
    /// By the port's label (the socket's path), one per worker.
    ports: BTreeMap<String, Vec<Option<WorkerPort>>>,
}

impl VhostPorts {
    /// Worker `worker`'s port on the device whose socket is `label`, if it is a vhost-user port.
    pub fn take(&mut self, label: &str, worker: usize) -> Option<WorkerPort> {
        self.ports.get_mut(label)?.get_mut(worker)?.take()
    }
}

/// The device configuration for a vNIC's attachment (`None`: not vhost-user).
pub(crate) fn device_config(
    attachment: VnicAttachment<'_>,
    offloads: bool,
    workers: usize,
) -> Option<VhostUserNetConfig> {
    let VnicAttachment::VhostUser {
        socket,
        queue_pairs,
        socket_mode,
    } = attachment
    else {
        return None;
    };
    let mut c = VhostUserNetConfig::new(socket);
    let max = palisade_io::vhost_user::MAX_QUEUE_PAIRS;
    c.queue_pairs = queue_pairs.unwrap_or_else(|| u16::try_from(workers).unwrap_or(max).clamp(1, max));
    // Without offloads end to end, the engine takes frames one packet at a
    // time: a guest that cannot send super-frames sends packets the engine
    // takes as they are (partial checksums are still completed cheaply).
    c.offloads = if offloads {
        Offloads::ALL
    } else {
        Offloads::CHECKSUM_ONLY
    };
    c.socket_mode = socket_mode;
    Some(c)
}

/// Open a device for every vhost-user vNIC of `config`, each shared out
/// between `workers`; `mac` gives a vNIC's MAC from the inventory by name
/// (the only MAC QEMU may announce for it after a migration).
pub(crate) fn open(
    config: &AgentConfig,
    workers: usize,
    mac: &dyn Fn(&str) -> Option<[u8; 6]>,
) -> Result<(VhostVnics, VhostPorts), AgentError> {
    let mut vnics = VhostVnics::default();
    let mut ports = VhostPorts::default();
    for v in &config.vnics {
        let Some(mut dc) = device_config(v.attachment(), config.offloads, workers) else {
            continue;
        };
        dc.mac = mac(&v.name);
        let what = || format!("vnic {} on vhost-user {}", v.name, dc.socket.display());
        if let Some(dir) = dc.socket.parent() {
            std::fs::create_dir_all(dir).map_err(|e| AgentError::Port {
                what: what(),
                message: format!("creating {}: {e}", dir.display()),
            })?;
        }
        let (device, worker_ports) = SteeredVhostUser::open(&dc, workers).map_err(|e| AgentError::Port {
            what: what(),
            message: e.to_string(),
        })?;
        if let Some(group) = &v.socket_group {
            let gid = group_id(group, &std::fs::read_to_string("/etc/group").unwrap_or_default()).ok_or_else(|| {
                AgentError::Port {
                    what: what(),
                    message: format!("socket_group {group:?} is not a group of this host"),
                }
            })?;
            std::os::unix::fs::chown(&dc.socket, None, Some(gid)).map_err(|e| AgentError::Port {
                what: what(),
                message: format!("giving the socket to group {group}: {e}"),
            })?;
        }
        eprintln!(
            "palisade agent: vnic {} listening on vhost-user {} ({} queue pairs over {workers} worker(s))",
            v.name,
            dc.socket.display(),
            dc.queue_pairs
        );
        ports
            .ports
            .insert(v.port_label(), worker_ports.into_iter().map(Some).collect());
        vnics.devices.push(VhostVnic {
            name: v.name.clone(),
            device,
            mac: dc.mac,
        });
    }
    Ok((vnics, ports))
}

/// The id of group `group` (a number, or a name in `etc_group`, `/etc/group`'s text).
fn group_id(group: &str, etc_group: &str) -> Option<u32> {
    if let Ok(gid) = group.parse() {
        return Some(gid);
    }
    etc_group.lines().find_map(|line| {
        let mut fields = line.split(':');
        (fields.next()? == group).then_some(())?;
        fields.nth(1)?.parse().ok()
    })
}

/// One device's state for `/health`.
fn device_health(name: &str, socket: &str, status: &DeviceStatus, handoff: HandoffStats) -> serde_json::Value {
    let features = status.features.map(|f| {
        serde_json::json!({
            "bits": format!("{:#x}", f.bits()),
            "checksum_from_guest": f.checksum_from_guest(),
            "checksum_to_guest": f.checksum_to_guest(),
            "tso4_from_guest": f.tso_from_guest().0,
            "tso6_from_guest": f.tso_from_guest().1,
            "tso4_to_guest": f.tso_to_guest().0,
            "tso6_to_guest": f.tso_to_guest().1,
            "mergeable_rx_buffers": f.mergeable_rx_buffers(),
            "multiqueue": f.multiqueue(),
            "event_idx": f.event_idx(),
        })
    });
    serde_json::json!({
        "vnic": name,
        "socket": socket,
        "connected": status.connected,
        "sessions": status.sessions,
        "features": features,
        "queue_pairs": status.running.len(),
        "queue_pairs_running": status.running.iter().filter(|(rx, tx)| *rx && *tx).count(),
        "requests_refused": status.requests_refused,
        "ring_stops": status.ring_stops,
        "announcements": status.announcements,
        "announcements_refused": status.announcements_refused,
        "last_error": status.last_error,
        "frames_passed_between_workers": handoff.passed,
        "frames_dropped_between_workers": handoff.dropped,
    })
}

/// Sum of a device's queue counters.
fn total(stats: &[QueueStats]) -> (u64, u64, u64) {
    stats.iter().fold((0, 0, 0), |(refused, faults, dropped), s| {
        (
            refused + s.refused.total(),
            faults + s.ring_faults,
            dropped + s.to_guest_dropped(),
        )
    })
}

impl VhostVnics {
    /// Whether there are any.
    pub fn is_empty(&self) -> bool {
        self.devices.is_empty()
    }

    /// Give each device the MAC the inventory gives its vNIC now (`mac`, by
    /// name; a policy was installed): the only one QEMU may announce for it
    /// after a migration (`SEND_RARP`). A device kept the MAC of the policy
    /// the agent started with, and refused the announcement of a vNIC whose
    /// MAC the inventory had changed since. Returns the vNICs whose MAC
    /// changed, with the new one.
    pub fn update_macs(&mut self, mac: &dyn Fn(&str) -> Option<[u8; 6]>) -> Vec<(String, Option<[u8; 6]>)> {
        let mut changed = Vec::new();
        for d in &mut self.devices {
            let now = mac(&d.name);
            if now != d.mac {
                d.device.device().set_mac(now);
                d.mac = now;
                changed.push((d.name.clone(), now));
            }
        }
        changed
    }

    /// Every device's state, for `/health`.
    pub fn health(&self) -> serde_json::Value {
        self.devices
            .iter()
            .map(|d| {
                device_health(
                    &d.name,
                    &d.device.device().socket().display().to_string(),
                    &d.device.status(),
                    d.device.handoff_stats(),
                )
            })
            .collect()
    }

    /// Prometheus text for the devices (the ports' frame counters are in `palisade_port_*`).
    pub fn metrics(&self, host: &str) -> String {
        let esc = |s: &str| s.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n");
        let rows: Vec<Row> = self
            .devices
            .iter()
            .map(|d| Row {
                labels: format!("host=\"{}\",vnic=\"{}\"", esc(host), esc(&d.name)),
                status: d.device.status(),
                handoff: d.device.handoff_stats(),
                queues: total(&d.device.stats()),
            })
            .collect();
        let mut out = String::new();
        for (name, kind, help, value) in METRICS {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for row in &rows {
                let _ = writeln!(out, "{name}{{{}}} {}", row.labels, value(row));
            }
        }
        out
    }
}

/// One device's figures for the metrics.
struct Row {
    labels: String,
    status: DeviceStatus,
    handoff: HandoffStats,
    /// (chains refused, ring faults, frames not delivered to the guest) over its pairs.
    queues: (u64, u64, u64),
}

/// (name, type, help, value) of each device metric.
type Metric = (&'static str, &'static str, &'static str, fn(&Row) -> u64);

const METRICS: [Metric; 10] = [
    (
        "palisade_vhost_user_connected",
        "gauge",
        "1 while the vNIC's QEMU is connected to its vhost-user socket.",
        |r| u64::from(r.status.connected),
    ),
    (
        "palisade_vhost_user_sessions_total",
        "counter",
        "Connections QEMU made to the vhost-user socket (a reconnect after an agent restart adds one).",
        |r| r.status.sessions,
    ),
    (
        "palisade_vhost_user_queue_pairs_running",
        "gauge",
        "Queue pairs whose receive and transmit rings both run.",
        |r| r.status.running.iter().filter(|(rx, tx)| *rx && *tx).count() as u64,
    ),
    (
        "palisade_vhost_user_chains_refused_total",
        "counter",
        "Descriptor chains from the guest refused as malformed (lengths, addresses, loops, directions).",
        |r| r.queues.0,
    ),
    (
        "palisade_vhost_user_ring_faults_total",
        "counter",
        "Rings stopped because the guest corrupted their indices.",
        |r| r.queues.1,
    ),
    (
        "palisade_vhost_user_to_guest_dropped_total",
        "counter",
        "Frames not delivered to the guest (no receive buffers, ring stopped, refused header).",
        |r| r.queues.2,
    ),
    (
        "palisade_vhost_user_announcements_total",
        "counter",
        "RARP announcements QEMU asked for after a migration (SEND_RARP), injected as from the guest.",
        |r| r.status.announcements,
    ),
    (
        "palisade_vhost_user_announcements_refused_total",
        "counter",
        "SEND_RARP requests refused (a MAC not the vNIC's, none known, too many waiting).",
        |r| r.status.announcements_refused,
    ),
    (
        "palisade_vhost_user_handoff_frames_total",
        "counter",
        "Frames from the guest passed to the worker their addresses hash to.",
        |r| r.handoff.passed,
    ),
    (
        "palisade_vhost_user_handoff_drops_total",
        "counter",
        "Frames from the guest dropped because that worker's hand-off queue was full.",
        |r| r.handoff.dropped,
    ),
];

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    #[test]
    fn queue_pairs_default_to_one_per_worker_and_offloads_follow_the_agent() {
        let vhost = |queue_pairs| VnicAttachment::VhostUser {
            socket: Path::new("/run/v.sock"),
            queue_pairs,
            socket_mode: Some(0o660),
        };
        assert!(device_config(VnicAttachment::Interface("vn-1"), true, 4).is_none());
        let c = device_config(vhost(None), true, 4).unwrap();
        assert_eq!(
            (c.queue_pairs, c.offloads, c.socket_mode),
            (4, Offloads::ALL, Some(0o660))
        );
        assert_eq!(device_config(vhost(Some(2)), true, 4).unwrap().queue_pairs, 2);
        assert_eq!(device_config(vhost(None), true, 1000).unwrap().queue_pairs, 128);
        assert_eq!(
            device_config(vhost(None), false, 1).unwrap().offloads,
            Offloads::CHECKSUM_ONLY
        );
    }

    #[test]
    fn metrics_have_one_row_per_device_and_escape_names() {
        assert!(
            !VhostVnics::default()
                .metrics("hv1")
                .contains("palisade_vhost_user_connected{")
        );
        let dir = tempfile::tempdir().unwrap();
        let (device, _ports) = SteeredVhostUser::open(&VhostUserNetConfig::new(dir.path().join("v.sock")), 2).unwrap();
        let vnics = VhostVnics {
            devices: vec![VhostVnic {
                name: "we\"b".into(),
                device,
                mac: None,
            }],
        };
        let text = vnics.metrics("hv1");
        assert!(
            text.contains("palisade_vhost_user_connected{host=\"hv1\",vnic=\"we\\\"b\"} 0\n"),
            "{text}"
        );
        assert_eq!(text.lines().filter(|l| !l.starts_with('#')).count(), METRICS.len());
        assert_eq!(vnics.health()[0]["connected"], false);
    }

    #[test]
    fn update_macs_reports_the_vnics_whose_mac_changed() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = VhostUserNetConfig::new(dir.path().join("v.sock"));
        c.mac = Some([2, 0, 0, 0, 0, 1]);
        let (device, _ports) = SteeredVhostUser::open(&c, 1).unwrap();
        let mut vnics = VhostVnics {
            devices: vec![VhostVnic {
                name: "web.0".into(),
                device,
                mac: c.mac,
            }],
        };
        let inventory = |mac: Option<[u8; 6]>| move |name: &str| (name == "web.0").then_some(mac).flatten();
        assert!(vnics.update_macs(&inventory(c.mac)).is_empty(), "unchanged");
        let new = Some([2, 0, 0, 0, 0, 2]);
        assert_eq!(vnics.update_macs(&inventory(new)), [("web.0".to_string(), new)]);
        assert!(vnics.update_macs(&inventory(new)).is_empty());
        // Gone from the inventory: nothing to announce.
        assert_eq!(vnics.update_macs(&inventory(None)), [("web.0".to_string(), None)]);
    }

    #[test]
    fn socket_groups_are_numbers_or_names_in_etc_group() {
        let etc = "root:x:0:\nkvm:x:993:\nlibvirt-qemu:x:64055:libvirt-qemu\n";
        assert_eq!(group_id("libvirt-qemu", etc), Some(64055));
        assert_eq!(group_id("kvm", etc), Some(993));
        assert_eq!(group_id("123", etc), Some(123));
        assert_eq!(group_id("nobody-here", etc), None);
        assert_eq!(group_id("libvirt", etc), None, "a prefix is not a match");
    }

    #[test]
    fn health_names_the_device_and_what_the_guest_negotiated() {
        let status = DeviceStatus {
            connected: true,
            sessions: 2,
            running: vec![(true, true), (false, false)],
            ..DeviceStatus::default()
        };
        let h = device_health(
            "web-1.0",
            "/run/v.sock",
            &status,
            HandoffStats { passed: 5, dropped: 1 },
        );
        assert_eq!(h["vnic"], "web-1.0");
        assert_eq!(h["connected"], true);
        assert_eq!(h["sessions"], 2);
        assert_eq!(h["queue_pairs"], 2);
        assert_eq!(h["queue_pairs_running"], 1);
        assert_eq!(h["features"], serde_json::Value::Null, "nothing negotiated yet");
        assert_eq!(h["frames_dropped_between_workers"], 1);
    }
}
