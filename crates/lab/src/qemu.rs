//! QEMU guests: a tiny initramfs built at run time, the QEMU command line, and
//! commands run over the serial console.
//!
//! The guest is Debian's cloud kernel plus an initramfs holding only a static
//! busybox and the virtio modules (ENVIRONMENT.md): it boots in seconds under
//! TCG, configures its vNIC from the kernel command line, serves HTTP, and
//! leaves a shell on the serial console, which `exec` drives with unique
//! markers so output and exit status are recovered exactly.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Output};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use flate2::Compression;
use flate2::write::GzEncoder;

use crate::LabError;
use crate::sys;

/// The virtio modules a guest needs, in load order (dependencies first).
const MODULES: [&str; 2] = ["virtio_pci", "virtio_net"];

/// Writer of a cpio archive in the `newc` format the kernel unpacks.
pub(crate) struct Cpio {
    buf: Vec<u8>,
    ino: u32,
}

impl Cpio {
    pub(crate) fn new() -> Cpio {
        Cpio {
            buf: Vec::new(),
            ino: 1,
        }
    }

    fn pad4(&mut self) {
        while self.buf.len() % 4 != 0 {
            self.buf.push(0);
        }
    }

    fn entry(&mut self, name: &str, mode: u32, rdev: (u32, u32), data: &[u8]) {
        let fields = [
            self.ino,
            mode,
            0, // uid
            0, // gid
            1, // nlink
            0, // mtime: fixed, so the archive is reproducible
            data.len() as u32,
            0, // devmajor
            0, // devminor
            rdev.0,
            rdev.1,
            name.len() as u32 + 1,
            0, // check (unused by newc)
        ];
        self.ino += 1;
        self.buf.extend_from_slice(b"070701");
        for f in fields {
            self.buf.extend_from_slice(format!("{f:08x}").as_bytes());
        }
        self.buf.extend_from_slice(name.as_bytes());
        self.buf.push(0);
        self.pad4();
        self.buf.extend_from_slice(data);
        self.pad4();
    }

    pub(crate) fn dir(&mut self, name: &str) {
        self.entry(name, 0o040755, (0, 0), &[]);
    }

    pub(crate) fn file(&mut self, name: &str, perm: u32, data: &[u8]) {
        self.entry(name, 0o100000 | perm, (0, 0), data);
    }

    pub(crate) fn symlink(&mut self, name: &str, target: &str) {
        self.entry(name, 0o120777, (0, 0), target.as_bytes());
    }

    pub(crate) fn chardev(&mut self, name: &str, major: u32, minor: u32) {
        self.entry(name, 0o020600, (major, minor), &[]);
    }

    pub(crate) fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, (0, 0), &[]);
        self.buf
    }
}

/// The guest kernel: the newest `/boot/vmlinuz-*-cloud-amd64`, and its version.
pub fn find_kernel() -> Option<(PathBuf, String)> {
    let mut found: Vec<(PathBuf, String)> = std::fs::read_dir("/boot")
        .ok()?
        .filter_map(Result::ok)
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let ver = name.strip_prefix("vmlinuz-")?;
            ver.ends_with("-cloud-amd64").then(|| (e.path(), ver.to_string()))
        })
        .filter(|(_, v)| Path::new("/lib/modules").join(v).is_dir())
        .collect();
    found.sort_by(|a, b| a.1.cmp(&b.1));
    found.pop()
}

/// Module files for `kver`, in load order, from `modprobe --show-depends`.
fn module_files(kver: &str) -> Result<Vec<PathBuf>, LabError> {
    let mut files: Vec<PathBuf> = Vec::new();
    for m in MODULES {
        let out = sys::run("modprobe", &["-S", kver, "--show-depends", m])?;
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            // Lines are `insmod PATH [params]`; `builtin NAME` needs nothing.
            if let Some(rest) = line.trim().strip_prefix("insmod ") {
                let p = PathBuf::from(rest.split_whitespace().next().unwrap_or_default());
                if !p.as_os_str().is_empty() && !files.contains(&p) {
                    files.push(p);
                }
            }
        }
    }
    Ok(files)
}

/// The guest's `/init`. `mods` are module file names under `/lib/modules`.
fn init_script(mods: &[String]) -> String {
    format!(
        r#"#!/bin/busybox sh
/bin/busybox --install -s
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev 2>/dev/null
echo 1 > /proc/sys/kernel/printk
for m in {mods}; do insmod /lib/modules/$m; done
name=guest; ip4=; gw=; ip6=
for x in $(cat /proc/cmdline); do
  case "$x" in
    palisade.name=*) name="${{x#palisade.name=}}" ;;
    palisade.ip=*) ip4="${{x#palisade.ip=}}" ;;
    palisade.ip6=*) ip6="${{x#palisade.ip6=}}" ;;
    palisade.gw=*) gw="${{x#palisade.gw=}}" ;;
  esac
done
hostname "$name"
ip link set lo up
i=0; while [ ! -e /sys/class/net/eth0 ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
echo 0 > /proc/sys/net/ipv6/conf/eth0/accept_dad 2>/dev/null
ip link set eth0 up
[ -n "$ip4" ] && ip addr add "$ip4" dev eth0
[ -n "$ip6" ] && ip -6 addr add "$ip6" dev eth0
[ -n "$gw" ] && ip route add default via "$gw"
mkdir -p /www /tmp
echo "<html><body><h1>$name</h1><p>Palisade lab QEMU guest $name</p></body></html>" > /www/index.html
httpd -p 80 -h /www
stty -F /dev/ttyS0 -echo 2>/dev/null
echo palisade-guest-ready
while true; do cat /dev/ttyS0 | sh > /dev/ttyS0 2>&1; done
"#,
        mods = mods.join(" ")
    )
}

/// Build (or reuse) the initramfs for kernel `kver` under `dir`.
pub fn build_initramfs(dir: &Path, kver: &str) -> Result<PathBuf, LabError> {
    let out = dir.join(format!("initramfs-{kver}.cpio.gz"));
    if out.is_file() {
        return Ok(out);
    }
    let busybox = ["/bin/busybox", "/usr/bin/busybox"]
        .into_iter()
        .map(Path::new)
        .find(|p| p.is_file())
        .ok_or_else(|| LabError::Invalid("busybox not found (install busybox-static)".into()))?;
    let bb = std::fs::read(busybox).map_err(LabError::io(format!("reading {}", busybox.display())))?;
    let mut c = Cpio::new();
    for d in [
        "bin", "sbin", "usr", "usr/bin", "usr/sbin", "dev", "proc", "sys", "tmp", "www", "etc", "root", "lib",
    ] {
        c.dir(d);
    }
    c.dir("lib/modules");
    c.chardev("dev/console", 5, 1);
    c.chardev("dev/null", 1, 3);
    c.file("bin/busybox", 0o755, &bb);
    c.symlink("bin/sh", "busybox");
    let mut names = Vec::new();
    for f in module_files(kver)? {
        let data = std::fs::read(&f).map_err(LabError::io(format!("reading {}", f.display())))?;
        let name = f
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .ok_or_else(|| LabError::Invalid(format!("module path {}", f.display())))?;
        if name.ends_with(".ko.xz") || name.ends_with(".ko.zst") || name.ends_with(".ko.gz") {
            return Err(LabError::Invalid(format!("compressed module {name}: not supported")));
        }
        c.file(&format!("lib/modules/{name}"), 0o644, &data);
        names.push(name);
    }
    c.file("init", 0o755, init_script(&names).as_bytes());
    let mut gz = GzEncoder::new(Vec::new(), Compression::fast());
    gz.write_all(&c.finish())
        .map_err(LabError::io("compressing initramfs"))?;
    let bytes = gz.finish().map_err(LabError::io("compressing initramfs"))?;
    std::fs::create_dir_all(dir).map_err(LabError::io(format!("creating {}", dir.display())))?;
    // Write then rename, so a crash never leaves a truncated cache entry.
    let tmp = dir.join(format!(".initramfs-{}.tmp", std::process::id()));
    std::fs::write(&tmp, bytes).map_err(LabError::io(format!("writing {}", tmp.display())))?;
    std::fs::rename(&tmp, &out).map_err(LabError::io(format!("renaming to {}", out.display())))?;
    Ok(out)
}

/// The accelerator: `PALISADE_LAB_ACCEL=kvm|tcg` forces one; otherwise KVM
/// with `-cpu host` when a probe guest really runs under it, else TCG.
///
/// Nested KVM is unreliable on some hosts (ENVIRONMENT.md): `-cpu host` may
/// abort on an MSR write, or a guest may start and then hang after the
/// firmware. A paused VM shows neither, so the probe boots the guest kernel
/// itself with no root file system and `panic=-1`: it panics at once and
/// reboots, which `-no-reboot` turns into QEMU's exit. Only a guest that
/// gets that far, printing its panic, proves KVM works.
pub fn accel() -> &'static [&'static str] {
    static ACCEL: OnceLock<bool> = OnceLock::new();
    let kvm = *ACCEL.get_or_init(|| match std::env::var("PALISADE_LAB_ACCEL").as_deref() {
        Ok("tcg") => false,
        Ok("kvm") => true,
        _ => probe_kvm(),
    });
    if kvm {
        &["-accel", "kvm", "-cpu", "host"]
    } else {
        &["-accel", "tcg"]
    }
}

/// How long the KVM probe guest may take to boot to its panic: under KVM a
/// few hundred milliseconds, under TCG about two seconds.
const KVM_PROBE_TIMEOUT: Duration = Duration::from_secs(10);

fn probe_kvm() -> bool {
    if std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_err()
    {
        return false;
    }
    let Some((kernel, _)) = find_kernel() else { return false };
    let serial = std::env::temp_dir().join(format!("palisade-kvm-probe-{}.log", std::process::id()));
    let child = std::process::Command::new("qemu-system-x86_64")
        .args([
            "-accel",
            "kvm",
            "-cpu",
            "host",
            "-M",
            "pc",
            "-m",
            "128",
            "-nodefaults",
            "-display",
            "none",
        ])
        .args(["-no-reboot", "-kernel"])
        .arg(&kernel)
        .args(["-append", "console=ttyS0 panic=-1 quiet", "-serial"])
        .arg(format!("file:{}", serial.display()))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn();
    let Ok(mut child) = child else { return false };
    let start = Instant::now();
    let exited = loop {
        if let Ok(Some(status)) = child.try_wait() {
            break status.success();
        }
        if start.elapsed() >= KVM_PROBE_TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            break false;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let log = std::fs::read(&serial).unwrap_or_default();
    let _ = std::fs::remove_file(&serial);
    exited && String::from_utf8_lossy(&log).contains("Kernel panic")
}

/// QEMU arguments for a guest NIC served by a vhost-user backend listening
/// on `socket`: guest RAM in a shared memfd of `mem_mib` MiB, which the
/// backend maps (pass the same size to `-m`); QEMU as the socket's client,
/// reconnecting every second when the backend restarts; `queue_pairs` queue
/// pairs. `accel` is the accelerator the guest runs with (as [`accel`]
/// returns it): under TCG, MSI-X is turned off (`vectors=0`), because QEMU
/// 7.2 crashes starting a vhost-user NIC with it there (ENVIRONMENT.md).
pub fn vhost_user_nic_args(socket: &Path, mac: &str, queue_pairs: u16, mem_mib: u32, accel: &[&str]) -> Vec<String> {
    let tcg = !accel.contains(&"kvm");
    vhost_user_nic_args_for(socket, mac, queue_pairs, mem_mib, tcg)
}

fn vhost_user_nic_args_for(socket: &Path, mac: &str, queue_pairs: u16, mem_mib: u32, tcg: bool) -> Vec<String> {
    // QEMU's option syntax doubles a comma inside a value.
    let path = socket.display().to_string().replace(',', ",,");
    let mut device = format!("virtio-net-pci,netdev=n0,mac={mac},romfile=");
    if queue_pairs > 1 {
        device.push_str(",mq=on");
    }
    if tcg {
        device.push_str(",vectors=0");
    }
    vec![
        "-object".into(),
        format!("memory-backend-memfd,id=mem0,size={mem_mib}M,share=on"),
        "-numa".into(),
        "node,memdev=mem0".into(),
        "-chardev".into(),
        format!("socket,id=vu0,path={path},reconnect=1"),
        "-netdev".into(),
        format!("vhost-user,id=n0,chardev=vu0,queues={queue_pairs}"),
        "-device".into(),
        device,
    ]
}

static NONCE: AtomicU64 = AtomicU64::new(0);

fn marker() -> String {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!(
        "PLM{}x{}x{t:x}",
        std::process::id(),
        NONCE.fetch_add(1, Ordering::Relaxed)
    )
}

/// Quote one argument for the guest's POSIX shell.
pub(crate) fn shell_quote(s: &str) -> String {
    if !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || "-_./=:,@%+".contains(c)) {
        return s.to_string();
    }
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// Split `M` into `M1''M2` so the command text never contains the marker the
/// output is searched for, even if the console echoes input.
fn split_marker(m: &str) -> String {
    let (a, b) = m.split_at(m.len() / 2);
    format!("{a}''{b}")
}

/// Read from `s` until `done(buf)` yields a result or the deadline passes.
///
/// While nothing arrives, an empty line is sent every 100 ms: under TCG the
/// guest's 8250 driver can miss transmit interrupts and then only drains its
/// output when a received byte raises an interrupt. The shell ignores empty
/// lines, and commands run with stdin from `/dev/null`, so the kicks are
/// harmless.
fn read_until<T>(
    s: &mut UnixStream,
    deadline: Instant,
    mut done: impl FnMut(&str) -> Option<T>,
) -> Result<Option<T>, std::io::Error> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let now = Instant::now();
        if now >= deadline {
            return Ok(None);
        }
        s.set_read_timeout(Some((deadline - now).min(Duration::from_millis(100))))?;
        match s.read(&mut chunk) {
            Ok(0) => return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "console closed")),
            Ok(n) => {
                buf.extend_from_slice(&chunk[..n]);
                if let Some(t) = done(&String::from_utf8_lossy(&buf)) {
                    return Ok(Some(t));
                }
            }
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                s.write_all(b"\n")?;
            }
            Err(e) => return Err(e),
        }
    }
}

fn after_line(s: &str) -> &str {
    let s = s.strip_prefix('\r').unwrap_or(s);
    s.strip_prefix('\n').unwrap_or(s)
}

/// Parse `…M-BEGIN\n<stdout>M-ERR\n<stderr>M-END <rc>\n` out of console text.
pub(crate) fn parse_exec(text: &str, m: &str) -> Option<(String, String, i32)> {
    let begin = format!("{m}-BEGIN");
    let err = format!("{m}-ERR");
    let end = format!("{m}-END ");
    let b = text.find(&begin)? + begin.len();
    let rest = after_line(&text[b..]);
    let e = rest.find(&err)?;
    let stdout = &rest[..e];
    let rest2 = after_line(&rest[e + err.len()..]);
    let x = rest2.find(&end)?;
    let stderr = &rest2[..x];
    let tail = &rest2[x + end.len()..];
    let nl = tail.find('\n')?;
    let rc = tail[..nl].trim().parse().ok()?;
    let clean = |s: &str| s.replace("\r\n", "\n");
    Some((clean(stdout), clean(stderr), rc))
}

fn qerr(vm: &str, reason: impl Into<String>) -> LabError {
    LabError::Qemu {
        vm: vm.to_string(),
        reason: reason.into(),
    }
}

/// Run `argv` in the guest behind `console`, returning its output and exit
/// status. The guest's shell runs the command with stdin from `/dev/null`.
///
/// `conn` keeps the console connection between calls: QEMU's serial port can
/// stall output the guest writes while no client is connected, so the lab
/// stays connected, and every conversation reads all it caused before
/// returning. A failed conversation drops the connection.
pub fn console_exec(
    vm: &str,
    console: &Path,
    conn: &mut Option<UnixStream>,
    argv: &[&str],
    timeout: Duration,
) -> Result<Output, LabError> {
    let deadline = Instant::now() + timeout;
    let mut s = match conn.take() {
        Some(s) => s,
        None => UnixStream::connect(console).map_err(LabError::io(format!("connecting to {}", console.display())))?,
    };
    let m = marker();
    let sm = split_marker(&m);
    let cmd: Vec<String> = argv.iter().map(|a| shell_quote(a)).collect();
    let errf = format!("/tmp/.{m}.err");
    let line = format!(
        "echo {sm}-BEGIN; ( {} ) </dev/null 2>{errf}; rc=$?; echo; echo {sm}-ERR; cat {errf}; rm -f {errf}; echo; echo {sm}-END \"$rc\"\n",
        cmd.join(" ")
    );
    s.write_all(line.as_bytes())
        .map_err(LabError::io("writing to guest console"))?;
    let mut seen = String::new();
    let got = read_until(&mut s, deadline, |t| {
        let r = parse_exec(t, &m);
        if r.is_none() {
            seen = t.to_string();
        }
        r
    })
    .map_err(|e| qerr(vm, format!("console: {e}")))?;
    let Some((mut stdout, mut stderr, rc)) = got else {
        let start = seen.len().saturating_sub(400);
        let start = (start..seen.len())
            .find(|&i| seen.is_char_boundary(i))
            .unwrap_or(seen.len());
        return Err(LabError::Timeout {
            what: format!(
                "`{}` in guest {vm} (console so far: {:?})",
                argv.join(" "),
                &seen[start..]
            ),
            secs: timeout.as_secs_f64(),
        });
    };
    *conn = Some(s);
    // The command line adds one newline before each marker so a last line
    // without one cannot swallow it; remove exactly that newline.
    stdout.pop();
    stderr.pop();
    Ok(Output {
        status: ExitStatus::from_raw((rc & 0xff) << 8),
        stdout: stdout.into_bytes(),
        stderr: stderr.into_bytes(),
    })
}

/// Consume the answers to probes queued before the shell started: send one
/// last marker and read up to it, so nothing is left to be written after we
/// disconnect.
fn sync(vm: &str, s: &mut UnixStream, deadline: Instant) -> Result<(), LabError> {
    let m = marker();
    s.write_all(format!("echo {}\n", split_marker(&m)).as_bytes())
        .map_err(LabError::io("writing to guest console"))?;
    let done = |t: &str| {
        t.find(&m)
            .is_some_and(|i| t[i + m.len()..].contains('\n'))
            .then_some(())
    };
    match read_until(s, deadline, done) {
        Ok(Some(())) => Ok(()),
        Ok(None) => Err(LabError::Timeout {
            what: format!("guest {vm} console to settle"),
            secs: 0.0,
        }),
        Err(e) => Err(qerr(vm, format!("console: {e}"))),
    }
}

/// Wait until the guest's console shell answers (boot finished).
pub fn wait_ready(vm: &str, console: &Path, qemu_pid: i32, timeout: Duration) -> Result<(), LabError> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if !sys::pid_alive(qemu_pid) {
            return Err(qerr(vm, "QEMU exited during boot (see its log)"));
        }
        let Ok(mut s) = UnixStream::connect(console) else {
            std::thread::sleep(Duration::from_millis(100));
            continue;
        };
        let m = marker();
        let probe = format!("echo {}\n", split_marker(&m));
        // Probe every second until the shell, started last by /init, answers.
        while Instant::now() < deadline {
            if !sys::pid_alive(qemu_pid) {
                return Err(qerr(vm, "QEMU exited during boot (see its log)"));
            }
            s.write_all(probe.as_bytes())
                .map_err(LabError::io("writing to guest console"))?;
            let step = (Instant::now() + Duration::from_secs(1)).min(deadline);
            match read_until(&mut s, step, |t| t.contains(&m).then_some(())) {
                Ok(Some(())) => return sync(vm, &mut s, deadline),
                Ok(None) => {}
                Err(e) => return Err(qerr(vm, format!("console: {e}"))),
            }
        }
    }
    Err(LabError::Timeout {
        what: format!("guest {vm} to boot"),
        secs: timeout.as_secs_f64(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpio_layout() {
        let mut c = Cpio::new();
        c.file("a", 0o644, b"xyz");
        let b = c.finish();
        assert_eq!(&b[..6], b"070701");
        // Header 110 bytes + "a\0" padded to 112, data 3 padded to 4.
        assert_eq!(&b[110..112], b"a\0");
        assert_eq!(&b[112..115], b"xyz");
        assert_eq!(b.len() % 4, 0);
        assert!(b.windows(10).any(|w| w == b"TRAILER!!!"));
        // File size field (7th) is 3.
        assert_eq!(&b[6 + 6 * 8..6 + 7 * 8], b"00000003");
    }

    #[test]
    fn vhost_user_nic_arguments() {
        let a = vhost_user_nic_args_for(Path::new("/run/a,b.sock"), "52:54:00:00:00:01", 2, 256, true);
        let joined = a.join(" ");
        assert!(
            joined.contains("memory-backend-memfd,id=mem0,size=256M,share=on"),
            "{joined}"
        );
        assert!(
            joined.contains("socket,id=vu0,path=/run/a,,b.sock,reconnect=1"),
            "{joined}"
        );
        assert!(joined.contains("vhost-user,id=n0,chardev=vu0,queues=2"), "{joined}");
        assert!(
            joined.contains("mac=52:54:00:00:00:01,romfile=,mq=on,vectors=0"),
            "{joined}"
        );
        let kvm = vhost_user_nic_args_for(Path::new("/s"), "52:54:00:00:00:01", 1, 256, false).join(" ");
        assert!(!kvm.contains("vectors") && !kvm.contains("mq=on"), "{kvm}");
    }

    #[test]
    fn exec_parsing() {
        let m = "PLMx";
        let t =
            "junk PLM''x-BEGIN echoed\r\nPLMx-BEGIN\r\nhello\r\nworld\r\n\r\nPLMx-ERR\r\noops\r\n\r\nPLMx-END 3\r\n";
        let (o, e, rc) = parse_exec(t, m).unwrap();
        assert_eq!((o.as_str(), e.as_str(), rc), ("hello\nworld\n\n", "oops\n\n", 3));
        assert!(parse_exec("PLMx-BEGIN\nhello", m).is_none());
        assert!(parse_exec("PLMx-BEGIN\nPLMx-ERR\nPLMx-END 1", m).is_none());
        assert_eq!(shell_quote("a b'c"), r"'a b'\''c'");
        assert_eq!(shell_quote("eth0"), "eth0");
        assert_eq!(shell_quote(""), "''");
        assert_eq!(split_marker("abcd"), "ab''cd");
    }
}
