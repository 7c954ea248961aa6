//! `palisade agent`: the datapath on this host's vNIC interfaces.
//!
//! Prints `agent ready` once every port is attached (the lab waits for that
//! line), serves until SIGTERM or SIGINT, then saves connection state for the
//! next start and exits 0.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use anyhow::Context;
use palisade_agent::{Agent, AgentConfig};

/// Arguments of `palisade agent`.
#[derive(clap::Args, Debug)]
pub struct AgentArgs {
    /// The agent's configuration file.
    #[arg(long)]
    pub config: PathBuf,
}

/// Run the agent.
pub fn run(args: AgentArgs) -> anyhow::Result<ExitCode> {
    let config = AgentConfig::load(&args.config)?;
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
