//! How a guest is attached: libvirt domain XML and the QEMU command line.
//!
//! The device is the *server* of its socket and QEMU the client, which
//! reconnects when the agent restarts. In libvirt's terms the `mode` of
//! `<source>` is QEMU's role, so it is `client`, with `<reconnect>`.
//! vhost-user also needs the guest's RAM in shared, file-backed memory
//! (the device maps it), which libvirt's `<memoryBacking>` with a memfd
//! source and shared access provides.
//!
//! ```xml
//! <domain type='kvm'>
//!   <memoryBacking>
//!     <source type='memfd'/>
//!     <access mode='shared'/>
//!   </memoryBacking>
//!   <devices>
//!     <interface type='vhostuser'>
//!       <mac address='52:54:00:12:34:56'/>
//!       <source type='unix' path='/run/palisade/vhost/web-1.sock' mode='client'>
//!         <reconnect enabled='yes' timeout='1'/>
//!       </source>
//!       <model type='virtio'/>
//!       <driver queues='2'/>
//!     </interface>
//!   </devices>
//! </domain>
//! ```
//!
//! The same with QEMU directly:
//!
//! ```text
//! -object memory-backend-memfd,id=mem0,size=1G,share=on -numa node,memdev=mem0
//! -chardev socket,id=vu0,path=/run/palisade/vhost/web-1.sock,reconnect=1
//! -netdev vhost-user,id=net0,chardev=vu0,queues=2
//! -device virtio-net-pci,netdev=net0,mac=52:54:00:12:34:56,mq=on
//! ```
//!
//! (Under TCG, QEMU 7.2 also needs `vectors=0` on the device: see
//! `ENVIRONMENT.md`.)

use std::fmt::Write;
use std::path::Path;

/// XML-escape `s` for an attribute value in single quotes.
fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '\'' => out.push_str("&apos;"),
            '"' => out.push_str("&quot;"),
            c => out.push(c),
        }
    }
    out
}

fn mac_text(mac: [u8; 6]) -> String {
    mac.map(|b| format!("{b:02x}")).join(":")
}

/// The `<interface type='vhostuser'>` element attaching a guest NIC with
/// `mac` and `queue_pairs` queue pairs to the device listening on `socket`.
pub fn libvirt_interface_xml(socket: &Path, mac: [u8; 6], queue_pairs: u16) -> String {
    let mut x = String::new();
    x.push_str("<interface type='vhostuser'>\n");
    let _ = writeln!(x, "  <mac address='{}'/>", mac_text(mac));
    let _ = writeln!(
        x,
        "  <source type='unix' path='{}' mode='client'>",
        escape(&socket.to_string_lossy())
    );
    x.push_str("    <reconnect enabled='yes' timeout='1'/>\n");
    x.push_str("  </source>\n");
    x.push_str("  <model type='virtio'/>\n");
    let _ = writeln!(x, "  <driver queues='{queue_pairs}'/>");
    x.push_str("</interface>\n");
    x
}

/// The `<interface type='ethernet'>` element attaching a guest NIC with
/// `mac` to a tap named `tap` that already exists (the agent reads it;
/// `managed='no'`: libvirt neither creates nor deletes it).
pub fn libvirt_tap_interface_xml(tap: &str, mac: [u8; 6]) -> String {
    let mut x = String::new();
    x.push_str("<interface type='ethernet'>\n");
    let _ = writeln!(x, "  <mac address='{}'/>", mac_text(mac));
    let _ = writeln!(x, "  <target dev='{}' managed='no'/>", escape(tap));
    x.push_str("  <model type='virtio'/>\n");
    x.push_str("</interface>\n");
    x
}

/// The `<memoryBacking>` element vhost-user needs in the domain (shared memfd RAM).
pub const LIBVIRT_MEMORY_BACKING_XML: &str =
    "<memoryBacking>\n  <source type='memfd'/>\n  <access mode='shared'/>\n</memoryBacking>\n";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interface_xml_names_the_socket_as_client_with_reconnect() {
        let x = libvirt_interface_xml(
            Path::new("/run/palisade/a'b&c.sock"),
            [0x52, 0x54, 0, 0x12, 0x34, 0x56],
            2,
        );
        assert!(x.contains("<interface type='vhostuser'>"));
        assert!(x.contains("<mac address='52:54:00:12:34:56'/>"));
        assert!(
            x.contains("path='/run/palisade/a&apos;b&amp;c.sock' mode='client'"),
            "{x}"
        );
        assert!(x.contains("<reconnect enabled='yes' timeout='1'/>"));
        assert!(x.contains("<driver queues='2'/>"));
        assert!(LIBVIRT_MEMORY_BACKING_XML.contains("<access mode='shared'/>"));
    }

    #[test]
    fn tap_xml_names_an_unmanaged_tap() {
        assert_eq!(
            libvirt_tap_interface_xml("vn-<web>'1", [2, 0, 0, 0, 0, 1]),
            "<interface type='ethernet'>\n  <mac address='02:00:00:00:00:01'/>\n  \
             <target dev='vn-&lt;web&gt;&apos;1' managed='no'/>\n  <model type='virtio'/>\n</interface>\n"
        );
    }
}
