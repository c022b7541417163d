//! The real `executor` binary netboots a real machine: in a network
//! namespace with a tap device (`PRIVATE_INTERFACE=tap0`), QEMU (TCG) with
//! its built-in iPXE ROM gets the DUT's static MarsDB address from the
//! executor's DHCP server, downloads `boot.ipxe` from the executor's REST
//! API (iPXE percent-encodes the MAC in the path) and then the kernel and
//! initrd URLs the script names (here two other GET routes of the same
//! API, so that every byte comes from the executor).
//!
//! Needs root (CI runs as root) and the Debian packages `qemu-system-x86`
//! and `ipxe-qemu` (`scripts/test-all` installs them).

use std::io::Write;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const MAC: &str = "52:54:00:5e:0b:01";
const DUT_IP: &str = "10.98.51.50";
const GW: &str = "10.98.51.1";
const PORT: u16 = 8080;

/// Fails with a clear message when a peer program is missing.
fn require(program: &str, package: &str) {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(program).is_file()))
        .unwrap_or(false);
    assert!(
        found,
        "{program} is not installed: install the Debian package `{package}` \
         (scripts/test-all installs it)"
    );
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A network namespace, deleted on drop.
struct Netns(String);

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// A child process killed (by PID) and reaped on drop.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Sends an IPv6 router advertisement on tap0 every 300 ms (iPXE otherwise
/// waits about 13 s for one before it goes on).
const RA_SENDER: &str = r#"
import socket, time
s = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, 255)
idx = socket.if_nametoindex("tap0")
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_IF, idx)
ra = bytes([134, 0, 0, 0, 64, 0, 0, 0] + [0] * 8)
while True:
    try:
        s.sendto(ra, ("ff02::1", 0, 0, idx))
    except OSError:
        pass
    time.sleep(0.3)
"#;

fn wait_for(
    what: &str,
    limit: Duration,
    mut done: impl FnMut() -> bool,
    context: impl Fn() -> String,
) {
    let deadline = Instant::now() + limit;
    while !done() {
        assert!(
            Instant::now() < deadline,
            "{what} did not happen within {limit:?}\n{}",
            context()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn executor_netboots_qemu_ipxe_from_its_dhcp_and_boot_ipxe() {
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "this test creates a network namespace and needs root (CI runs as root)"
    );
    require("qemu-system-x86_64", "qemu-system-x86");
    require("python3", "python3");
    assert!(
        std::path::Path::new("/usr/share/qemu/efi-virtio.rom").exists()
            || std::path::Path::new("/usr/lib/ipxe/qemu/efi-virtio.rom").exists(),
        "QEMU's iPXE NIC ROM is missing: install the Debian package `ipxe-qemu`"
    );
    let ns = Netns(format!("vnb{}", std::process::id()));
    ip(&["netns", "add", &ns.0]);
    ip(&["-n", &ns.0, "link", "set", "lo", "up"]);
    ip(&["-n", &ns.0, "tuntap", "add", "dev", "tap0", "mode", "tap"]);
    ip(&[
        "-n",
        &ns.0,
        "addr",
        "add",
        &format!("{GW}/24"),
        "dev",
        "tap0",
    ]);
    ip(&["-n", &ns.0, "link", "set", "tap0", "up"]);

    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("mars_db.yaml");
    std::fs::write(
        &db,
        format!(
            "duts:\n  \"{MAC}\":\n    base_name: qemu\n    ip_address: {DUT_IP}\n    \
             mac_address: \"{MAC}\"\n    tags: []\n    ready_for_service: true\n"
        ),
    )
    .unwrap();
    let tftp_root = dir.path().join("tftp");
    std::fs::create_dir(&tftp_root).unwrap();
    let log_path = dir.path().join("executor.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let base = format!("http://{GW}:{PORT}");
    let executor = KillOnDrop(
        Command::new("ip")
            .args(["netns", "exec", &ns.0, env!("CARGO_BIN_EXE_executor")])
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("RUST_LOG", "info,vivian::boots=debug")
            .env("FARM_NAME", "netboot-test")
            .env("MARS_DB_FILE", &db)
            .env("GITLAB_CONF_FILE", dir.path().join("gitlab-runner.toml"))
            .env("EXECUTOR_HOST", GW)
            .env("EXECUTOR_PORT", PORT.to_string())
            .env("EXECUTOR_URL", &base)
            .env("PRIVATE_INTERFACE", "tap0")
            .env("BOOTS_TFTP_ROOT", &tftp_root)
            .env("SERGENT_HARTMAN_QUICK_CHECK", "disabled")
            // Any GET route of the executor stands in for the artifacts.
            .env("BOOTS_DEFAULT_KERNEL", format!("{base}/api/v1/duts"))
            .env("BOOTS_DEFAULT_INITRD", format!("{base}/api/v1/pdus"))
            .env("BOOTS_DEFAULT_CMDLINE", "console=ttyS0 a;b")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start the executor in the namespace"),
    );
    let read_log = || std::fs::read_to_string(&log_path).unwrap_or_default();
    wait_for(
        "the executor's start-up",
        Duration::from_secs(30),
        || read_log().contains("REST API listening"),
        read_log,
    );

    let ra = KillOnDrop(
        Command::new("ip")
            .args(["netns", "exec", &ns.0, "python3", "-c", RA_SENDER])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start the router advertisement sender"),
    );
    let console_path = dir.path().join("console.txt");
    let console = std::fs::File::create(&console_path).unwrap();
    let started = Instant::now();
    let qemu = KillOnDrop(
        Command::new("ip")
            .args(["netns", "exec", &ns.0, "qemu-system-x86_64"])
            .args([
                "-accel",
                "tcg",
                "-m",
                "256",
                "-nographic",
                "-no-reboot",
                "-netdev",
                "tap,id=n0,ifname=tap0,script=no,downscript=no",
                "-device",
                &format!("virtio-net-pci,netdev=n0,mac={MAC}"),
                "-boot",
                "n",
            ])
            .stdin(Stdio::null())
            .stdout(console.try_clone().unwrap())
            .stderr(console)
            .spawn()
            .expect("start qemu-system-x86_64"),
    );
    let read_console = || std::fs::read_to_string(&console_path).unwrap_or_default();
    // iPXE prints every URL it downloads, then "ok" once the executor
    // answered 200 and the body arrived: the script, the kernel, the initrd.
    let initrd_ok = format!("{base}/api/v1/pdus... ok");
    wait_for(
        "iPXE's download of the initrd",
        Duration::from_secs(60),
        || read_console().contains(&initrd_ok),
        || {
            format!(
                "console:\n{}\nexecutor log:\n{}",
                read_console(),
                read_log()
            )
        },
    );
    let elapsed = started.elapsed();
    drop(qemu);
    drop(ra);
    drop(executor);
    let _ = writeln!(
        std::io::stderr(),
        "QEMU power-on to initrd download: {elapsed:?}"
    );
    let log = read_log();
    let console = read_console();

    // The static address of the MarsDB DUT, from the executor's DHCP.
    assert!(
        console.contains(&format!("net0: {DUT_IP}/255.255.255.0 gw {GW}")),
        "iPXE did not get the DUT's static address:\n{console}\n{log}"
    );
    // boot.ipxe from the REST API: iPXE writes the MAC's colons as %3A in
    // the path, and the route takes it.
    let encoded = MAC.replace(':', "%3A");
    let pos = |needle: &str| {
        console
            .find(needle)
            .unwrap_or_else(|| panic!("{needle:?} not on the console:\n{console}\n{log}"))
    };
    let script_at = pos(&format!("{base}/boot/{encoded}/boot.ipxe... ok"));
    assert!(console.contains("boot.ipxe : "), "{console}");
    // Then the kernel and the initrd of the script, in that order.
    let kernel_at = pos(&format!("{base}/api/v1/duts... ok"));
    let initrd_at = pos(&initrd_ok);
    assert!(script_at < kernel_at && kernel_at < initrd_at, "{console}");
    // The DUT's DHCP exchanges were recorded as boot events of that DUT.
    assert!(
        log.lines().any(|l| l.contains("Dhcp { message: Request")
            && l.contains(&format!("given_ip: Some({DUT_IP})"))
            && l.contains(&format!("Some(\"{MAC}\")"))),
        "no DHCP boot event of the DUT in the executor log:\n{log}"
    );
}
