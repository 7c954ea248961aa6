//! `palisade lab up|down|status|exec`: a small virtual datacenter on this machine.
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
    /// Traffic helpers run inside the lab.
    #[command(subcommand, hide = true)]
    Serve(ServeCmd),
}

/// `--qemu-nic`.
#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum QemuNicArg {
    /// vhost-user sockets served by the agent.
    VhostUser,
    /// Taps in the host namespace.
    Tap,
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
        LabCmd::Serve(ServeCmd::Stream { port, bind }) => {
            let l = TcpListener::bind((bind, port)).with_context(|| format!("binding {bind}:{port}"))?;
            eprintln!("stream: listening on {bind}:{port}");
            stream::serve(&l, stream::INTERVAL).context("serving the stream")?;
            Ok(ExitCode::SUCCESS)
        }
    }
}
