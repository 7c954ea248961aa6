//! The link state of host interfaces, read from sysfs: the health of
//! service-chain appliance instances (`palisade_datapath::Engine::set_port_link`).
//!
//! An appliance VM whose vNIC is down (its end of the veth set down, its
//! namespace gone, its tap closed) leaves the host end without carrier.
//! This is the fast health signal for appliances; the probes through each
//! instance (`palisade_datapath::probe`, run by the agent's control loop)
//! catch an appliance that keeps link but no longer forwards.

use std::path::Path;

/// Whether `interface` has carrier: `/sys/class/net/IF/carrier` reads `1`.
/// An interface that is administratively down (the file cannot be read),
/// or gone, has none.
pub(crate) fn carrier(interface: &str) -> bool {
    carrier_in(Path::new("/sys/class/net"), interface)
}

fn carrier_in(root: &Path, interface: &str) -> bool {
    // Names come from the validated configuration; refuse anything that could walk the tree anyway.
    if interface.is_empty() || interface.contains(['/', '\0']) || interface == "." || interface == ".." {
        return false;
    }
    std::fs::read_to_string(root.join(interface).join("carrier")).is_ok_and(|s| s.trim() == "1")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn carrier_is_read_from_the_file_and_anything_else_is_down() {
        let dir = std::env::temp_dir().join(format!("palisade-links-{}", std::process::id()));
        for (name, text) in [("up0", "1\n"), ("down0", "0\n")] {
            std::fs::create_dir_all(dir.join(name)).unwrap();
            std::fs::write(dir.join(name).join("carrier"), text).unwrap();
        }
        std::fs::create_dir_all(dir.join("nofile")).unwrap();
        assert!(carrier_in(&dir, "up0"));
        assert!(!carrier_in(&dir, "down0"));
        assert!(!carrier_in(&dir, "nofile"), "admin down: carrier unreadable");
        assert!(!carrier_in(&dir, "gone"));
        assert!(!carrier_in(&dir, "../up0"));
        assert!(!carrier_in(&dir, ".."));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
