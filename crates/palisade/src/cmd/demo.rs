//! `palisade demo`: the lab, the three-tier policy, real traffic, live verdicts.
//!
//! Brings up the lab (`palisade lab up`) from the examples' three-tier
//! inventory and policy with a Palisade agent per host, starts servers in the
//! VMs (HTTP, an app API, a long-lived "database" stream, DNS, an SSH
//! listener), then drives a script of real connections — each with the
//! outcome the policy prescribes — and prints what happened next to the flow
//! records the agents made: verdict, deciding rule and level. `--once` runs
//! the script, prints, tears everything down and exits non-zero if any
//! connection did not behave as the policy says; without it the flow table
//! refreshes until Ctrl-C, then everything is torn down.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use palisade_audit::record::{FlowRecord, Phase};
use palisade_lab::{Lab, LabSpec, Spawned};

/// Arguments of `palisade demo`.
#[derive(clap::Args, Debug)]
pub struct DemoArgs {
    /// Run the traffic script once, print the flow table, tear everything down and exit.
    #[arg(long)]
    pub once: bool,
    /// The policy directory (inventory and rules) to build the lab from.
    #[arg(long)]
    pub policy: Option<PathBuf>,
    /// Lab name (prefix of every namespace it creates).
    #[arg(long, default_value = "pal")]
    pub name: String,
    /// Agents read the policy directory themselves instead of taking it from a controller.
    #[arg(long)]
    pub standalone: bool,
}

/// One scripted connection attempt.
struct Step {
    what: &'static str,
    from: &'static str,
    to: &'static str,
    service: &'static str,
    allowed: bool,
    /// The rule that must decide it.
    rule: &'static str,
}

const SCRIPT: &[Step] = &[
    Step {
        what: "HTTP from the internet to web-1",
        from: "internet",
        to: "web-1",
        service: "tcp/80",
        allowed: true,
        rule: "web-from-internet",
    },
    Step {
        what: "HTTP from the internet to web-2 (other host)",
        from: "internet",
        to: "web-2",
        service: "tcp/80",
        allowed: true,
        rule: "web-from-internet",
    },
    Step {
        what: "SSH from the internet to web-1",
        from: "internet",
        to: "web-1",
        service: "tcp/22",
        allowed: false,
        rule: "dc-deny-internet-ssh",
    },
    Step {
        what: "web-1 calls the app API on app-1",
        from: "web-1",
        to: "app-1",
        service: "tcp/8080",
        allowed: true,
        rule: "web-to-app",
    },
    Step {
        what: "web-2 calls the app API on app-2",
        from: "web-2",
        to: "app-2",
        service: "tcp/8080",
        allowed: true,
        rule: "web-to-app",
    },
    Step {
        what: "web-1 tries the database directly",
        from: "web-1",
        to: "db-1",
        service: "tcp/5432",
        allowed: false,
        rule: "prod-no-web-to-db",
    },
    Step {
        what: "app-2 opens a long-lived database session",
        from: "app-2",
        to: "db-1",
        service: "tcp/5432",
        allowed: true,
        rule: "app-to-db",
    },
    Step {
        what: "DNS lookup from web-1",
        from: "web-1",
        to: "dns-1",
        service: "udp/53",
        allowed: true,
        rule: "dc-dns",
    },
    Step {
        what: "the bastion pings web-2",
        from: "bastion-1",
        to: "web-2",
        service: "icmp",
        allowed: true,
        rule: "dc-bastion-ping",
    },
    Step {
        what: "web-1 pings app-1",
        from: "web-1",
        to: "app-1",
        service: "icmp",
        allowed: false,
        rule: "default",
    },
    Step {
        what: "telnet from the bastion to web-1",
        from: "bastion-1",
        to: "web-1",
        service: "tcp/23",
        allowed: false,
        rule: "dc-deny-telnet",
    },
];

fn default_policy() -> PathBuf {
    let here = PathBuf::from("examples/three-tier");
    if here.is_dir() {
        return here;
    }
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/three-tier")
}

/// Fail early, naming the Debian package, when a tool the lab needs is missing.
fn preflight() -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the demo builds network namespaces and must run as root (try: sudo palisade demo)");
    }
    for (tool, package) in [
        ("ip", "iproute2"),
        ("busybox", "busybox-static"),
        ("curl", "curl"),
        ("ethtool", "ethtool"),
    ] {
        let found = std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
            .unwrap_or(false);
        if !found {
            bail!("`{tool}` not found: install the Debian package {package} (apt-get install -y {package})");
        }
    }
    Ok(())
}

/// Run the demo.
pub fn run(args: DemoArgs) -> anyhow::Result<ExitCode> {
    preflight()?;
    let policy = args.policy.clone().unwrap_or_else(default_policy);
    let policy = std::path::absolute(&policy).context("resolving the policy directory")?;
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(sig, stop.clone()).context("installing signal handlers")?;
    }
    let spec = LabSpec::from_inventory(&policy).with_name(&args.name);
    let spec = LabSpec {
        agent_exe: Some(std::env::current_exe().context("locating the palisade binary")?),
        controller: !args.standalone,
        ..spec
    };
    // A lab of this name left by a crash is removed first.
    let leftover = Lab::down(&spec.name, &spec.state_dir)?;
    if !leftover.is_empty() {
        println!(
            "removed a previous lab's leftovers ({} namespaces)",
            leftover.namespaces.len()
        );
    }
    println!("building the lab from {} …", policy.display());
    let started = Instant::now();
    let lab = Lab::up(&spec)?;
    println!(
        "lab `{}` up in {:.1} s: {} hosts, {} VMs, one Palisade agent per host",
        args.name,
        started.elapsed().as_secs_f64(),
        lab.plan().hosts.len(),
        lab.plan().vms.len()
    );
    if let Some(c) = &lab.state().controller {
        println!(
            "controller at {} (embedded store, mutual TLS for agents); policy applied as version 1",
            c.url
        );
    }
    let result = drive(&lab, &args, &stop);
    let trails = stop_agents_and_verify(&lab);
    println!("tearing the lab down …");
    let report = lab.shutdown()?;
    println!(
        "removed {} namespaces, {} processes, {} links",
        report.namespaces.len(),
        report.processes.len(),
        report.links.len()
    );
    let failures = result? + trails?;
    if failures > 0 {
        println!("{failures} connection(s) did not behave as the policy says");
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

/// Stop the agents (SIGTERM: they save state, flush and sign their audit
/// trails), then verify each host's trail. Returns the number of trails that
/// do not verify.
fn stop_agents_and_verify(lab: &Lab) -> anyhow::Result<usize> {
    for a in lab.state().agents.values() {
        // SAFETY: kill has no memory preconditions; the pid is our child's.
        unsafe { libc::kill(a.pid, libc::SIGTERM) };
    }
    // The lab started them as our children: exited ones are zombies until reaped.
    let running = |pid: i32| {
        std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
            s.rsplit(')')
                .next()
                .is_some_and(|rest| !rest.trim_start().starts_with('Z'))
        })
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while lab.state().agents.values().any(|a| running(a.pid)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut bad = 0;
    for h in &lab.plan().hosts {
        let dir = lab.state().state_dir.join(&h.name).join("audit");
        // Checked against the head the agent published beside the trail (its key too).
        let head_file = lab.state().state_dir.join(&h.name).join("audit.head");
        let verified = palisade_audit::SignedHead::read(&head_file).and_then(|head| {
            let opts = palisade_audit::VerifyOptions {
                key: None,
                expect_head: head.map(|h| (h, head_file.display().to_string())),
            };
            palisade_audit::verify_with(&dir, &opts)
        });
        match verified {
            Ok(r) if r.is_ok() => println!(
                "audit trail of {}: {} records, hash chain intact, signed through record {}{}",
                h.name,
                r.records,
                r.signed_through,
                r.head_seq
                    .map(|s| format!(", contains its published head (record {s})"))
                    .unwrap_or_default()
            ),
            Ok(r) => {
                bad += 1;
                println!("audit trail of {}: {} problem(s):", h.name, r.problems.len());
                for p in &r.problems {
                    println!("  {p}");
                }
            }
            Err(e) => {
                bad += 1;
                println!("audit trail of {}: cannot verify: {e}", h.name);
            }
        }
    }
    Ok(bad)
}

/// Start the servers, run the script, show the flows. Returns the number of failed expectations.
fn drive(lab: &Lab, args: &DemoArgs, stop: &AtomicBool) -> anyhow::Result<usize> {
    let mut servers = start_servers(lab)?;
    // Give servers a moment to bind.
    std::thread::sleep(Duration::from_millis(500));
    println!();
    println!(
        "{:<46} {:<10} {:<10} {:<9} {:<8} {:<8}",
        "connection", "from", "to", "service", "policy", "result"
    );
    let mut failures = 0;
    let mut session = None;
    for step in SCRIPT {
        let (ok, note) = attempt(lab, step, &mut session)?;
        let expect = if step.allowed { "allow" } else { "deny" };
        let got = if ok { "allowed" } else { "blocked" };
        let verdict = if ok == step.allowed { "✓" } else { "✗ UNEXPECTED" };
        if ok != step.allowed {
            failures += 1;
        }
        println!(
            "{:<46} {:<10} {:<10} {:<9} {:<8} {got:<8} {verdict} {note}",
            step.what, step.from, step.to, step.service, expect
        );
    }
    // The long-lived session is still streaming after everything else.
    if let Some(Spawned::Process(child)) = session.as_mut() {
        let alive = child.try_wait().ok().flatten().is_none();
        println!(
            "long-lived database session still open: {}",
            if alive { "yes" } else { "NO" }
        );
        if !alive {
            failures += 1;
        }
    }
    if lab.state().controller.is_some() {
        failures += quarantine(lab)?;
    }
    // Let the agents publish their flow records.
    std::thread::sleep(Duration::from_millis(1200));
    let flows = collect_flows(lab);
    println!();
    print_flows(&flows);
    failures += check_rules(&flows, lab.state().controller.is_some());
    if lab.state().controller.is_some() {
        // The agents also send their records to the controller: one query for the whole datacenter.
        std::thread::sleep(Duration::from_millis(1500));
        println!("\nthe controller's view, `palisade flows --server … --vm db-1`:");
        let out = lab.ctl(&["flows", "--vm", "db-1"])?;
        print!("{}", String::from_utf8_lossy(&out.stdout));
        if !out.status.success() || !String::from_utf8_lossy(&out.stdout).contains("prod-no-web-to-db") {
            println!("the controller does not have web-1 → db-1's record");
            failures += 1;
        }
    }
    if !args.once {
        println!("\nlive: the table refreshes every 2 s; Ctrl-C tears the lab down");
        while !stop.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_secs(2));
            if stop.load(Ordering::Relaxed) {
                break;
            }
            print!("\x1b[2J\x1b[H");
            print_flows(&collect_flows(lab));
        }
    }
    if let Some(mut s) = session {
        let _ = lab.kill(&mut s);
    }
    for s in &mut servers {
        let _ = lab.kill(s);
    }
    Ok(failures)
}

fn start_servers(lab: &Lab) -> anyhow::Result<Vec<Spawned>> {
    let exe = std::env::current_exe()?;
    let exe = exe.to_string_lossy().to_string();
    let www = lab.state().state_dir.join("www");
    let mut servers = Vec::new();
    let mut spawn = |vm: &str, argv: &[&str]| -> anyhow::Result<()> {
        servers.push(
            lab.spawn(vm, argv)
                .with_context(|| format!("starting {} on {vm}", argv.join(" ")))?,
        );
        Ok(())
    };
    for vm in ["web-1", "web-2", "app-1", "app-2"] {
        let dir = www.join(vm);
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join("index.html"), format!("hello from {vm}\n"))?;
        let port = if vm.starts_with("web") { "80" } else { "8080" };
        let d = dir.to_string_lossy().to_string();
        spawn(vm, &["busybox", "httpd", "-f", "-p", port, "-h", &d])?;
    }
    // An SSH and a telnet listener that would answer if policy let anyone through.
    spawn("web-1", &["busybox", "nc", "-ll", "-p", "22", "-e", "/bin/cat"])?;
    spawn("web-1", &["busybox", "nc", "-ll", "-p", "23", "-e", "/bin/cat"])?;
    spawn("db-1", &[&exe, "lab", "serve", "stream", "5432"])?;
    let zone = lab.dns_zone_file().to_string_lossy().to_string();
    spawn("dns-1", &[&exe, "lab", "serve", "dns", "--zone-file", &zone])?;
    Ok(servers)
}

/// The controller revision each agent enforces.
fn revisions(lab: &Lab) -> Vec<Option<u64>> {
    lab.plan()
        .hosts
        .iter()
        .map(|h| {
            let sock = lab.state().state_dir.join(&h.name).join("agent.sock");
            palisade_agent::http::get_unix(&sock, "/health")
                .ok()
                .and_then(|b| serde_json::from_str::<serde_json::Value>(&b).ok())
                .and_then(|v| v["controller_revision"].as_u64())
        })
        .collect()
}

/// An incident responder tags web-1 through the controller: every agent
/// installs the change, and the internet's HTTP to web-1 is now refused by the
/// datacenter's quarantine rule. Returns the number of failed expectations.
fn quarantine(lab: &Lab) -> anyhow::Result<usize> {
    let before = revisions(lab);
    println!();
    println!("incident response: `palisade tag vm web-1 quarantine=true` through the controller");
    let out = lab.ctl(&["tag", "vm", "web-1", "quarantine=true"])?;
    if !out.status.success() {
        bail!("tagging web-1 failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(10) {
        let now = revisions(lab);
        if now.iter().zip(&before).all(|(n, b)| n > b) {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let took = t.elapsed();
    let installed = revisions(lab).iter().zip(&before).all(|(n, b)| n > b);
    println!(
        "every agent installed the change: {} ({} ms after the tag)",
        if installed { "yes" } else { "NO" },
        took.as_millis()
    );
    let step = &QUARANTINE;
    let (ok, note) = attempt(lab, step, &mut None)?;
    let good = installed && ok == step.allowed;
    println!(
        "{:<46} {:<10} {:<10} {:<9} {:<8} {:<8} {} {note}",
        step.what,
        step.from,
        step.to,
        step.service,
        "deny",
        if ok { "allowed" } else { "blocked" },
        if good { "✓" } else { "✗ UNEXPECTED" }
    );
    Ok(usize::from(!good))
}

const QUARANTINE: Step = Step {
    what: "HTTP from the internet to quarantined web-1",
    from: "internet",
    to: "web-1",
    service: "tcp/80",
    allowed: false,
    rule: "dc-quarantine-in",
};

/// Try one connection; returns whether it got through, and a note.
fn attempt(lab: &Lab, step: &Step, session: &mut Option<Spawned>) -> anyhow::Result<(bool, String)> {
    let to = lab.vm_ip(step.to)?.to_string();
    let t = Duration::from_secs(8);
    let run = |argv: &[&str]| -> anyhow::Result<std::process::Output> {
        if step.from == "internet" {
            Ok(lab.exec_ns(&lab.plan().internet_ns, argv, t)?)
        } else {
            Ok(lab.exec(step.from, argv, t)?)
        }
    };
    let out = match step.service {
        "tcp/80" | "tcp/8080" => {
            let port = &step.service[4..];
            let o = run(&["curl", "-s", "-m", "3", &format!("http://{to}:{port}/")])?;
            let body = String::from_utf8_lossy(&o.stdout).trim().to_string();
            return Ok((o.status.success() && body.contains(step.to), body));
        }
        "tcp/22" | "tcp/23" | "tcp/5432" if !(step.allowed && step.service == "tcp/5432") => {
            let port = &step.service[4..];
            // Connected = the listener echoed our line back (or the stream spoke first).
            let o = run(&["sh", "-c", &format!("echo hello | busybox nc -w 3 {to} {port}")])?;
            return Ok((!o.stdout.is_empty(), String::new()));
        }
        "tcp/5432" => {
            let mut s = lab.spawn(step.from, &["busybox", "nc", &to, "5432"])?;
            std::thread::sleep(Duration::from_millis(1500));
            let alive = match &mut s {
                Spawned::Process(c) => c.try_wait().ok().flatten().is_none(),
                Spawned::Guest { .. } => true,
            };
            *session = Some(s);
            return Ok((alive, "(kept open)".into()));
        }
        "udp/53" => run(&["busybox", "nslookup", &format!("{}.lab", "app-1"), &to])?,
        "icmp" => run(&["busybox", "ping", "-c", "2", "-W", "1", &to])?,
        other => bail!("demo script: no probe for {other}"),
    };
    let text = String::from_utf8_lossy(&out.stdout);
    let note = text
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("")
        .trim()
        .to_string();
    Ok((out.status.success(), note))
}

fn collect_flows(lab: &Lab) -> Vec<FlowRecord> {
    let mut all = Vec::new();
    for h in &lab.plan().hosts {
        let sock = lab.state().state_dir.join(&h.name).join("agent.sock");
        if let Ok(body) = palisade_agent::http::get_unix(&sock, "/flows")
            && let Ok(mut recs) = serde_json::from_str::<Vec<FlowRecord>>(&body)
        {
            all.append(&mut recs);
        }
    }
    all.sort_by_key(|r| r.time_ns);
    all
}

fn who(e: &palisade_audit::record::Endpoint) -> String {
    e.vm.as_ref().map_or_else(|| e.addr.to_string(), |v| v.name.clone())
}

fn service(r: &FlowRecord) -> String {
    match r.protocol {
        1 | 58 => "icmp".into(),
        6 => format!("tcp/{}", r.dst.port),
        17 => format!("udp/{}", r.dst.port),
        p => format!("ip/{p}"),
    }
}

/// One line per flow: its decision (from the host that decided it) and, once it ended, its totals.
fn print_flows(flows: &[FlowRecord]) {
    println!("flows recorded by the agents (the host that decided each; the other end trusts its VXLAN-GBP verdict)");
    println!(
        "{:<8} {:<5} {:<14} {:<14} {:<9} {:<7} {:<32} {:>9} {:>9}",
        "time", "host", "from", "to", "service", "verdict", "rule (level)", "pkts→/←", "end"
    );
    // Key: (host, flow id) → (decision record, last record).
    let mut by_flow: BTreeMap<(String, u64), (Option<&FlowRecord>, &FlowRecord)> = BTreeMap::new();
    for r in flows {
        let e = by_flow.entry((r.host.clone(), r.flow_id)).or_insert((None, r));
        if matches!(r.phase, Phase::Start) && !r.decided_by.is_empty() {
            e.0 = Some(r);
        }
        e.1 = r;
    }
    let mut rows: Vec<_> = by_flow.values().filter_map(|(d, last)| d.map(|d| (d, *last))).collect();
    rows.sort_by_key(|(d, _)| d.time_ns);
    for (d, last) in rows {
        let rule = d
            .decided_by
            .iter()
            .map(|x| format!("{} ({})", x.rule, x.level))
            .collect::<Vec<_>>();
        let mut rule = rule.join(" + ");
        if let [a, b] = d.decided_by.as_slice()
            && a.rule == b.rule
        {
            rule = format!("{} ({})", a.rule, a.level);
        }
        let secs = (d.time_ns / 1_000_000_000) % 86_400;
        let end = match last.phase {
            Phase::End(r) => format!("{r:?}").to_lowercase(),
            _ if d.verdict != palisade_audit::record::Verdict::Allow => "-".into(),
            _ => "open".into(),
        };
        println!(
            "{:02}:{:02}:{:02} {:<5} {:<14} {:<14} {:<9} {:<7} {:<32} {:>4}/{:<4} {:>9}",
            secs / 3600,
            (secs / 60) % 60,
            secs % 60,
            d.host,
            who(&d.src),
            who(&d.dst),
            service(d),
            format!("{:?}", d.verdict).to_lowercase(),
            rule,
            last.packets_out,
            last.packets_in,
            end
        );
    }
}

/// Each scripted connection must appear in the agents' records, decided by the expected rule.
fn check_rules(flows: &[FlowRecord], quarantined: bool) -> usize {
    let mut missing = 0;
    let extra = quarantined.then_some(&QUARANTINE);
    for step in SCRIPT.iter().chain(extra) {
        let found = flows.iter().any(|r| {
            let from_ok = if step.from == "internet" {
                r.src.vm.is_none()
            } else {
                r.src.vm.as_ref().is_some_and(|v| v.name == step.from)
            };
            from_ok
                && r.dst.vm.as_ref().is_some_and(|v| v.name == step.to)
                && r.decided_by.iter().any(|d| d.rule == step.rule)
        });
        if !found {
            println!("no flow record shows {} decided by rule {}", step.what, step.rule);
            missing += 1;
        }
    }
    missing
}
