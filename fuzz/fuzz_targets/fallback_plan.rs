//! Fuzz the fail-open fallback's plan (a file in the agent's state directory,
//! turned into `ip -batch`/`bridge -batch` lines): no panic on any text, and
//! a plan that passes its check only ever yields command lines of plain
//! tokens (no control character, no token that starts with `-` and could
//! be read as an option, nothing but `A-Z a-z 0-9 _ . : -`), one command a
//! line, whatever devices the host has.
#![no_main]

use palisade_agent::fallback::{Devices, FallbackPlan, arm_commands, disarm_commands};

fn plain(line: &str) {
    assert!(!line.is_empty() && !line.contains('\n'), "{line:?}");
    for token in line.split(' ') {
        assert!(!token.is_empty() && !token.starts_with('-'), "{line:?}");
        assert!(
            token
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b':' | b'-')),
            "{line:?}"
        );
    }
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Ok(plan) = serde_json::from_slice::<FallbackPlan>(data) else {
        return;
    };
    if plan.check().is_err() {
        return;
    }
    // The host's devices, from the plan's own names: present, some in a
    // fallback bridge, some in another, one MTU each (from the input's length).
    let mut devices = Devices::default();
    let names = plan
        .open
        .iter()
        .flat_map(|z| &z.interfaces)
        .chain(plan.closed.iter().flat_map(|z| &z.interfaces));
    for (i, n) in names.enumerate() {
        let master = match (i + data.len()) % 3 {
            0 => None,
            1 => plan.open.first().map(|z| palisade_agent::fallback::bridge_name(z.vni)),
            _ => Some("br-user".to_string()),
        };
        devices.masters.insert(n.clone(), master);
        devices.mtus.insert(n.clone(), 68 + (data.len() as u32 % 9000));
    }
    if let Some(z) = plan.open.first() {
        devices.bridges.insert(palisade_agent::fallback::bridge_name(z.vni));
    }
    let c = arm_commands(&plan, &devices);
    for line in c.setup.iter().chain(&c.fdb).chain(&c.attach) {
        plain(line);
    }
    for line in disarm_commands(&devices) {
        plain(&line);
    }
});
