//! `palisade policy`: check, compile, explain and analyze a policy directory.
//!
//! Everything here is presentation; the work is done by `palisade_policy`.
//! Commands that need a valid policy print its diagnostics and exit 1 when
//! there is any error, so a CI job can run any of them directly.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, bail};
use palisade_policy::analyze::analyze;
use palisade_policy::compile::Compiler;
use palisade_policy::eval::{Direction, explain, flow_for, render_explanation, resolve_endpoint};
use palisade_policy::{DirSource, Loaded, load};

/// `palisade policy` subcommands.
#[derive(clap::Subcommand, Debug)]
pub enum PolicyCmd {
    /// Load and validate a policy directory; print every error and warning.
    Check {
        /// Directory of YAML files (or one file).
        dir: PathBuf,
        /// Print diagnostics as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Compile per-vNIC egress and ingress chains.
    Compile {
        /// Directory of YAML files (or one file).
        dir: PathBuf,
        /// Only this vNIC.
        #[arg(long)]
        vnic: Option<String>,
        /// Print JSON instead of tables.
        #[arg(long)]
        json: bool,
    },
    /// Show how a flow is decided: every rule consulted at each level, and why.
    Explain {
        /// Directory of YAML files (or one file).
        dir: PathBuf,
        /// Source: VM name, vNIC name or IP address.
        #[arg(long)]
        from: String,
        /// Destination: VM name, vNIC name or IP address.
        #[arg(long)]
        to: String,
        /// Service: `tcp/443`, `udp/53`, `icmp/echo-request`, or a service name.
        #[arg(long)]
        service: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Report shadowed, redundant, conflicting and unused rules.
    Analyze {
        /// Directory of YAML files (or one file).
        dir: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Replay recorded flows against a candidate policy; list those whose verdict would change.
    WhatIf(super::whatif::WhatIfArgs),
}

fn load_dir(dir: &PathBuf) -> anyhow::Result<Loaded> {
    load(&DirSource::new(dir)).with_context(|| format!("loading policy from {}", dir.display()))
}

/// Load, and stop with the diagnostics if the policy has errors.
fn load_valid(dir: &PathBuf) -> anyhow::Result<Result<Loaded, ExitCode>> {
    let loaded = load_dir(dir)?;
    if loaded.has_errors() {
        eprint!("{}", loaded.render());
        eprintln!("policy has errors; run `palisade policy check` for details");
        return Ok(Err(ExitCode::FAILURE));
    }
    // Warnings do not stop the command, but are worth seeing (a CIDR read
    // as its network, an empty group).
    if !loaded.diagnostics.is_empty() {
        eprint!("{}", loaded.render());
    }
    Ok(Ok(loaded))
}

/// Run a `palisade policy` subcommand.
pub fn run(cmd: PolicyCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        PolicyCmd::WhatIf(args) => super::whatif::run(args),
        PolicyCmd::Check { dir, json } => {
            let loaded = load_dir(&dir)?;
            let errors = loaded.diagnostics.iter().filter(|d| d.is_error()).count();
            let warnings = loaded.diagnostics.len() - errors;
            if json {
                println!("{}", serde_json::to_string_pretty(&loaded.diagnostics)?);
            } else {
                print!("{}", loaded.render());
                let m = &loaded.model;
                println!(
                    "{}: {errors} error(s), {warnings} warning(s); {} VMs, {} zones, {} groups, {} rules, policy version {}",
                    dir.display(),
                    m.inventory.vms.len(),
                    m.inventory.zones.len(),
                    m.policy.groups.len(),
                    m.policy.rules.len(),
                    m.policy.version
                );
            }
            Ok(if errors > 0 {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            })
        }
        PolicyCmd::Compile { dir, vnic, json } => {
            let loaded = match load_valid(&dir)? {
                Ok(l) => l,
                Err(code) => return Ok(code),
            };
            let compiler = Compiler::new(loaded.model).context("compiling policy")?;
            let chains: Vec<_> = match &vnic {
                Some(n) => {
                    let pair: Vec<_> = [Direction::Egress, Direction::Ingress]
                        .iter()
                        .filter_map(|d| compiler.chain(n, *d))
                        .collect();
                    if pair.is_empty() {
                        bail!("no vNIC named \"{n}\" in the inventory");
                    }
                    pair
                }
                None => compiler.chains().collect(),
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&chains)?);
            } else {
                for c in chains {
                    println!("{}", c.render());
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        PolicyCmd::Explain {
            dir,
            from,
            to,
            service,
            json,
        } => {
            let loaded = match load_valid(&dir)? {
                Ok(l) => l,
                Err(code) => return Ok(code),
            };
            let inv = &loaded.model.inventory;
            let src = resolve_endpoint(inv, &from)
                .with_context(|| format!("--from {from}: not a VM, a vNIC or an IP address"))?;
            let dst =
                resolve_endpoint(inv, &to).with_context(|| format!("--to {to}: not a VM, a vNIC or an IP address"))?;
            let flow = flow_for(&loaded.model.policy, src, dst, &service).with_context(|| {
                format!(
                    "--service {service}: expected tcp/PORT, udp/PORT, icmp/TYPE[/CODE], ip/PROTO or a service name"
                )
            })?;
            let e = explain(&loaded.model, &flow);
            if json {
                println!("{}", serde_json::to_string_pretty(&e)?);
            } else {
                print!("{}", render_explanation(&e));
            }
            Ok(ExitCode::SUCCESS)
        }
        PolicyCmd::Analyze { dir, json } => {
            let loaded = match load_valid(&dir)? {
                Ok(l) => l,
                Err(code) => return Ok(code),
            };
            let compiler = Compiler::new(loaded.model.clone()).context("compiling policy")?;
            let findings = analyze(&loaded.model, &compiler);
            if json {
                println!("{}", serde_json::to_string_pretty(&findings)?);
            } else {
                for f in &findings {
                    println!("{f}");
                    if let Some(ex) = &f.example {
                        println!("    e.g. on {ex}");
                    }
                }
                println!(
                    "{} finding(s) in {} rules",
                    findings.len(),
                    loaded.model.policy.rules.len()
                );
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}
