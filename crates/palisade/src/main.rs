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
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Pcap(c) => cmd::pcap::run(c),
        Command::Policy(c) => cmd::policy::run(c),
        Command::Bench(c) => cmd::bench::run(c),
        Command::Replay(a) => cmd::replay::run(a),
    };
    match result {
        Ok(code) => code,
        Err(err) => {
            eprintln!("palisade: error: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
