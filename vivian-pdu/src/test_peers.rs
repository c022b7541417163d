//! Real peers for tests and benchmarks (not used by the drivers).
//!
//! [`Snmpd`] runs net-snmp's `snmpd` on 127.0.0.1 (a free UDP port) with a
//! `pass_persist` script serving writable outlet tables of the three SNMP
//! models ([`crate::snmp::MODELS`]), kept in a JSON file that the test reads
//! and edits. The agent is killed when the value is dropped.
//!
//! Needs the Debian packages `snmpd` (the agent), `snmp` (`snmpget`, used to
//! wait until the agent answers) and `python3`. A missing one is an error
//! naming the package: a test must fail, not skip.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::snmp::{APC_MASTERSWITCH, CYBERPOWER_PDU15SWHVIEC12ATNET, CYBERPOWER_PDU41004};

/// The pass_persist script (Python 3).
pub const PASS_PERSIST_SCRIPT: &str = include_str!("../tests/peers/pdu_pass_persist.py");

/// Read community of the agent.
pub const RO_COMMUNITY: &str = "public";
/// Read-write community of the agent.
pub const RW_COMMUNITY: &str = "private";

/// Number of outlets served per model.
pub const OUTLETS: u64 = 8;

/// The subtrees served by the script (one pass_persist line each).
const ROOTS: [&str; 3] = [
    ".1.3.6.1.4.1.318.1.1.4.4.2.1",
    ".1.3.6.1.4.1.3808.1.1.3.3.3.1.1",
    ".1.3.6.1.4.1.3808.1.1.5.6",
];

/// A running `snmpd` with writable APC and Cyberpower outlet tables.
///
/// Initial tables, for every model, outlets 1..=8:
/// * APC: labels `apc-<n>`, status 1 (ON); writes 1/2/3, 3 (reboot) leaves 1;
/// * Cyberpower PDU41004: labels `cp4-<n>`, status 1; same values;
/// * Cyberpower PDU15SWHVIEC12ATNET: labels `cp15-<n>`, status 1 (ON);
///   control writes 2/3/4 store 1/2/1 in the status column.
pub struct Snmpd {
    child: Option<Child>,
    dir: tempfile::TempDir,
    port: u16,
}

fn oid(base: &str, index: u64) -> String {
    format!(".{base}.{index}")
}

/// The initial state file.
fn initial_state() -> Value {
    let mut values = serde_json::Map::new();
    let mut columns = serde_json::Map::new();
    for (model, label) in [
        (&APC_MASTERSWITCH, "apc"),
        (&CYBERPOWER_PDU41004, "cp4"),
        (&CYBERPOWER_PDU15SWHVIEC12ATNET, "cp15"),
    ] {
        for i in 1..=OUTLETS {
            values.insert(
                oid(model.labels, i),
                json!(["string", format!("{label}-{i}")]),
            );
            values.insert(oid(model.status, i), json!(["integer", model.read[0]]));
        }
        let w = model.write;
        let effects = json!({
            w.on.to_string(): model.read[0],
            w.off.to_string(): model.read[1],
            // A reboot leaves the outlet ON once done.
            w.reboot.to_string(): model.read[0],
        });
        let mut column = json!({"allowed": [w.on, w.off, w.reboot], "effects": effects});
        let ctrl = match model.ctrl {
            Some(c) => {
                column["target"] = json!(format!(".{}", model.status));
                // snmpd reads an OID before writing it.
                for i in 1..=OUTLETS {
                    values.insert(oid(c, i), json!(["integer", w.on]));
                }
                c
            }
            None => model.status,
        };
        columns.insert(format!(".{ctrl}"), column);
    }
    json!({"values": values, "columns": columns, "log": []})
}

fn free_udp_port() -> std::io::Result<u16> {
    Ok(std::net::UdpSocket::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn find_program(name: &str, package: &str) -> Result<PathBuf, String> {
    for dir in [
        "/usr/sbin",
        "/usr/bin",
        "/sbin",
        "/bin",
        "/usr/local/sbin",
        "/usr/local/bin",
    ] {
        let p = Path::new(dir).join(name);
        if p.is_file() {
            return Ok(p);
        }
    }
    Err(format!(
        "`{name}` not found: install the Debian package `{package}` (scripts/test-all does)"
    ))
}

impl Snmpd {
    /// Starts the agent and waits (up to 10 s) until it answers.
    pub fn start() -> Result<Self, String> {
        let snmpd = find_program("snmpd", "snmpd")?;
        let snmpget = find_program("snmpget", "snmp")?;
        let python = find_program("python3", "python3")?;
        let mut dir = tempfile::Builder::new()
            .prefix("vivian-snmpd-")
            .tempdir()
            .map_err(|e| format!("temporary directory: {e}"))?;
        let script = dir.path().join("pdu_pass_persist.py");
        std::fs::write(&script, PASS_PERSIST_SCRIPT).map_err(|e| e.to_string())?;
        let state = dir.path().join("state.json");
        write_atomic(&state, &initial_state())?;
        let mut last_err = String::new();
        // The port is free when picked; retry with another if snmpd lost a race.
        for _ in 0..3 {
            let port = free_udp_port().map_err(|e| e.to_string())?;
            let mut conf = format!(
                "agentaddress udp:127.0.0.1:{port}\nrocommunity {RO_COMMUNITY} 127.0.0.1\nrwcommunity {RW_COMMUNITY} 127.0.0.1\n"
            );
            for root in ROOTS {
                conf.push_str(&format!(
                    "pass_persist {root} {} {} {root}\n",
                    python.display(),
                    script.display()
                ));
            }
            let conf_path = dir.path().join("snmpd.conf");
            std::fs::write(&conf_path, conf).map_err(|e| e.to_string())?;
            let child = Command::new(&snmpd)
                .args(["-f", "-C", "-c"])
                .arg(&conf_path)
                .args(["-Lf"])
                .arg(dir.path().join("snmpd.log"))
                .arg("-p")
                .arg(dir.path().join("snmpd.pid"))
                .env("SNMP_PERSISTENT_DIR", dir.path())
                .env("PDU_STATE", &state)
                .env("MIBS", "")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .map_err(|e| format!("starting {}: {e}", snmpd.display()))?;
            let mut me = Self {
                child: Some(child),
                dir,
                port,
            };
            match me.wait_ready(&snmpget) {
                Ok(()) => return Ok(me),
                Err(e) => {
                    last_err = e;
                    me.kill();
                    dir = std::mem::replace(
                        &mut me.dir,
                        tempfile::tempdir().map_err(|e| e.to_string())?,
                    );
                }
            }
        }
        Err(last_err)
    }

    fn wait_ready(&mut self, snmpget: &Path) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(10);
        let probe = format!(".{}.1", APC_MASTERSWITCH.status);
        while Instant::now() < deadline {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    return Err(format!(
                        "snmpd exited ({status}); log: {}",
                        std::fs::read_to_string(self.dir.path().join("snmpd.log"))
                            .unwrap_or_default()
                    ));
                }
            }
            let out = Command::new(snmpget)
                .args(["-v1", "-c", RO_COMMUNITY, "-t", "0.3", "-r", "0", "-On"])
                .arg(self.address())
                .arg(&probe)
                .env("MIBS", "")
                .stdin(Stdio::null())
                .output()
                .map_err(|e| format!("running snmpget: {e}"))?;
            if out.status.success() && String::from_utf8_lossy(&out.stdout).contains("INTEGER") {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Err(format!(
            "snmpd on {} did not answer within 10 s; log: {}",
            self.address(),
            std::fs::read_to_string(self.dir.path().join("snmpd.log")).unwrap_or_default()
        ))
    }

    /// `127.0.0.1:<port>`, for the driver's `hostname` key.
    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The agent's process id.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    fn state_path(&self) -> PathBuf {
        self.dir.path().join("state.json")
    }

    /// The whole state file.
    pub fn state(&self) -> Value {
        std::fs::read_to_string(self.state_path())
            .ok()
            .and_then(|s| serde_json::from_str(&s).ok())
            .unwrap_or(Value::Null)
    }

    /// The integer stored at `<column>.<index>` (column without leading dot).
    pub fn integer(&self, column: &str, index: u64) -> Option<i64> {
        self.state()["values"][oid(column, index)][1].as_i64()
    }

    /// Stores a value at `<column>.<index>` (type "integer" or "string").
    pub fn set_value(&self, column: &str, index: u64, typ: &str, value: Value) {
        let mut state = self.state();
        state["values"][oid(column, index)] = json!([typ, value]);
        write_atomic(&self.state_path(), &state).expect("state file written");
    }

    /// Every SET the agent accepted: (OID with leading dot, value).
    pub fn sets(&self) -> Vec<(String, i64)> {
        self.state()["log"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|e| Some((e[0].as_str()?.to_string(), e[1].as_i64()?)))
                    .collect()
            })
            .unwrap_or_default()
    }

    fn signal(&self, sig: &str) {
        if let Some(pid) = self.pid() {
            let _ = Command::new("kill").args([sig, &pid.to_string()]).status();
        }
    }

    /// Freezes the agent (SIGSTOP): it stops answering.
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    /// Thaws the agent (SIGCONT).
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            self.resume();
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Snmpd {
    fn drop(&mut self) {
        self.kill();
    }
}

fn write_atomic(path: &Path, value: &Value) -> Result<(), String> {
    let tmp = path.with_extension("json.tmp");
    let text = serde_json::to_vec(value).map_err(|e| e.to_string())?;
    std::fs::write(&tmp, text).map_err(|e| format!("writing {}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, path).map_err(|e| format!("renaming {}: {e}", tmp.display()))
}
