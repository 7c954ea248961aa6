//! `palisade lab up|down|status|exec|migrate|appliance|chain-policy`: a small virtual datacenter on this machine.
//!
//! Presentation only; the lab itself is `palisade_lab`, which the demo and the
//! end-to-end tests call directly. The hidden `serve` subcommands are traffic
//! helpers the demo runs inside VM namespaces.

use std::net::{IpAddr, SocketAddr, TcpListener, UdpSocket};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use palisade_lab::{Lab, LabSpec, QemuMode, QemuNic, default_state_dir, dns, lab::load_inventory, leftovers, stream};

/// Subcommands of `palisade lab`.
#[derive(clap::Subcommand, Debug)]
pub enum LabCmd {
    /// Build the lab: namespaces, veths, edge router, agent configs (and agents).
    Up {
        /// Policy directory whose inventory describes the datacenter.
        #[arg(long, conflicts_with_all = ["hosts", "vms"])]
        policy: Option<PathBuf>,
        /// Generate a lab with this many hosts (with --vms).
        #[arg(long, requires = "vms")]
        hosts: Option<usize>,
        /// VMs per host of a generated lab (with --hosts).
        #[arg(long, requires = "hosts")]
        vms: Option<usize>,
        /// Zones of a generated lab that fail open (`blue`, `green`;
        /// comma-separated); the others fail closed.
        #[arg(long, requires = "hosts", value_delimiter = ',', value_name = "ZONES")]
        open_zones: Vec<String>,
        /// Run VMs as QEMU guests: all of them, or the comma-separated list given.
        #[arg(long, num_args = 0..=1, value_delimiter = ',', value_name = "VMS")]
        qemu: Option<Vec<String>>,
        /// How QEMU guests attach: `vhost-user` (the agent serves the
        /// guest's virtio-net queues from its shared memory, offloads on) or
        /// `tap` (a tap the agent reads, guest offloads off).
        #[arg(long, value_enum, default_value = "vhost-user", value_name = "KIND")]
        qemu_nic: QemuNicArg,
        /// Do not start agents (nothing forwards until one runs).
        #[arg(long)]
        no_agents: bool,
        /// Lab name: the prefix of every namespace.
        #[arg(long, default_value = "pal")]
        name: String,
        /// State directory (default /run/palisade/lab-NAME).
        #[arg(long)]
        state_dir: Option<PathBuf>,
        /// Memory of each QEMU guest, MiB.
        #[arg(long, default_value_t = 256)]
        vm_mem: u32,
        /// Leave the namespace VMs' NIC offloads on (TX checksum, TSO), as
        /// real virtio-net guests run; by default the lab turns them off.
        #[arg(long)]
        vm_offloads: bool,
        /// Run each agent under `palisade agent supervise` (arms the
        /// fail-open fallback of `open` zones when an agent dies, restarts it).
        #[arg(long)]
        supervise: bool,
        /// Pre-stage a QEMU guest's vNIC on another host too (`VM@HOST`,
        /// repeatable), so it can live-migrate there (`palisade lab migrate`).
        #[arg(long, value_name = "VM@HOST")]
        standby: Vec<String>,
        /// Each agent's connection-table capacity (default: the agent's, 32,768).
        #[arg(long, value_name = "N")]
        conn_capacity: Option<usize>,
        /// Run a controller on the underlay (a CA, each host's certificate,
        /// the lab's policy applied): the agents take policy from it and
        /// carry out the migrations it orders (`lab migrate --ordered`).
        #[arg(long)]
        controller: bool,
    },
    /// Live-migrate a QEMU guest to another host with its firewall state
    /// (its connections move from the source agent to the destination's
    /// while QEMU pauses the guest for the switchover).
    Migrate {
        /// Lab name.
        #[arg(long, default_value = "pal")]
        name: String,
        /// State directory (default /run/palisade/lab-NAME).
        #[arg(long)]
        state_dir: Option<PathBuf>,
        /// The VM (a QEMU guest on a tap: `--qemu-nic tap`, pre-staged with `--standby`).
        vm: String,
        /// The destination host.
        #[arg(long)]
        to: String,
        /// Seconds the whole migration may take.
        #[arg(long, default_value_t = 120)]
        timeout: u64,
        /// Do not move the firewall state (a baseline for benchmarks: the
        /// destination starts with no connections).
        #[arg(long)]
        no_state: bool,
        /// Do not have the guest send a gratuitous ARP after the switchover.
        #[arg(long)]
        no_announce: bool,
        /// Order the migration through the lab's controller (`lab up
        /// --controller`): the source host's agent carries it out, the state
        /// moving over the agents' mutual-TLS channel (pre-copy and delta).
        #[arg(long, conflicts_with = "no_state")]
        ordered: bool,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Remove everything the lab made, also after a crash.
    Down {
        /// Lab name.
        #[arg(long, default_value = "pal")]
        name: String,
        /// State directory (default /run/palisade/lab-NAME).
        #[arg(long)]
        state_dir: Option<PathBuf>,
    },
    /// Show hosts, VMs, agents and interfaces.
    Status {
        /// Lab name.
        #[arg(long, default_value = "pal")]
        name: String,
        /// State directory (default /run/palisade/lab-NAME).
        #[arg(long)]
        state_dir: Option<PathBuf>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Run a command in a VM (namespace or QEMU guest); exits with its status.
    Exec {
        /// Lab name.
        #[arg(long, default_value = "pal")]
        name: String,
        /// State directory (default /run/palisade/lab-NAME).
        #[arg(long)]
        state_dir: Option<PathBuf>,
        /// Seconds before the command is abandoned.
        #[arg(long, default_value_t = 30)]
        timeout: u64,
        /// The VM.
        vm: String,
        /// The command and its arguments (after `--`).
        #[arg(last = true, required = true)]
        cmd: Vec<String>,
    },
    /// Make a service-chain appliance: bridge its two sides and load the
    /// lab's counting nftables ruleset (`palisade_lab::lab::appliance`).
    Appliance {
        /// Lab name.
        #[arg(long, default_value = "pal")]
        name: String,
        /// State directory (default /run/palisade/lab-NAME).
        #[arg(long)]
        state_dir: Option<PathBuf>,
        /// What to build or read.
        #[command(subcommand)]
        cmd: ApplianceCmd,
    },
    /// Write a policy directory for service-chain appliances (no lab
    /// needed): the three-tier example with the appliance VMs (on hv1, two
    /// vNICs each in the web zone) and the web tier's internet rule
    /// redirected through a chain; the policy file replaced whole, as a
    /// running lab's agents reload it.
    ChainPolicy {
        /// The three-tier example.
        #[arg(long, default_value = "examples/three-tier")]
        example: PathBuf,
        /// The directory to write.
        #[arg(long)]
        out: PathBuf,
        /// The chain: `vm` (ns-ips: ips-1), `two-stage` (ns-two: fw-1 then
        /// ips-1), `external` (ns-ext).
        #[arg(long, value_enum)]
        chain: ChainArg,
        /// Declare the chain but do not redirect through it.
        #[arg(long)]
        no_redirect: bool,
        /// Appliance VMs in the inventory besides the chain's (`ips-1`,
        /// `fw-1`; comma-separated).
        #[arg(long, value_delimiter = ',', value_name = "VMS")]
        with_vms: Vec<String>,
        /// The chain's `on_failure`.
        #[arg(long, default_value = "closed")]
        on_failure: String,
        /// The policy's version (`--version` is the binary's).
        #[arg(long, default_value_t = 1)]
        policy_version: u32,
    },
    /// Traffic helpers run inside the lab.
    #[command(subcommand, hide = true)]
    Serve(ServeCmd),
    /// Write a state blob of COUNT synthetic connections made from the
    /// first established connection of TEMPLATE (a blob a vNIC's export gave): the same
    /// vNIC, initiator, state and TCP windows, each with its own source
    /// port, destination port (from DST_PORT up) and responder address
    /// (its last byte), for benchmarks of a
    /// migration with a big connection table (`bench/migration.sh`).
    #[command(hide = true)]
    SynthState {
        /// The exported blob.
        #[arg(long)]
        template: PathBuf,
        /// Connections to write.
        #[arg(long)]
        count: u32,
        /// First destination port (not the template's, so no key collides with it).
        #[arg(long, default_value_t = 9)]
        dst_port: u16,
        /// Where to write the blob.
        #[arg(long)]
        out: PathBuf,
    },
}

/// `--qemu-nic`.
#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum QemuNicArg {
    /// vhost-user sockets served by the agent.
    VhostUser,
    /// Taps in the host namespace.
    Tap,
}

/// `palisade lab appliance …`.
#[derive(clap::Subcommand, Debug)]
pub enum ApplianceCmd {
    /// Bridge a VM's two vNICs with the ruleset.
    Bridge {
        /// The VM (its first two vNICs are the appliance's sides).
        vm: String,
        /// The nftables bridge table.
        #[arg(long, default_value = "ips")]
        table: String,
        /// An nftables rule after the probes' accept (repeatable); default:
        /// count everything, count and drop "GET /X-EVIL".
        #[arg(long = "rule", value_name = "RULE")]
        rules: Vec<String>,
    },
    /// The external appliance over the underlay (namespace `NAME-xapp`,
    /// 198.51.100.2, VNIs 7001 in and 7002 out); prints its namespace.
    External {
        /// The zone whose north-south flows it serves (its VTEP is the host
        /// owning the zone's edge leg).
        #[arg(long, default_value = "web")]
        zone: String,
        /// The nftables bridge table.
        #[arg(long, default_value = "ips")]
        table: String,
        /// As for `bridge`.
        #[arg(long = "rule", value_name = "RULE")]
        rules: Vec<String>,
    },
    /// Print an appliance's packet counters, in rule order, one a line.
    Counters {
        /// The VM appliance.
        #[arg(required_unless_present = "netns")]
        vm: Option<String>,
        /// Or the namespace of an external appliance.
        #[arg(long, conflicts_with = "vm")]
        netns: Option<String>,
        /// The nftables bridge table.
        #[arg(long, default_value = "ips")]
        table: String,
    },
}

/// `lab chain-policy --chain`.
#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum ChainArg {
    /// ns-ips: the VM ips-1.
    Vm,
    /// ns-two: fw-1, then ips-1.
    TwoStage,
    /// ns-ext: the external appliance.
    External,
}

/// `palisade lab serve …`.
#[derive(clap::Subcommand, Debug)]
pub enum ServeCmd {
    /// Authoritative DNS for `<vm>.lab` names (UDP).
    Dns {
        /// Zone file of `NAME IPV4` lines (as `lab up` writes to STATE/dns.zone).
        #[arg(long, required_unless_present = "policy")]
        zone_file: Option<PathBuf>,
        /// Or: take the names from this policy directory's inventory.
        #[arg(long, conflicts_with = "zone_file")]
        policy: Option<PathBuf>,
        /// Listen address.
        #[arg(long, default_value = "0.0.0.0:53")]
        listen: SocketAddr,
    },
    /// A TCP server writing a line every 100 ms to each client.
    Stream {
        /// Port.
        port: u16,
        /// Address to bind.
        #[arg(long, default_value = "0.0.0.0")]
        bind: IpAddr,
    },
}

fn state(name: &str, dir: Option<PathBuf>) -> PathBuf {
    dir.unwrap_or_else(|| default_state_dir(name))
}

/// Run a lab subcommand.
pub fn run(cmd: LabCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        LabCmd::Up {
            policy,
            hosts,
            vms,
            open_zones,
            qemu,
            qemu_nic,
            no_agents,
            name,
            state_dir,
            vm_mem,
            vm_offloads,
            supervise,
            standby,
            conn_capacity,
            controller,
        } => {
            let state_dir = state(&name, state_dir);
            let mut spec = match (hosts, vms) {
                (Some(h), Some(v)) => {
                    let open: Vec<&str> = open_zones.iter().map(String::as_str).collect();
                    LabSpec::generated_with(h, v, &state_dir, &open).context("generating the lab inventory")?
                }
                _ => LabSpec::from_inventory(policy.unwrap_or_else(|| PathBuf::from("examples/three-tier"))),
            };
            spec.name = name.clone();
            spec.state_dir = state_dir;
            spec.vm_mem_mib = vm_mem;
            spec.vm_offloads = vm_offloads;
            spec.qemu_nic = match qemu_nic {
                QemuNicArg::VhostUser => QemuNic::VhostUser,
                QemuNicArg::Tap => QemuNic::Tap,
            };
            spec.supervise = supervise;
            spec.conn_capacity = conn_capacity;
            spec.controller = controller;
            for s in &standby {
                let (vm, host) = s
                    .split_once('@')
                    .with_context(|| format!("--standby {s:?}: expected VM@HOST"))?;
                spec.standby.push((vm.to_string(), host.to_string()));
            }
            spec.qemu = match qemu {
                None => QemuMode::None,
                Some(v) if v.is_empty() => QemuMode::All,
                Some(v) => QemuMode::Vms(v),
            };
            if !no_agents {
                spec.agent_exe = Some(std::env::current_exe().context("locating the palisade binary")?);
            }
            let lab = Lab::up(&spec).with_context(|| format!("building lab {name}"))?;
            print!("{}", lab.status());
            println!("state: {}", lab.state().state_dir.display());
            Ok(ExitCode::SUCCESS)
        }
        LabCmd::Migrate {
            name,
            state_dir,
            vm,
            to,
            timeout,
            no_state,
            no_announce,
            ordered,
            json,
        } => {
            let mut lab = Lab::load(&state(&name, state_dir)).with_context(|| format!("lab {name} is not up"))?;
            let opts = palisade_lab::MigrateOptions {
                timeout: Duration::from_secs(timeout),
                move_state: !no_state,
                announce: !no_announce,
            };
            let r = if ordered {
                lab.migrate_ordered(&vm, &to, opts.timeout)?
            } else {
                lab.migrate(&vm, &to, &opts)?
            };
            if json {
                println!("{}", r.to_json());
            } else {
                println!(
                    "migrated {} {} -> {}: {} connection(s), {} state bytes (blake3 {}), pre-stage {:.1} ms, \
                     paused {:.1} ms (state move {:.2} ms: export {:.2}, import {:.2}; QEMU downtime {} ms), total {:.0} ms",
                    r.vm,
                    r.from,
                    r.to,
                    r.connections,
                    r.state_bytes,
                    if r.state_blake3.is_empty() {
                        "-"
                    } else {
                        &r.state_blake3[..16]
                    },
                    r.prestage_ms,
                    r.paused_ms,
                    r.switchover_ms,
                    r.export_ms,
                    r.import_ms,
                    r.qemu_downtime_ms.map_or("?".to_string(), |d| d.to_string()),
                    r.total_ms
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        LabCmd::Down { name, state_dir } => {
            let report = Lab::down(&name, &state(&name, state_dir)).with_context(|| format!("removing lab {name}"))?;
            print!("{report}");
            Ok(ExitCode::SUCCESS)
        }
        LabCmd::Status { name, state_dir, json } => {
            let dir = state(&name, state_dir);
            match Lab::load(&dir) {
                Ok(lab) => {
                    let st = lab.status();
                    if json {
                        println!("{}", serde_json::to_string_pretty(&st)?);
                    } else {
                        print!("{st}");
                    }
                }
                Err(_) => {
                    let left = leftovers(&name)?;
                    if json {
                        println!(
                            "{}",
                            serde_json::json!({ "name": name, "exists": false, "namespaces": left })
                        );
                    } else if left.is_empty() {
                        println!("lab {name}: nothing exists");
                    } else {
                        println!("lab {name}: no state file, but namespaces remain: {}", left.join(" "));
                        println!("run `palisade lab down --name {name}`");
                    }
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        LabCmd::Exec {
            name,
            state_dir,
            timeout,
            vm,
            cmd,
        } => {
            let lab = Lab::load(&state(&name, state_dir)).with_context(|| format!("lab {name} is not up"))?;
            let argv: Vec<&str> = cmd.iter().map(String::as_str).collect();
            let out = lab.exec(&vm, &argv, Duration::from_secs(timeout))?;
            use std::io::Write;
            std::io::stdout().write_all(&out.stdout)?;
            std::io::stderr().write_all(&out.stderr)?;
            let code = out.status.code().unwrap_or(1);
            Ok(ExitCode::from(u8::try_from(code).unwrap_or(1)))
        }
        LabCmd::ChainPolicy {
            example,
            out,
            chain,
            no_redirect,
            with_vms,
            on_failure,
            policy_version,
        } => {
            use palisade_lab::lab::appliance::{Chain, ChainPolicy, write_chain_policy};
            let extra: Vec<&str> = with_vms.iter().map(String::as_str).collect();
            let spec = ChainPolicy {
                chain: match chain {
                    ChainArg::Vm => Chain::Vm,
                    ChainArg::TwoStage => Chain::TwoStage,
                    ChainArg::External => Chain::External,
                },
                redirect: !no_redirect,
                extra_vms: &extra,
                on_failure: &on_failure,
                version: policy_version,
            };
            write_chain_policy(&example, &out, &spec)?;
            Ok(ExitCode::SUCCESS)
        }
        LabCmd::Appliance { name, state_dir, cmd } => {
            use palisade_lab::lab::appliance::ApplianceAt;
            let lab = Lab::load(&state(&name, state_dir)).with_context(|| format!("lab {name} is not up"))?;
            match cmd {
                ApplianceCmd::Bridge { vm, table, rules } => lab.bridge_appliance(&vm, &table, &rules)?,
                ApplianceCmd::External { zone, table, rules } => {
                    println!("{}", lab.external_appliance(&zone, &table, &rules)?);
                }
                ApplianceCmd::Counters { vm, netns, table } => {
                    let at = match (&vm, &netns) {
                        (_, Some(ns)) => ApplianceAt::Netns(ns),
                        (Some(vm), None) => ApplianceAt::Vm(vm),
                        (None, None) => bail!("give a VM or --netns"),
                    };
                    for n in lab.appliance_counters(at, &table)? {
                        println!("{n}");
                    }
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        LabCmd::Serve(ServeCmd::Dns {
            zone_file,
            policy,
            listen,
        }) => {
            let records = match (zone_file, policy) {
                (Some(f), _) => {
                    let text = std::fs::read_to_string(&f).with_context(|| format!("reading {}", f.display()))?;
                    dns::Records::parse_zone_file(&text).map_err(|e| anyhow::anyhow!("{}: {e}", f.display()))?
                }
                (None, Some(dir)) => dns::Records::from_inventory(&load_inventory(&dir)?),
                (None, None) => bail!("give --zone-file or --policy"),
            };
            let sock = UdpSocket::bind(listen).with_context(|| format!("binding {listen}"))?;
            eprintln!("dns: {} names on {listen}", records.len());
            dns::serve(&sock, &records, None).context("serving DNS")?;
            Ok(ExitCode::SUCCESS)
        }
        LabCmd::SynthState {
            template,
            count,
            dst_port,
            out,
        } => {
            let blob = std::fs::read(&template).with_context(|| format!("reading {}", template.display()))?;
            let synth =
                synth_state(&blob, count, dst_port).with_context(|| format!("template {}", template.display()))?;
            std::fs::write(&out, &synth).with_context(|| format!("writing {}", out.display()))?;
            println!("{count} connections, {} bytes", synth.len());
            Ok(ExitCode::SUCCESS)
        }
        LabCmd::Serve(ServeCmd::Stream { port, bind }) => {
            let l = TcpListener::bind((bind, port)).with_context(|| format!("binding {bind}:{port}"))?;
            eprintln!("stream: listening on {bind}:{port}");
            stream::serve(&l, stream::INTERVAL).context("serving the stream")?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// `count` copies of `template`'s first established connection's record, each with its
/// own source port (1024 upwards), destination port (`dst_port` upwards,
/// one per 64,000) and last byte of the responder's address (2..=252), as
/// one verified blob for the template's vNIC.
fn synth_state(template: &[u8], count: u32, dst_port: u16) -> anyhow::Result<Vec<u8>> {
    use palisade_datapath::state;
    let snap = state::decode(template)?;
    if template[6..8] != state::VERSION.to_be_bytes() {
        bail!("not a version {} blob", state::VERSION);
    }
    // An established connection: one closing would expire (in 2 minutes)
    // with all its copies in the middle of a benchmark.
    let Some(first) = snap
        .conns
        .iter()
        .position(|c| c.state == palisade_datapath::ConnState::Established)
    else {
        bail!("it holds no established connection to copy");
    };
    // magic (6) | version (2) | policy version (8) | name length (2) | name | count (4) | records | crc (4)
    let header = 18 + usize::from(u16::from_be_bytes([template[16], template[17]]));
    let at = header + 4 + first * state::RECORD_LEN;
    let record = &template[at..at + state::RECORD_LEN];
    let mut out = Vec::with_capacity(header + 8 + count as usize * state::RECORD_LEN);
    out.extend_from_slice(&template[..header]);
    out.extend_from_slice(&count.to_be_bytes());
    for i in 0..count {
        let mut r = record.to_vec();
        // segment (4) | src (16) | dst (16) | src port (2) | dst port (2) | ...
        // The responder's last address byte varies too, so the connections
        // spread over the destination's workers as real peers' would (the
        // steering hashes the addresses only).
        r[35] = (i % 251) as u8 + 2;
        r[36..38].copy_from_slice(&(1024 + (i % 64_000) as u16).to_be_bytes());
        let dport = dst_port
            .checked_add((i / 64_000) as u16)
            .context("too many connections for the port range")?;
        r[38..40].copy_from_slice(&dport.to_be_bytes());
        out.extend_from_slice(&r);
    }
    let crc = state::crc32(&out);
    out.extend_from_slice(&crc.to_be_bytes());
    let check = state::decode(&out)?;
    if check.conns.len() != count as usize {
        bail!("wrote {} connections, not {count}", check.conns.len());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use palisade_datapath::{Conn, ConnState, state};
    use palisade_wire::flow::{FlowKey, Segment};
    use palisade_wire::ip::IpProtocol;

    fn conn(sport: u16, s: ConnState) -> Conn {
        let v4 = |last: u8| {
            let mut a = [0u8; 16];
            a[10] = 0xff;
            a[11] = 0xff;
            a[12..].copy_from_slice(&[10, 10, 0, last]);
            a
        };
        let key = FlowKey {
            segment: Segment::vlan(10),
            src: v4(10),
            dst: v4(11),
            src_port: sport,
            dst_port: 80,
            protocol: IpProtocol(6),
            icmp_type: 0,
            icmp_code: 0,
        };
        let mut c = Conn::new(key, 1_000);
        c.state = s;
        c
    }

    #[test]
    fn synthetic_state_copies_an_established_connection_with_keys_of_its_own() {
        let template = state::encode(
            "vm1.0",
            3,
            &[conn(40000, ConnState::CloseWait), conn(40001, ConnState::Established)],
            2_000,
        );
        let blob = synth_state(&template, 1000, 9).unwrap();
        let snap = state::decode(&blob).unwrap();
        assert_eq!(
            (snap.vnic.as_str(), snap.policy_version, snap.conns.len()),
            ("vm1.0", 3, 1000)
        );
        assert!(snap.conns.iter().all(|c| c.state == ConnState::Established));
        let keys: std::collections::BTreeSet<_> = snap.conns.iter().map(|c| c.key).collect();
        assert_eq!(keys.len(), 1000, "every copy has a key of its own");
        assert!(snap.conns.iter().all(|c| c.key.src == conn(0, ConnState::New).key.src));

        // A template holding only a closing connection, none, or garbage is refused.
        let closing = state::encode("vm1.0", 3, &[conn(40000, ConnState::CloseWait)], 2_000);
        let empty = state::encode("vm1.0", 3, &[], 2_000);
        for bad in [&closing[..], &empty[..], b"PLSDCT\0\x02junk"] {
            assert!(synth_state(bad, 10, 9).is_err());
        }
    }
}
