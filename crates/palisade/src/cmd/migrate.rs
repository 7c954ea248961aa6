//! `palisade migrate VM --to HOST`: order a live migration through the
//! controller and follow it until the source host's agent reports its outcome.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use palisade_api::migration::{MigrationKind, MigrationOrder, MigrationState};
use palisade_api::validate::Escaped;

use super::ctl::Conn;

/// Arguments of `palisade migrate`.
#[derive(clap::Args, Debug)]
pub struct MigrateArgs {
    /// The VM.
    pub vm: String,
    /// The host it goes to.
    #[arg(long)]
    pub to: String,
    /// Return once the order is stored instead of following it.
    #[arg(long)]
    pub no_wait: bool,
    /// How long to follow it, seconds (the controller fails an order with no
    /// outcome after its own deadline).
    #[arg(long, default_value_t = 600)]
    pub timeout: u64,
    /// Print the order as JSON.
    #[arg(long)]
    pub json: bool,
    /// Connection.
    #[command(flatten)]
    pub conn: Conn,
}

fn show(o: &MigrationOrder, json: bool) -> String {
    if json {
        return serde_json::to_string(o).unwrap_or_default();
    }
    let mut line = format!(
        "{} {} -> {}: {} (order {})",
        Escaped(&o.vm),
        Escaped(&o.from),
        Escaped(&o.to),
        o.state.name(),
        Escaped(&o.id)
    );
    if o.kind == MigrationKind::Follow {
        line.push_str(", detected (moved without the controller; its state follows)");
    }
    if let Some(c) = o.connections {
        line.push_str(&format!(", {c} connections"));
    }
    if let Some(us) = o.switchover_us {
        line.push_str(&format!(", state moved in {:.1} ms", us as f64 / 1e3));
    }
    if let Some(h) = &o.state_blake3 {
        line.push_str(&format!(", state blake3 {}", Escaped(h)));
    }
    if let Some(r) = &o.reason {
        line.push_str(&format!(": {}", Escaped(r)));
    }
    line
}

/// Run `palisade migrate`.
pub fn run(a: MigrateArgs) -> anyhow::Result<ExitCode> {
    let client = a.conn.client()?;
    let order = client.migrate(&a.vm, &a.to).context("migrate")?;
    if a.no_wait {
        println!("{}", show(&order, a.json));
        return Ok(ExitCode::SUCCESS);
    }
    if !a.json {
        println!("{}", show(&order, false));
    }
    let deadline = Instant::now() + Duration::from_secs(a.timeout);
    let mut last = order.state;
    loop {
        std::thread::sleep(Duration::from_millis(200));
        let o = client.migration(&a.vm).context("following the migration")?;
        if o.id != order.id {
            bail!(
                "the VM's order is now {}, not {} (ordered again meanwhile)",
                Escaped(&o.id),
                Escaped(&order.id)
            );
        }
        if o.state != last && !a.json {
            println!("{}", show(&o, false));
        }
        last = o.state;
        if o.state.is_final() {
            if a.json {
                println!("{}", show(&o, true));
            }
            return Ok(if o.state == MigrationState::Completed {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            });
        }
        if Instant::now() >= deadline {
            bail!("the migration is still {} after {} s", o.state.name(), a.timeout);
        }
    }
}
