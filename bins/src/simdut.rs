//! Simulated DUTs: a machine that netboots like a PC, without a PC.
//!
//! When its outlet is switched ON, a [`SimDut`] does what a netbooting
//! machine's firmware and kernel do, over the same protocols as real ones:
//!
//! 1. "firmware": fetches the executor's boot script
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
//! | `sleep <seconds>` | waits (fractions allowed) |
//! | `post <url> [<body>]` | HTTP POST of a JSON body; prints `SIMDUT.http_status=<code>` |
//! | `get <url>` | HTTP GET; prints `SIMDUT.http_status=<code>` |
//! | `expect <text> [<seconds>]` | waits until a console input line contains `<text>` (default 60 s); prints `SIMDUT.expect_timeout` on expiry |
//! | `echo_input` | from now on, echoes every console input line back to the console |
//! | `poweroff` | prints `reboot: Power down`, closes the console and stops |
//! | `hang` | stops running the script but keeps the console open (a stuck machine) |
//!
//! In `<text>`, `<url>` and `<json>`, the placeholders `@MAC@`, `@IP@`
//! (the DUT's address, 127.0.0.1 on loopback) and `@EXECUTOR@` (the
//! executor URL) are replaced. (Not `${...}`: iPXE expands those in the
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
//! Powering the outlet OFF aborts whatever the machine is doing and closes
//! its console, at any point.

use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
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
        }
    }
}

/// A simulated machine behind a PDU outlet. Cheap to create; it only runs
/// while powered.
pub struct SimDut {
    config: SimDutConfig,
    run: Option<(watch::Sender<bool>, JoinHandle<()>)>,
}

impl SimDut {
    /// A powered-off machine.
    pub fn new(config: SimDutConfig) -> Self {
        SimDut { config, run: None }
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
        let handle = tokio::spawn(async move {
            let mac = config.mac.clone();
            let mut stop = stop_rx;
            tokio::select! {
                _ = boot(config) => {}
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
    text.replace("@MAC@", &config.mac)
        .replace("@IP@", &config.ip)
        .replace("@EXECUTOR@", &config.executor_url)
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
    async fn connect(addr: &str) -> Option<Console> {
        let stream = TcpStream::connect(addr).await.ok()?;
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
        let _ = self.writer.write_all(&bytes).await;
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

async fn boot(config: SimDutConfig) {
    let client = match reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
    {
        Ok(c) => c,
        Err(e) => {
            tracing::error!("simulated DUT {}: HTTP client: {e}", config.mac);
            return;
        }
    };
    let boot_url = format!(
        "{}/boot/{}/boot.ipxe?platform={}&buildarch={}",
        config.executor_url, config.mac, config.platform, config.buildarch
    );
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
    let Some(mut console) = Console::connect(&config.console_addr).await else {
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
    move |o: &crate::vpdu::OutletInfo| {
        let port = o.salad_console_port.unwrap_or(8006);
        Box::new(SimDut::new(SimDutConfig::new(
            &o.mac,
            &executor_url,
            &format!("{console_host}:{port}"),
        ))) as Box<dyn crate::vpdu::OutletDut>
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SCRIPT: &str = "#!ipxe\n\nset semicolon:hex 3b\nset ampersand:hex 26\nset pipe:hex 7C\n\necho\n\necho Downloading the kernel\nkernel http://h/k  console=ttyS0 vivian.cmd=\"print a${semicolon:string}b\" x${ampersand:string}y${pipe:string}z\n\necho Downloading the initrd\ninitrd --name initrd http://h/i\n\necho Booting!\nboot\n";

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
    }
}
