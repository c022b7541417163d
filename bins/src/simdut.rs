//! Simulated DUTs: a machine that netboots like a PC, without a PC.
//!
//! When its outlet is switched ON, a [`SimDut`] does what a netbooting
//! machine's firmware and kernel do, over the same protocols as real ones:
//!
//! 1. "firmware": when a DHCP server is configured ([`SimDhcpConfig`]),
//!    a DHCP DISCOVER/OFFER/REQUEST/ACK exchange as iPXE makes it (option 93
//!    client architecture, vendor class `PXEClient:Arch:...`, user class
//!    `iPXE`, retransmitted until a server answers): the machine then uses
//!    the address it was given (for `@IP@`, and as the source address of its
//!    HTTP and console connections when that address is local) and the boot
//!    file URL of the ACK. Without a DHCP server it goes straight to the
//!    boot URL. Then it fetches the executor's boot script
//!    `GET {executor}/boot/<mac>/boot.ipxe?platform=pcbios&buildarch=x86_64`
//!    (retrying every second, like the iPXE binaries Vivian serves), and
//!    interprets the subset of iPXE it needs (`set name:hex`, `${name:string}`,
//!    `echo`, `kernel`, `initrd`, `boot`);
//! 2. downloads the kernel and initrd URLs the script names;
//! 3. connects its serial console to a netconsole (SALAD's TCP console port),
//!    prints `SALAD.machine_id=<mac>` and kernel-like boot lines;
//! 4. runs its *script*, then idles with the console open until powered off.
//!
//! # Script format
//!
//! The script is made of the kernel artifact's body, when it starts with the
//! line `#!vivian-sim`, followed by every `vivian.cmd="<command>"` item of the
//! kernel command line, in order. One command per line:
//!
//! | command | effect |
//! |---|---|
//! | `print <text>` | prints `<text>` and a newline on the console |
//! | `printf <text>` | prints `<text>` alone, in one write, with `\n`, `\r`, `\t` and `\\` turned into a newline, a carriage return, a tab and a backslash (no newline added: a line can end in a later command; as for every command, spaces at either end are dropped) |
//! | `sleep <seconds>` | waits (fractions allowed) |
//! | `post <url> [<body>]` | HTTP POST of a JSON body; prints `SIMDUT.http_status=<code>` |
//! | `get <url>` | HTTP GET; prints `SIMDUT.http_status=<code>` |
//! | `expect <text> [<seconds>]` | waits until a console input line contains `<text>` (default 60 s); prints `SIMDUT.expect_timeout` on expiry |
//! | `echo_input` | from now on, echoes every console input line back to the console |
//! | `poweroff` | prints `reboot: Power down`, closes the console and stops |
//! | `hang` | stops running the script but keeps the console open (a stuck machine) |
//!
//! In `<text>`, `<url>` and `<json>`, the placeholders `@MAC@`, `@IP@`
//! (the DUT's address: the one DHCP gave it, else 127.0.0.1 on loopback),
//! `@EXECUTOR@` (the executor URL) and `@TIME_NS@` (the wall-clock time
//! when the line runs, in nanoseconds since the Unix epoch: lets a job
//! measure its console latency) are replaced. (Not `${...}`: iPXE expands those in the
//! kernel command line before the machine sees them, as real iPXE does.) Lines that are empty or start with `#` are
//! skipped. An unknown command prints `SIMDUT.error=unknown command: ...` and
//! is skipped.
//!
//! The body of `post` is either raw JSON (starting with `{`, handy in a
//! kernel-body script) or, since a kernel command line cannot carry nested
//! double quotes, a list of httpie-style fields that build a JSON object:
//! `key=value` (a string), `key:=<json>` (a raw JSON value, e.g. `n:=3`,
//! `tags:=[]`) and `key[]=value` (appends a string to the list `key`).
//!
//! A `vivian.boot_delay=<seconds>` item of the kernel command line makes
//! the machine stay silent that long after loading its boot script, before
//! its console says anything (a slow or stuck firmware: jobs use it to hit
//! their `first_console_activity` timeout).
//!
//! Powering the outlet OFF aborts whatever the machine is doing and closes
//! its console, at any point.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use dhcproto::v4::{
    Architecture, DhcpOption, Flags, HType, Message as DhcpMessage, MessageType, Opcode, OptionCode,
};
use dhcproto::{Decodable, Encodable};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

/// The largest artifact a simulated DUT downloads (bigger ones are refused).
pub const MAX_ARTIFACT_SIZE: u64 = 256 * 1024 * 1024;

/// How a simulated DUT reaches the farm.
#[derive(Debug, Clone)]
pub struct SimDutConfig {
    /// The DUT's MAC address, lower-case colon form (its machine id).
    pub mac: String,
    /// The DUT's IP address, used for `@IP@` in scripts.
    pub ip: String,
    /// Base URL of the executor (`http://host:port`), where `boot.ipxe` is.
    pub executor_url: String,
    /// `host:port` of the netconsole the serial console connects to.
    pub console_addr: String,
    /// The `platform` the firmware reports (`pcbios` or `efi`).
    pub platform: String,
    /// The `buildarch` the firmware reports (`x86_64`, `i386`, `arm64`, ...).
    pub buildarch: String,
    /// The DHCP server to ask for an address and a boot file first; `None`:
    /// no DHCP, straight to the boot URL.
    pub dhcp: Option<SimDhcpConfig>,
}

/// Where a simulated DUT's firmware sends its DHCP requests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SimDhcpConfig {
    /// Where DISCOVER and REQUEST go: `255.255.255.255:67` on a real
    /// network, the server's own address and port on loopback.
    pub server: SocketAddr,
    /// Where the client receives the replies. DHCP servers answer to port
    /// 68 (a privileged port: binding it needs root or
    /// CAP_NET_BIND_SERVICE); default `0.0.0.0:68`.
    pub bind: SocketAddr,
    /// The interface the client binds to (`SO_BINDTODEVICE`), if any.
    pub interface: Option<String>,
    /// How long to wait for a reply before sending the request again.
    pub reply_timeout: Duration,
    /// How many times a request is sent before the exchange starts over.
    pub attempts: u32,
}

impl SimDhcpConfig {
    /// Asks the server at `server`, listening on `0.0.0.0:68`.
    pub fn new(server: SocketAddr) -> Self {
        SimDhcpConfig {
            server,
            bind: SocketAddr::from((Ipv4Addr::UNSPECIFIED, 68)),
            interface: None,
            reply_timeout: Duration::from_millis(500),
            attempts: 4,
        }
    }
}

impl SimDutConfig {
    /// A PC-BIOS x86_64 machine on loopback.
    pub fn new(mac: &str, executor_url: &str, console_addr: &str) -> Self {
        SimDutConfig {
            mac: mac.to_ascii_lowercase(),
            ip: "127.0.0.1".into(),
            executor_url: executor_url.trim_end_matches('/').to_string(),
            console_addr: console_addr.to_string(),
            platform: "pcbios".into(),
            buildarch: "x86_64".into(),
            dhcp: None,
        }
    }

    /// The same machine, asking `dhcp` for its address first.
    pub fn with_dhcp(mut self, dhcp: SimDhcpConfig) -> Self {
        self.dhcp = Some(dhcp);
        self
    }
}

/// A simulated machine behind a PDU outlet. Cheap to create; it only runs
/// while powered.
pub struct SimDut {
    config: SimDutConfig,
    run: Option<(watch::Sender<bool>, JoinHandle<()>)>,
    http: HttpClients,
}

/// The firmware's HTTP clients of a machine, one per local address, made
/// once: a client loads the system's CA certificates when it is built
/// (milliseconds of CPU), which every boot would otherwise pay.
type HttpClients =
    std::sync::Arc<std::sync::Mutex<std::collections::HashMap<Option<IpAddr>, reqwest::Client>>>;

impl SimDut {
    /// A powered-off machine.
    pub fn new(config: SimDutConfig) -> Self {
        SimDut {
            config,
            run: None,
            http: HttpClients::default(),
        }
    }

    /// The machine's configuration.
    pub fn config(&self) -> &SimDutConfig {
        &self.config
    }

    /// Whether the machine is powered (its boot task exists and has not
    /// been stopped).
    pub fn is_powered(&self) -> bool {
        self.run.is_some()
    }

    /// Powers the machine ON: starts booting. A no-op when already ON.
    pub fn power_on(&mut self) {
        if self.run.is_some() {
            return;
        }
        let (stop_tx, stop_rx) = watch::channel(false);
        let config = self.config.clone();
        let http = self.http.clone();
        let handle = tokio::spawn(async move {
            let mac = config.mac.clone();
            let mut stop = stop_rx;
            tokio::select! {
                _ = boot(config, http) => {}
                _ = stop.wait_for(|s| *s) => {}
            }
            tracing::debug!(mac = %mac, "simulated DUT stopped");
        });
        self.run = Some((stop_tx, handle));
    }

    /// Powers the machine OFF: aborts everything and closes the console.
    /// Waits for the boot task to end. A no-op when already OFF.
    pub async fn power_off(&mut self) {
        if let Some((stop, handle)) = self.run.take() {
            let _ = stop.send(true);
            let _ = handle.await;
        }
    }
}

impl Drop for SimDut {
    fn drop(&mut self) {
        if let Some((stop, handle)) = self.run.take() {
            let _ = stop.send(true);
            handle.abort();
        }
    }
}

/// What the boot script asked the firmware to boot.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct IpxeBoot {
    /// Lines printed by `echo`.
    pub echoes: Vec<String>,
    /// The kernel URL.
    pub kernel: Option<String>,
    /// The kernel's arguments (everything after the URL), variables expanded.
    pub kernel_args: String,
    /// The initrd URL.
    pub initrd: Option<String>,
    /// Whether the script reached `boot`.
    pub boots: bool,
}

/// Errors of the iPXE subset interpreter.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IpxeError {
    /// The script does not start with `#!ipxe`.
    #[error("not an iPXE script (first line is {0:?})")]
    NotIpxe(String),
    /// A `set` line that is not `set <name>:hex <hex bytes>` or `set <name> <value>`.
    #[error("line {line}: cannot parse {text:?}")]
    BadLine {
        /// 1-based line number.
        line: usize,
        /// The line.
        text: String,
    },
}

/// Interprets the subset of iPXE that Vivian's boot scripts use.
pub fn interpret_ipxe(script: &str) -> Result<IpxeBoot, IpxeError> {
    let mut lines = script.lines();
    let first = lines.next().unwrap_or("").trim();
    if first != "#!ipxe" {
        return Err(IpxeError::NotIpxe(first.to_string()));
    }
    let mut vars: Vec<(String, String)> = Vec::new();
    let mut out = IpxeBoot::default();
    for (idx, raw) in script.lines().enumerate().skip(1) {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (cmd, rest) = line.split_once(' ').unwrap_or((line, ""));
        let rest = rest.trim();
        let bad = || IpxeError::BadLine {
            line: idx + 1,
            text: raw.to_string(),
        };
        match cmd {
            "set" => {
                let (name, value) = rest.split_once(' ').ok_or_else(bad)?;
                let value = if let Some(name) = name.strip_suffix(":hex") {
                    let bytes = value
                        .split(':')
                        .map(|h| u8::from_str_radix(h, 16))
                        .collect::<Result<Vec<u8>, _>>()
                        .map_err(|_| bad())?;
                    vars.push((
                        name.to_string(),
                        String::from_utf8_lossy(&bytes).into_owned(),
                    ));
                    continue;
                } else {
                    expand(value, &vars)
                };
                vars.push((name.to_string(), value));
            }
            "echo" => out.echoes.push(expand(rest, &vars)),
            "kernel" | "chain" => {
                let expanded = expand(rest, &vars);
                let (url, args) = expanded.split_once(' ').unwrap_or((expanded.as_str(), ""));
                out.kernel = Some(url.to_string());
                out.kernel_args = args.trim().to_string();
            }
            "initrd" => {
                // `initrd [--name <n>] <url>`: the URL is the last word.
                let expanded = expand(rest, &vars);
                let url = expanded
                    .split_whitespace()
                    .rfind(|w| !w.starts_with("--"))
                    .ok_or_else(bad)?;
                out.initrd = Some(url.to_string());
            }
            "boot" => {
                out.boots = true;
                break;
            }
            _ => {} // other commands are irrelevant to the simulation
        }
    }
    Ok(out)
}

/// Expands `${name}` and `${name:string}` from `vars` (last definition wins).
fn expand(text: &str, vars: &[(String, String)]) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        match after.find('}') {
            Some(end) => {
                let name = after[..end].trim_end_matches(":string");
                // iPXE expands unknown settings to nothing.
                if let Some((_, v)) = vars.iter().rev().find(|(n, _)| n == name) {
                    out.push_str(v);
                }
                rest = &after[end + 1..];
            }
            None => {
                out.push_str(&rest[start..]);
                rest = "";
            }
        }
    }
    out.push_str(rest);
    out
}

/// Splits a kernel command line into items, honouring double quotes the way
/// the Linux kernel does (`a="b c"` is one item, the quotes removed).
pub fn split_cmdline(cmdline: &str) -> Vec<String> {
    let mut items = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    let mut any = false;
    for c in cmdline.chars() {
        match c {
            '"' => {
                quoted = !quoted;
                any = true;
            }
            c if c.is_whitespace() && !quoted => {
                if any {
                    items.push(std::mem::take(&mut cur));
                    any = false;
                }
            }
            c => {
                cur.push(c);
                any = true;
            }
        }
    }
    if any {
        items.push(cur);
    }
    items
}

/// The `vivian.boot_delay=<seconds>` of a kernel command line (the last
/// one), capped at a day.
pub fn boot_delay(cmdline: &str) -> Option<f64> {
    split_cmdline(cmdline)
        .iter()
        .filter_map(|i| i.strip_prefix("vivian.boot_delay=")?.parse::<f64>().ok())
        .rfind(|s| s.is_finite() && *s >= 0.0)
        .map(|s| s.min(86_400.0))
}

/// Builds the simulated machine's script from the kernel body and the
/// command line (see the module documentation).
pub fn build_script(kernel_body: &[u8], cmdline: &str) -> Vec<String> {
    let mut script = Vec::new();
    let body = String::from_utf8_lossy(kernel_body);
    let mut lines = body.lines();
    if lines.next().map(str::trim) == Some("#!vivian-sim") {
        script.extend(lines.map(str::to_string));
    }
    for item in split_cmdline(cmdline) {
        if let Some(cmd) = item.strip_prefix("vivian.cmd=") {
            script.push(cmd.to_string());
        }
    }
    script
        .into_iter()
        .map(|l| l.trim().to_string())
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect()
}

/// The bytes of a `printf` command's text: `\n`, `\r`, `\t` and `\\`
/// unescaped, any other backslash kept as it is.
pub fn unescape(text: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(text.len());
    let mut bytes = text.bytes();
    while let Some(b) = bytes.next() {
        if b != b'\\' {
            out.push(b);
            continue;
        }
        match bytes.next() {
            Some(b'n') => out.push(b'\n'),
            Some(b'r') => out.push(b'\r'),
            Some(b't') => out.push(b'\t'),
            Some(b'\\') => out.push(b'\\'),
            Some(other) => out.extend_from_slice(&[b'\\', other]),
            None => out.push(b'\\'),
        }
    }
    out
}

/// Builds the JSON body of a `post` command (see the module documentation).
pub fn post_body(fields: &str) -> Result<String, String> {
    if fields.is_empty() || fields.starts_with('{') {
        return Ok(fields.to_string());
    }
    let mut obj = serde_json::Map::new();
    for field in split_cmdline(fields) {
        if let Some((k, v)) = field.split_once(":=") {
            let v: serde_json::Value =
                serde_json::from_str(v).map_err(|e| format!("bad JSON in {field:?}: {e}"))?;
            obj.insert(k.to_string(), v);
        } else if let Some((k, v)) = field.split_once("[]=") {
            let entry = obj
                .entry(k.to_string())
                .or_insert_with(|| serde_json::Value::Array(Vec::new()));
            match entry {
                serde_json::Value::Array(a) => a.push(v.into()),
                _ => return Err(format!("{k} is not a list in {field:?}")),
            }
        } else if let Some((k, v)) = field.split_once('=') {
            obj.insert(k.to_string(), v.into());
        } else {
            return Err(format!(
                "bad field {field:?}: expected key=value, key:=json or key[]=value"
            ));
        }
    }
    Ok(serde_json::Value::Object(obj).to_string())
}

fn substitute(text: &str, config: &SimDutConfig) -> String {
    let mut out = text
        .replace("@MAC@", &config.mac)
        .replace("@IP@", &config.ip)
        .replace("@EXECUTOR@", &config.executor_url);
    if out.contains("@TIME_NS@") {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        out = out.replace("@TIME_NS@", &now.to_string());
    }
    out
}

/// What a DHCP server gave a simulated DUT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DhcpLease {
    /// The address the machine was given (`yiaddr` of the ACK).
    pub ip: Ipv4Addr,
    /// The server that gave it (option 54).
    pub server_id: Ipv4Addr,
    /// The boot file (option 67, else the `file` field), if any.
    pub bootfile: Option<String>,
}

/// Why a DHCP exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum DhcpClientError {
    /// The MAC address is not six hex bytes.
    #[error("not a MAC address: {0:?}")]
    BadMac(String),
    /// The client socket could not be set up or used.
    #[error("DHCP client socket on {addr}: {reason}")]
    Socket {
        /// The address the client binds or sends to.
        addr: SocketAddr,
        /// What failed.
        reason: String,
    },
    /// No OFFER (or no ACK) after every attempt.
    #[error("no DHCP {0} from {1} after every attempt")]
    NoReply(&'static str, SocketAddr),
    /// The server refused the REQUEST.
    #[error("the DHCP server answered NAK")]
    Nak,
}

/// The option 93 client architecture iPXE reports for a platform.
pub fn client_arch(platform: &str, buildarch: &str) -> u16 {
    match (platform, buildarch) {
        ("efi", "i386") => 6,
        ("efi", "arm32") => 10,
        ("efi", "arm64") => 11,
        ("efi", _) => 7,
        _ => 0,
    }
}

fn parse_mac(mac: &str) -> Option<[u8; 6]> {
    let mut out = [0u8; 6];
    let mut parts = mac.split([':', '-']);
    for b in out.iter_mut() {
        *b = u8::from_str_radix(parts.next()?, 16).ok()?;
    }
    parts.next().is_none().then_some(out)
}

/// A DHCP request as iPXE sends it.
fn dhcp_request(
    kind: MessageType,
    xid: u32,
    mac: &[u8; 6],
    arch: u16,
    offer: Option<(Ipv4Addr, Ipv4Addr)>,
) -> DhcpMessage {
    let mut m = DhcpMessage::default();
    m.set_opcode(Opcode::BootRequest)
        .set_htype(HType::Eth)
        .set_xid(xid)
        .set_flags(Flags::default().set_broadcast())
        .set_chaddr(mac);
    let opts = m.opts_mut();
    opts.insert(DhcpOption::MessageType(kind));
    let mut client_id = vec![1u8];
    client_id.extend_from_slice(mac);
    opts.insert(DhcpOption::ClientIdentifier(client_id));
    opts.insert(DhcpOption::ClientSystemArchitecture(Architecture::from(
        arch,
    )));
    opts.insert(DhcpOption::ClassIdentifier(
        format!("PXEClient:Arch:{arch:05}:UNDI:002001").into_bytes(),
    ));
    opts.insert(DhcpOption::UserClass(b"iPXE".to_vec()));
    opts.insert(DhcpOption::ParameterRequestList(vec![
        OptionCode::SubnetMask,
        OptionCode::Router,
        OptionCode::DomainNameServer,
        OptionCode::Hostname,
        OptionCode::ServerIdentifier,
        OptionCode::BootfileName,
    ]));
    if let Some((ip, server)) = offer {
        opts.insert(DhcpOption::RequestedIpAddress(ip));
        opts.insert(DhcpOption::ServerIdentifier(server));
    }
    m
}

/// Sends `msg` until a reply of one of the `want` types for the same
/// transaction and MAC comes back (each attempt waits `reply_timeout`).
async fn exchange(
    sock: &tokio::net::UdpSocket,
    cfg: &SimDhcpConfig,
    msg: &DhcpMessage,
    want: &[MessageType],
    what: &'static str,
) -> Result<DhcpMessage, DhcpClientError> {
    let bytes = msg.to_vec().map_err(|e| DhcpClientError::Socket {
        addr: cfg.server,
        reason: format!("encoding: {e}"),
    })?;
    let mut buf = vec![0u8; 1500];
    for _ in 0..cfg.attempts.max(1) {
        sock.send_to(&bytes, cfg.server)
            .await
            .map_err(|e| DhcpClientError::Socket {
                addr: cfg.server,
                reason: format!("send: {e}"),
            })?;
        let deadline = tokio::time::Instant::now() + cfg.reply_timeout;
        while let Ok(r) = tokio::time::timeout_at(deadline, sock.recv_from(&mut buf)).await {
            let Ok((n, _)) = r else { continue };
            let Ok(reply) = DhcpMessage::from_bytes(&buf[..n]) else {
                continue;
            };
            if reply.opcode() != Opcode::BootReply
                || reply.xid() != msg.xid()
                || reply.chaddr().get(..6) != msg.chaddr().get(..6)
            {
                continue; // another client's exchange
            }
            match reply.opts().msg_type() {
                Some(MessageType::Nak) => return Err(DhcpClientError::Nak),
                Some(t) if want.contains(&t) => return Ok(reply),
                _ => continue,
            }
        }
    }
    Err(DhcpClientError::NoReply(what, cfg.server))
}

/// One DHCP DISCOVER/OFFER/REQUEST/ACK exchange, as iPXE on a machine with
/// MAC `mac` makes it. Replies of other transactions are ignored, so
/// several simulated DUTs can share the client port.
pub async fn dhcp_dora(
    mac: &str,
    platform: &str,
    buildarch: &str,
    cfg: &SimDhcpConfig,
) -> Result<DhcpLease, DhcpClientError> {
    let hw = parse_mac(mac).ok_or_else(|| DhcpClientError::BadMac(mac.to_string()))?;
    let std_sock = vivian_boots::iface::bind_udp(cfg.bind, cfg.interface.as_deref(), true)
        .map_err(|e| DhcpClientError::Socket {
            addr: cfg.bind,
            reason: e.to_string(),
        })?;
    let sock = tokio::net::UdpSocket::from_std(std_sock).map_err(|e| DhcpClientError::Socket {
        addr: cfg.bind,
        reason: e.to_string(),
    })?;
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let xid = nanos ^ u32::from_be_bytes([hw[2], hw[3], hw[4], hw[5]]).rotate_left(7);
    let arch = client_arch(platform, buildarch);
    let discover = dhcp_request(MessageType::Discover, xid, &hw, arch, None);
    let offer = exchange(&sock, cfg, &discover, &[MessageType::Offer], "OFFER").await?;
    let server_id = match offer.opts().get(OptionCode::ServerIdentifier) {
        Some(DhcpOption::ServerIdentifier(ip)) => *ip,
        _ => offer.siaddr(),
    };
    let request = dhcp_request(
        MessageType::Request,
        xid,
        &hw,
        arch,
        Some((offer.yiaddr(), server_id)),
    );
    let ack = exchange(&sock, cfg, &request, &[MessageType::Ack], "ACK").await?;
    let bootfile = match ack.opts().get(OptionCode::BootfileName) {
        Some(DhcpOption::BootfileName(b)) => Some(String::from_utf8_lossy(b).into_owned()),
        _ => ack.fname().map(|f| {
            String::from_utf8_lossy(f)
                .trim_end_matches('\0')
                .to_string()
        }),
    }
    .filter(|b| !b.is_empty());
    Ok(DhcpLease {
        ip: ack.yiaddr(),
        server_id,
        bootfile,
    })
}

/// Whether this host has `ip` (a simulated DUT then uses it as the
/// source address of its connections).
fn is_local(ip: Ipv4Addr) -> bool {
    std::net::UdpSocket::bind((ip, 0)).is_ok()
}

async fn fetch(client: &reqwest::Client, url: &str) -> Result<Vec<u8>, String> {
    let mut resp = client
        .get(url)
        .send()
        .await
        .map_err(|e| format!("{url}: {e}"))?;
    if !resp.status().is_success() {
        return Err(format!("{url}: HTTP {}", resp.status().as_u16()));
    }
    let mut body = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(|e| format!("{url}: {e}"))? {
        body.extend_from_slice(&chunk);
        if body.len() as u64 > MAX_ARTIFACT_SIZE {
            return Err(format!("{url}: larger than {MAX_ARTIFACT_SIZE} bytes"));
        }
    }
    Ok(body)
}

/// The console as seen by the machine: a line writer, plus the lines typed
/// into it by the console's client.
struct Console {
    writer: tokio::net::tcp::OwnedWriteHalf,
    input: mpsc::Receiver<String>,
    echo: bool,
}

impl Console {
    async fn connect(addr: &str, local: Option<IpAddr>) -> Option<Console> {
        let stream = match local {
            None => TcpStream::connect(addr).await.ok()?,
            Some(ip) => {
                let target = tokio::net::lookup_host(addr)
                    .await
                    .ok()?
                    .find(|a| a.is_ipv4() == ip.is_ipv4())?;
                let sock = if ip.is_ipv4() {
                    TcpSocket::new_v4()
                } else {
                    TcpSocket::new_v6()
                }
                .ok()?;
                sock.bind(SocketAddr::new(ip, 0)).ok()?;
                sock.connect(target).await.ok()?
            }
        };
        let _ = stream.set_nodelay(true);
        let (read, writer) = stream.into_split();
        let (tx, input) = mpsc::channel(64);
        tokio::spawn(async move {
            let mut lines = BufReader::new(read).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                if tx.send(line).await.is_err() {
                    break;
                }
            }
        });
        Some(Console {
            writer,
            input,
            echo: false,
        })
    }

    async fn print(&mut self, line: &str) {
        let mut bytes = Vec::with_capacity(line.len() + 2);
        bytes.extend_from_slice(line.as_bytes());
        bytes.extend_from_slice(b"\r\n");
        self.write(&bytes).await;
    }

    /// Writes `bytes` as they are, in one write.
    async fn write(&mut self, bytes: &[u8]) {
        let _ = self.writer.write_all(bytes).await;
    }

    /// Echoes pending input lines if asked to.
    async fn pump(&mut self) {
        while let Ok(line) = self.input.try_recv() {
            if self.echo {
                self.print(&line).await;
            }
        }
    }
}

/// The firmware's HTTP client for `local_ip` (see [`HttpClients`]). No
/// connection is kept between requests, as a firmware keeps none across
/// boots.
fn http_client(
    clients: &HttpClients,
    local_ip: Option<IpAddr>,
) -> reqwest::Result<reqwest::Client> {
    let mut clients = clients.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(c) = clients.get(&local_ip) {
        return Ok(c.clone());
    }
    let (c, _) = vivian_core::http_client::build_with("simulated DUT", || {
        reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .local_address(local_ip)
            .pool_max_idle_per_host(0)
    })?;
    clients.insert(local_ip, c.clone());
    Ok(c)
}

async fn boot(mut config: SimDutConfig, http: HttpClients) {
    let mut boot_url = format!(
        "{}/boot/{}/boot.ipxe?platform={}&buildarch={}",
        config.executor_url, config.mac, config.platform, config.buildarch
    );
    // Firmware: DHCP first when a server is configured, retried until it
    // answers (as iPXE does), then the boot file it names.
    let mut local_ip = None;
    let mut dhcp_line = None;
    if let Some(dhcp) = config.dhcp.clone() {
        let lease = loop {
            match dhcp_dora(&config.mac, &config.platform, &config.buildarch, &dhcp).await {
                Ok(l) => break l,
                Err(e) => {
                    tracing::warn!("simulated DUT {}: DHCP: {e}", config.mac);
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        };
        tracing::debug!(mac = %config.mac, ?lease, "simulated DUT: DHCP lease");
        config.ip = lease.ip.to_string();
        if is_local(lease.ip) {
            local_ip = Some(IpAddr::V4(lease.ip));
        }
        match &lease.bootfile {
            Some(b) if b.starts_with("http://") || b.starts_with("https://") => {
                boot_url = b.clone()
            }
            other => tracing::warn!(
                "simulated DUT {}: the DHCP boot file {other:?} is not an HTTP URL: \
                 using {boot_url}",
                config.mac
            ),
        }
        dhcp_line = Some(format!(
            "net0: {}/{} via DHCP from {} (boot file {})",
            lease.ip,
            config.mac,
            lease.server_id,
            lease.bootfile.as_deref().unwrap_or("none")
        ));
    }
    let client = match http_client(&http, local_ip) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!("simulated DUT {}: HTTP client: {e}", config.mac);
            return;
        }
    };
    // Firmware: retry the boot script every second, like the iPXE binaries.
    let boot = loop {
        match fetch(&client, &boot_url).await {
            Ok(body) => match interpret_ipxe(&String::from_utf8_lossy(&body)) {
                Ok(b) if b.boots && b.kernel.is_some() => break b,
                Ok(_) => tracing::debug!("{}: boot script does not boot", config.mac),
                Err(e) => tracing::debug!("{}: {e}", config.mac),
            },
            Err(e) => tracing::debug!("{}: {e}", config.mac),
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    // A slow (or stuck) firmware: silent for that long before any output.
    if let Some(secs) = boot_delay(&boot.kernel_args) {
        tokio::time::sleep(Duration::from_secs_f64(secs)).await;
    }
    let Some(mut console) = Console::connect(&config.console_addr, local_ip).await else {
        tracing::warn!(
            "simulated DUT {}: cannot reach the netconsole at {}",
            config.mac,
            config.console_addr
        );
        return;
    };
    console
        .print(&format!("SALAD.machine_id={}", config.mac))
        .await;
    console
        .print("iPXE (simulated) -- Open Source Network Boot Firmware")
        .await;
    if let Some(l) = &dhcp_line {
        console.print(l).await;
    }
    for e in &boot.echoes {
        console.print(e).await;
    }
    let kernel_url = boot.kernel.clone().unwrap_or_default();
    let kernel = match fetch(&client, &kernel_url).await {
        Ok(k) => k,
        Err(e) => {
            console.print(&format!("Could not boot image: {e}")).await;
            return idle(console).await;
        }
    };
    if let Some(initrd) = &boot.initrd {
        if let Err(e) = fetch(&client, initrd).await {
            console.print(&format!("Could not boot image: {e}")).await;
            return idle(console).await;
        }
    }
    console
        .print("[    0.000000] Linux version 6.1.0-vivian-sim (simulated DUT)")
        .await;
    console
        .print(&format!(
            "[    0.000000] Command line: {}",
            boot.kernel_args
        ))
        .await;
    console
        .print("[    0.100000] Run /init as init process")
        .await;
    for line in build_script(&kernel, &boot.kernel_args) {
        console.pump().await;
        let line = substitute(&line, &config);
        let (cmd, arg) = line.split_once(' ').unwrap_or((line.as_str(), ""));
        let arg = arg.trim();
        match cmd {
            "print" => console.print(arg).await,
            "printf" => console.write(&unescape(arg)).await,
            "sleep" => match arg.parse::<f64>() {
                Ok(s) if s.is_finite() && s >= 0.0 => {
                    tokio::time::sleep(Duration::from_secs_f64(s.min(86_400.0))).await
                }
                _ => {
                    console
                        .print(&format!("SIMDUT.error=bad sleep duration: {arg}"))
                        .await
                }
            },
            "post" | "get" => {
                let (url, body) = arg.split_once(' ').unwrap_or((arg, ""));
                let req = if cmd == "post" {
                    let body = match post_body(body.trim()) {
                        Ok(b) => b,
                        Err(e) => {
                            console.print(&format!("SIMDUT.error={e}")).await;
                            continue;
                        }
                    };
                    client
                        .post(url)
                        .header("content-type", "application/json")
                        .body(body)
                } else {
                    client.get(url)
                };
                match req.send().await {
                    Ok(r) => {
                        console
                            .print(&format!("SIMDUT.http_status={}", r.status().as_u16()))
                            .await
                    }
                    Err(e) => console.print(&format!("SIMDUT.http_error={e}")).await,
                }
            }
            "expect" => {
                let (text, secs) = match arg.rsplit_once(' ') {
                    Some((t, s)) if s.parse::<f64>().is_ok() => {
                        (t.to_string(), s.parse::<f64>().unwrap_or(60.0))
                    }
                    _ => (arg.to_string(), 60.0),
                };
                let deadline = tokio::time::Instant::now()
                    + Duration::from_secs_f64(secs.clamp(0.0, 86_400.0));
                loop {
                    match tokio::time::timeout_at(deadline, console.input.recv()).await {
                        Ok(Some(l)) => {
                            if console.echo {
                                console.print(&l).await;
                            }
                            if l.contains(&text) {
                                break;
                            }
                        }
                        Ok(None) | Err(_) => {
                            console.print("SIMDUT.expect_timeout").await;
                            break;
                        }
                    }
                }
            }
            "echo_input" => console.echo = true,
            "poweroff" => {
                console.print("reboot: Power down").await;
                let _ = console.writer.shutdown().await;
                return;
            }
            "hang" => break,
            _ => {
                console
                    .print(&format!("SIMDUT.error=unknown command: {line}"))
                    .await
            }
        }
    }
    idle(console).await
}

/// Keeps the console open, echoing input if asked, until powered off.
async fn idle(mut console: Console) {
    loop {
        match console.input.recv().await {
            Some(l) => {
                if console.echo {
                    console.print(&l).await;
                }
            }
            None => {
                // The console's client went away; stay powered (silent).
                std::future::pending::<()>().await;
            }
        }
    }
}

#[async_trait::async_trait]
impl crate::vpdu::OutletDut for SimDut {
    async fn power_on(&mut self) -> Result<(), String> {
        SimDut::power_on(self);
        Ok(())
    }

    async fn power_off(&mut self) {
        SimDut::power_off(self).await
    }
}

/// A `vpdu` outlet factory of simulated DUTs: each outlet's machine boots
/// from `executor_url` and connects its console to the outlet's SALAD
/// console port (8006 when the server was given none) on `console_host`.
pub fn sim_duts(executor_url: String, console_host: String) -> impl crate::vpdu::DutFactory {
    sim_duts_with_dhcp(executor_url, console_host, None)
}

/// [`sim_duts`] whose machines first ask `dhcp` for an address and a boot
/// file (none: no DHCP).
pub fn sim_duts_with_dhcp(
    executor_url: String,
    console_host: String,
    dhcp: Option<SimDhcpConfig>,
) -> impl crate::vpdu::DutFactory {
    move |o: &crate::vpdu::OutletInfo| {
        let port = o.salad_console_port.unwrap_or(8006);
        let mut config =
            SimDutConfig::new(&o.mac, &executor_url, &format!("{console_host}:{port}"));
        config.dhcp = dhcp.clone();
        Box::new(SimDut::new(config)) as Box<dyn crate::vpdu::OutletDut>
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SCRIPT: &str = "#!ipxe\n\nset semicolon:hex 3b\nset ampersand:hex 26\nset pipe:hex 7C\n\necho\n\necho Downloading the kernel\nkernel http://h/k  console=ttyS0 vivian.cmd=\"print a${semicolon:string}b\" x${ampersand:string}y${pipe:string}z\n\necho Downloading the initrd\ninitrd --name initrd http://h/i\n\necho Booting!\nboot\n";

    #[test]
    fn printf_text_is_unescaped() {
        assert_eq!(unescape(r"a\r\nb\tc"), b"a\r\nb\tc");
        assert_eq!(unescape(r"back\\slash \x \"), b"back\\slash \\x \\");
        assert_eq!(unescape("half-"), b"half-");
    }

    #[test]
    fn interprets_vivian_boot_scripts() {
        let b = interpret_ipxe(SCRIPT).unwrap();
        assert_eq!(b.kernel.as_deref(), Some("http://h/k"));
        assert_eq!(
            b.kernel_args,
            "console=ttyS0 vivian.cmd=\"print a;b\" x&y|z"
        );
        assert_eq!(b.initrd.as_deref(), Some("http://h/i"));
        assert!(b.boots);
        assert_eq!(b.echoes[1], "Downloading the kernel");
    }

    #[test]
    fn rejects_non_ipxe_and_bad_set() {
        assert!(matches!(
            interpret_ipxe("hello"),
            Err(IpxeError::NotIpxe(_))
        ));
        assert!(matches!(
            interpret_ipxe("#!ipxe\nset x:hex zz\n"),
            Err(IpxeError::BadLine { line: 2, .. })
        ));
    }

    #[test]
    fn post_bodies() {
        assert_eq!(post_body("").unwrap(), "");
        assert_eq!(post_body(r#"{"a":1}"#).unwrap(), r#"{"a":1}"#);
        let v: serde_json::Value = serde_json::from_str(
            &post_body("mac_address=52:54:00:11:22:01 n:=3 tags[]=a tags[]=b:c e:=[]").unwrap(),
        )
        .unwrap();
        assert_eq!(
            v,
            serde_json::json!({"mac_address": "52:54:00:11:22:01", "n": 3, "tags": ["a", "b:c"], "e": []})
        );
        assert!(post_body("n:=nope").unwrap_err().contains("bad JSON"));
        assert!(post_body("word").unwrap_err().contains("bad field"));
        assert!(post_body("a=1 a[]=2").unwrap_err().contains("not a list"));
    }

    #[test]
    fn dhcp_requests_look_like_ipxe() {
        let mac = parse_mac("52:54:00:11:22:0a").unwrap();
        assert_eq!(mac, [0x52, 0x54, 0, 0x11, 0x22, 0x0a]);
        assert_eq!(parse_mac("52:54:00:11:22"), None);
        assert_eq!(parse_mac("52:54:00:11:22:0a:00"), None);
        assert_eq!(client_arch("pcbios", "x86_64"), 0);
        assert_eq!(client_arch("efi", "x86_64"), 7);
        assert_eq!(client_arch("efi", "arm64"), 11);
        let ip = Ipv4Addr::new(10, 42, 0, 5);
        let server = Ipv4Addr::new(10, 42, 0, 1);
        let m = dhcp_request(MessageType::Request, 7, &mac, 7, Some((ip, server)));
        // Vivian's own DHCP parser sees an iPXE netboot request.
        let req = vivian_boots::dhcp::parse_request(&m.to_vec().unwrap()).unwrap();
        assert_eq!(req.xid, 7);
        assert_eq!(req.client_arch, Some(7));
        assert!(req.is_ipxe());
        assert_eq!(req.requested_ip, Some(ip));
        assert_eq!(req.server_id, Some(server));
        assert_eq!(
            req.vendor_class.as_deref(),
            Some(&b"PXEClient:Arch:00007:UNDI:002001"[..])
        );
        assert!(req.parameter_request_list.contains(&67));
    }

    #[test]
    fn time_placeholder_is_now() {
        let cfg = SimDutConfig::new("52:54:00:11:22:00", "http://e", "127.0.0.1:1");
        let before = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let t: u128 = substitute("@TIME_NS@", &cfg).parse().unwrap();
        assert!(
            t >= before && t < before + 10_000_000_000,
            "{t} vs {before}"
        );
        assert_eq!(
            substitute("@MAC@ @IP@ @EXECUTOR@", &cfg),
            "52:54:00:11:22:00 127.0.0.1 http://e"
        );
    }

    #[test]
    fn cmdline_split_and_script() {
        assert_eq!(
            split_cmdline(r#"a b="c d"  vivian.cmd="print hi there" e"#),
            vec!["a", "b=c d", "vivian.cmd=print hi there", "e"]
        );
        let s = build_script(
            b"#!vivian-sim\nprint one\n# comment\n\nsleep 0\n",
            r#"x vivian.cmd="print two" vivian.cmd=poweroff"#,
        );
        assert_eq!(s, vec!["print one", "sleep 0", "print two", "poweroff"]);
        // A kernel that is not a script contributes nothing.
        assert_eq!(build_script(b"\x7fELF....", ""), Vec::<String>::new());
        assert_eq!(boot_delay("a vivian.boot_delay=2.5 b"), Some(2.5));
        assert_eq!(
            boot_delay("vivian.boot_delay=1 vivian.boot_delay=3"),
            Some(3.0)
        );
        assert_eq!(boot_delay("vivian.boot_delay=-1 vivian.boot_delay=x"), None);
        assert_eq!(boot_delay("quiet"), None);
    }
}
