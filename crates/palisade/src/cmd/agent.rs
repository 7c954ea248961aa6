//! `palisade agent`: the datapath on this host's vNIC interfaces.
//!
//! Prints `agent ready` once every port is attached (the lab waits for that
//! line), serves until SIGTERM or SIGINT, then saves connection state for the
//! next start and exits 0.
//!
//! `palisade agent fallback arm|disarm|status --state-dir DIR` drives the
//! fail-open fallback ([`palisade_agent::fallback`]); `palisade agent
//! supervise --config FILE` runs the agent under a supervisor that arms it
//! when the agent dies ([`palisade_agent::supervise`]).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use anyhow::Context;
use palisade_agent::{Agent, AgentConfig};

/// Arguments of `palisade agent`.
#[derive(clap::Args, Debug)]
#[command(args_conflicts_with_subcommands = true)]
pub struct AgentArgs {
    /// The agent's configuration file.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// The fail-open fallback, or the supervisor.
    #[command(subcommand)]
    pub command: Option<AgentCommand>,
}

/// `palisade agent` subcommands.
#[derive(clap::Subcommand, Debug)]
pub enum AgentCommand {
    /// The fail-open fallback of `on_failure: open` zones (kernel bridges),
    /// armed only while the agent is gone.
    Fallback {
        /// What to do.
        #[arg(value_enum)]
        action: FallbackAction,
        /// The agent's state directory (its fallback plan and lock).
        #[arg(long)]
        state_dir: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Run the agent as a child: arm the fallback when it dies, restart it
    /// with backoff (hosts without systemd).
    Supervise {
        /// The agent's configuration file.
        #[arg(long)]
        config: PathBuf,
        /// Stop after this many restarts (default: never).
        #[arg(long)]
        max_restarts: Option<u32>,
        /// Milliseconds before the first restart (doubling on each quick
        /// death, up to 10 s; reset after 30 s of running).
        #[arg(long, default_value_t = 200)]
        restart_delay_ms: u64,
    },
}

/// What `palisade agent fallback` does.
#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum FallbackAction {
    /// Build the plan's bridges (refused while the agent runs).
    Arm,
    /// Remove every fallback device.
    Disarm,
    /// Show the plan, the devices and the armed record.
    Status,
}

/// Run the agent, or one of its subcommands.
pub fn run(args: AgentArgs) -> anyhow::Result<ExitCode> {
    match args.command {
        Some(AgentCommand::Fallback {
            action,
            state_dir,
            json,
        }) => return fallback(action, &state_dir, json),
        Some(AgentCommand::Supervise {
            config,
            max_restarts,
            restart_delay_ms,
        }) => return supervise(config, max_restarts, restart_delay_ms),
        None => {}
    }
    let Some(config) = args.config else {
        anyhow::bail!("palisade agent: --config FILE is required (or a subcommand: fallback, supervise)");
    };
    let config = AgentConfig::load(&config)?;
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(sig, stop.clone()).context("installing signal handlers")?;
    }
    let host = config.host.clone();
    let mut agent = Agent::start(config, stop.clone()).with_context(|| format!("starting the agent of {host}"))?;
    println!(
        "palisade agent {host}: policy version {}, {} port(s), {} worker(s); agent ready",
        agent.policy_version(),
        agent.ports(),
        agent.workers()
    );
    agent.run(&stop)?;
    let saved = agent.shutdown()?;
    println!("palisade agent {host}: stopped; saved {saved} connection(s) for the next start");
    Ok(ExitCode::SUCCESS)
}

fn fallback(action: FallbackAction, state_dir: &Path, json: bool) -> anyhow::Result<ExitCode> {
    use palisade_agent::fallback;
    match action {
        FallbackAction::Arm => {
            let started = std::time::Instant::now();
            let r =
                fallback::arm(state_dir).with_context(|| format!("arming the fallback of {}", state_dir.display()))?;
            if json {
                print(&r)?;
            } else {
                match &r.armed {
                    Some(a) => println!(
                        "fail-open fallback armed: zone(s) {} forward unfiltered on {} interface(s) ({} ms)",
                        a.zones.join(","),
                        a.interfaces.len(),
                        started.elapsed().as_millis()
                    ),
                    None => println!("no open zone in the fallback plan: every zone stays closed"),
                }
                if !r.missing.is_empty() {
                    println!("interfaces missing: {}", r.missing.join(","));
                }
                if !r.foreign.is_empty() {
                    println!("interfaces in another bridge, left alone: {}", r.foreign.join(","));
                }
            }
        }
        FallbackAction::Disarm => {
            let r = fallback::disarm(state_dir)?;
            if json {
                print(&r)?;
            } else {
                println!("removed {} device(s): {}", r.removed.len(), r.removed.join(","));
                if let Some(e) = &r.episode {
                    println!("zone(s) {} were open for {} ms", e.zones.join(","), e.active_ms());
                }
            }
        }
        FallbackAction::Status => {
            let s = fallback::status(state_dir)?;
            if json {
                print(&s)?;
            } else {
                match &s.open_zones {
                    None => println!("plan: none (every zone fails closed)"),
                    Some(z) => println!(
                        "plan: open zone(s) [{}], closed zone(s) [{}]",
                        z.join(","),
                        s.closed_zones.join(",")
                    ),
                }
                println!("agent: {}", if s.agent_running { "running" } else { "not running" });
                match &s.armed {
                    Some(a) => {
                        let now = std::time::SystemTime::now()
                            .duration_since(std::time::UNIX_EPOCH)
                            .map_or(0, |d| d.as_nanos() as u64);
                        println!(
                            "armed: zone(s) {} for {} ms",
                            a.zones.join(","),
                            now.saturating_sub(a.armed_at_ns) / 1_000_000
                        );
                    }
                    None => println!("armed: no"),
                }
                for (dev, ports) in &s.devices {
                    println!("device {dev}: {}", ports.join(","));
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn print<T: serde::Serialize>(v: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

fn supervise(config: PathBuf, max_restarts: Option<u32>, restart_delay_ms: u64) -> anyhow::Result<ExitCode> {
    // Read here so that a broken file fails now, not once per restart.
    let parsed = AgentConfig::load(&config)?;
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(sig, stop.clone()).context("installing signal handlers")?;
    }
    std::fs::create_dir_all(&parsed.state_dir)
        .with_context(|| format!("state directory {}", parsed.state_dir.display()))?;
    let s = palisade_agent::supervise::Supervised {
        exe: std::env::current_exe().context("finding this binary")?,
        config,
        state_dir: parsed.state_dir,
        max_restarts,
        restart_delay: std::time::Duration::from_millis(restart_delay_ms),
    };
    let last = palisade_agent::supervise::run(&s, &stop).context("supervising the agent")?;
    Ok(match last {
        Some(st) if st.success() => ExitCode::SUCCESS,
        None => ExitCode::SUCCESS,
        Some(_) => ExitCode::FAILURE,
    })
}
