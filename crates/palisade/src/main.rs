//! The `palisade` binary: one CLI for every Palisade role.
//!
//! Each subcommand lives in its own module under [`cmd`]; this file only parses
//! arguments and dispatches, and turns errors into a non-zero exit with context.

mod cmd;

use clap::{Parser, Subcommand};

/// Palisade: a distributed, VM-aware firewall for hypervisor hosts.
#[derive(Parser, Debug)]
#[command(name = "palisade", version, about, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Inspect packet captures (pcap, pcapng, gzip-compressed either).
    #[command(subcommand)]
    Pcap(cmd::pcap::PcapCmd),
    /// Check, compile, explain and analyze policy.
    #[command(subcommand)]
    Policy(cmd::policy::PolicyCmd),
    /// Run a capture through the datapath engine and print verdicts per flow.
    Replay(cmd::replay::ReplayArgs),
    /// Benchmarks printing machine-readable results.
    #[command(subcommand)]
    Bench(cmd::bench::BenchCmd),
    /// Run the host agent: the datapath on this host's vNIC interfaces.
    Agent(cmd::agent::AgentArgs),
    /// Attach VMs' vNICs to this host's agent (libvirt XML, virsh).
    #[command(subcommand)]
    Vnic(cmd::vnic::VnicCmd),
    /// Build, inspect and remove a small virtual datacenter on this machine.
    #[command(subcommand)]
    Lab(cmd::lab::LabCmd),
    /// Bring up the lab with the three-tier example, drive traffic and show verdicts live.
    Demo(cmd::demo::DemoArgs),
    /// Verify and export the tamper-evident audit trail.
    #[command(subcommand)]
    Audit(cmd::audit::AuditCmd),
    /// Query recorded flows.
    Flows(cmd::audit::FlowsArgs),
    /// Show inline inspection's recent alerts from an agent (both ends' identity).
    Alerts(cmd::alerts::AlertsArgs),
    /// Run the controller: API, versioned policy, agents' channel.
    Controller(cmd::controller::ControllerArgs),
    /// Make the certificates of the agent↔controller channel.
    #[command(subcommand)]
    Ca(cmd::ca::CaCmd),
    /// Apply a policy directory on the controller as a new version.
    Apply(cmd::ctl::ApplyArgs),
    /// Show hosts, VMs, policy, agents, changes or tokens from the controller.
    Get(cmd::ctl::GetArgs),
    /// Show what applying a policy directory would change.
    Diff(cmd::ctl::DiffArgs),
    /// Make an earlier policy version current again.
    Rollback(cmd::ctl::RollbackArgs),
    /// Set or remove tags on a VM through the controller.
    Tag(cmd::ctl::TagArgs),
    /// Live-migrate a VM to another host through the controller (its firewall state with it).
    Migrate(cmd::migrate::MigrateArgs),
    /// Revoke an API token on the controller.
    Revoke(cmd::ctl::RevokeArgs),
    /// Run the signature engine offline over a capture (Suricata rule language subset).
    #[command(subcommand)]
    Ids(cmd::ids::IdsCmd),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    // Output piped into `head` and closed early ends a command quietly, as
    // for any Unix tool, instead of panicking on a broken pipe. Not the
    // daemons: a peer that closes its socket before the answer (a control
    // client, a migration's source agent going away) must cost them an
    // EPIPE on that socket, not the process.
    if !matches!(cli.command, Command::Agent(_) | Command::Controller(_)) {
        // SAFETY: called before any thread starts; SIG_DFL is a valid disposition.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    let result = match cli.command {
        Command::Pcap(c) => cmd::pcap::run(c),
        Command::Policy(c) => cmd::policy::run(c),
        Command::Bench(c) => cmd::bench::run(c),
        Command::Replay(a) => cmd::replay::run(a),
        Command::Agent(a) => cmd::agent::run(a),
        Command::Lab(c) => cmd::lab::run(c),
        Command::Vnic(c) => cmd::vnic::run(c),
        Command::Demo(a) => cmd::demo::run(a),
        Command::Audit(c) => cmd::audit::run(c),
        Command::Flows(a) => cmd::audit::flows(a),
        Command::Alerts(a) => cmd::alerts::run(a),
        Command::Controller(a) => cmd::controller::run(a),
        Command::Ca(c) => cmd::ca::run(c),
        Command::Apply(a) => cmd::ctl::apply(a),
        Command::Get(a) => cmd::ctl::get(a),
        Command::Diff(a) => cmd::ctl::diff(a),
        Command::Rollback(a) => cmd::ctl::rollback(a),
        Command::Tag(a) => cmd::ctl::tag(a),
        Command::Migrate(a) => cmd::migrate::run(a),
        Command::Revoke(a) => cmd::ctl::revoke(a),
        Command::Ids(c) => cmd::ids::run(c),
    };
    match result {
        Ok(code) => code,
        Err(err) => {
            eprintln!("palisade: error: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    /// clap checks a command's definition only when it parses through it
    /// (a `--version` argument beside the binary's own flag, say, panics
    /// then): every subcommand is checked here instead.
    #[test]
    fn the_command_line_is_well_formed() {
        use clap::CommandFactory;
        super::Cli::command().debug_assert();
    }
}
