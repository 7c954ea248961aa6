//! `palisade vnic attach`: a VM's vNICs as libvirt `<interface>` XML for
//! this host's agent, applied with `virsh` when asked.
//!
//! Presentation only: what to attach, and how, is decided by
//! `palisade_agent::attach` from the inventory and the agent configuration.

use std::path::PathBuf;
use std::process::{Command, ExitCode};

use anyhow::{Context, bail};
use palisade_agent::AgentConfig;
use palisade_agent::attach::{self, AttachKind};
use palisade_policy::model::Inventory;

/// Subcommands of `palisade vnic`.
#[derive(clap::Subcommand, Debug)]
pub enum VnicCmd {
    /// Attach a VM's vNICs to this host's agent: print the libvirt
    /// `<interface>` XML (vhost-user, or a tap with --tap), or apply it with
    /// `virsh attach-device --live --config`.
    Attach(AttachArgs),
}

/// `palisade vnic attach`.
#[derive(clap::Args, Debug)]
pub struct AttachArgs {
    /// The VM (its inventory name).
    pub vm: String,
    /// Only this vNIC (its inventory name); default: all of the VM's.
    #[arg(long)]
    pub vnic: Option<String>,
    /// Libvirt domain XML (the only form so far; required so the output is explicit).
    #[arg(long, required = true)]
    pub libvirt: bool,
    /// Attach through the tap the agent reads instead of its vhost-user socket.
    #[arg(long)]
    pub tap: bool,
    /// Run `virsh attach-device DOMAIN FILE --live --config` for each vNIC.
    #[arg(long)]
    pub apply: bool,
    /// The agent's configuration file (how each vNIC is bound on this host).
    #[arg(long)]
    pub config: PathBuf,
    /// The policy directory whose inventory names the VM (default: the
    /// agent's `policy`, or in controller mode the last policy it saved).
    #[arg(long)]
    pub policy: Option<PathBuf>,
    /// The libvirt domain (default: the VM's UUID from the inventory).
    #[arg(long)]
    pub domain: Option<String>,
}

/// Run a vnic subcommand.
pub fn run(cmd: VnicCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        VnicCmd::Attach(a) => attach_cmd(a),
    }
}

fn inventory(config: &AgentConfig, policy: Option<PathBuf>) -> anyhow::Result<Inventory> {
    if let Some(dir) = policy.or_else(|| config.policy.clone()) {
        let loaded = palisade_policy::load(&palisade_policy::DirSource::new(&dir))
            .with_context(|| format!("loading {}", dir.display()))?;
        if loaded.has_errors() {
            bail!("{}: {}", dir.display(), loaded.render());
        }
        return Ok(loaded.model.inventory);
    }
    let mut loader = palisade_policy::load::Loader::new();
    match palisade_agent::upstream::load_saved(&config.state_dir, &mut loader) {
        Some((_, compiler)) => Ok(compiler.model().inventory.clone()),
        None => bail!(
            "no inventory: the agent takes its policy from the controller and has none saved in {}; give --policy",
            config.state_dir.display()
        ),
    }
}

fn attach_cmd(a: AttachArgs) -> anyhow::Result<ExitCode> {
    let config = AgentConfig::load(&a.config)?;
    let inv = inventory(&config, a.policy)?;
    let kind = if a.tap { AttachKind::Tap } else { AttachKind::VhostUser };
    let mut plan = attach::plan(&config, &inv, &a.vm, a.vnic.as_deref(), kind)?;
    if let Some(d) = a.domain {
        plan.domain = d;
    }
    if let Some(mb) = plan.memory_backing {
        eprintln!(
            "palisade: the domain's RAM must be shared with the agent (vhost-user): its definition needs\n{}",
            mb.trim_end()
        );
    }
    if !a.apply {
        for v in &plan.vnics {
            println!(
                "<!-- {} of {}: virsh attach-device {} FILE --live --config -->",
                v.vnic, a.vm, plan.domain
            );
            print!("{}", v.interface_xml());
        }
        return Ok(ExitCode::SUCCESS);
    }
    match Command::new("virsh").arg("--version").output() {
        Ok(o) if o.status.success() => {}
        Ok(o) => bail!("virsh --version failed: {}", String::from_utf8_lossy(&o.stderr).trim()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            for v in &plan.vnics {
                print!("{}", v.interface_xml());
            }
            eprintln!(
                "palisade: virsh is not installed: nothing applied. Attach the XML above with \
                 `virsh attach-device {} FILE --live --config` where libvirt runs.",
                plan.domain
            );
            return Ok(ExitCode::FAILURE);
        }
        Err(e) => bail!("running virsh: {e}"),
    }
    let dir = std::env::temp_dir().join(format!("palisade-attach-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let result = (|| {
        for v in &plan.vnics {
            let file = dir.join(format!("{}.xml", v.vnic.replace('/', "_")));
            std::fs::write(&file, v.interface_xml()).with_context(|| format!("writing {}", file.display()))?;
            let out = Command::new("virsh")
                .args(attach::virsh_attach_args(&plan.domain, &file))
                .output()
                .context("running virsh")?;
            if !out.status.success() {
                bail!(
                    "virsh attach-device {} for {}: {}",
                    plan.domain,
                    v.vnic,
                    String::from_utf8_lossy(&out.stderr).trim()
                );
            }
            println!("attached {} of {} to domain {}", v.vnic, a.vm, plan.domain);
        }
        Ok(())
    })();
    let _ = std::fs::remove_dir_all(&dir);
    result.map(|()| ExitCode::SUCCESS)
}
