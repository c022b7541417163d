//! Integration tests of the REST API: they start the real `executor` binary
//! on a temporary MarsDB whose PDU is a virtual PDU (the byte protocol of
//! IN A.7, served by a small server in this file), and talk HTTP to it.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// The fake GitLab of vivian-gitlab's tests (GitLab's runner endpoints,
/// status codes and JSON), shared rather than copied.
#[path = "../../vivian-gitlab/tests/common/mod.rs"]
mod fake_gitlab;

const DUT_A: &str = "52:54:00:11:22:01";
const DUT_B: &str = "52:54:00:11:22:02";
const DUT_NEW: &str = "52:54:00:11:22:99";

/// A virtual PDU server: one TCP connection per command, a 4-byte
/// big-endian word in, one byte out.
struct Vpdu {
    port: u16,
    states: Arc<Mutex<Vec<bool>>>,
}

impl Vpdu {
    fn start(ports: usize) -> Vpdu {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let states = Arc::new(Mutex::new(vec![false; ports]));
        let s2 = states.clone();
        std::thread::spawn(move || {
            for conn in l.incoming() {
                let Ok(mut c) = conn else { continue };
                let _ = c.set_read_timeout(Some(Duration::from_secs(2)));
                let mut w = [0u8; 4];
                if c.read_exact(&mut w).is_err() {
                    continue;
                }
                let word = u32::from_be_bytes(w);
                let cmd = word & 3;
                let p = ((word >> 2) & 0x7ff) as usize;
                let mut st = s2.lock().unwrap();
                let reply = match cmd {
                    0 => st.len() as u8,
                    _ if p >= st.len() => 0,
                    1 => {
                        st[p] = true;
                        1
                    }
                    2 => {
                        st[p] = false;
                        1
                    }
                    _ => {
                        if st[p] {
                            3
                        } else {
                            4
                        }
                    }
                };
                drop(st);
                let _ = c.write_all(&[reply]);
            }
        });
        Vpdu { port, states }
    }

    fn is_on(&self, port: usize) -> bool {
        self.states.lock().unwrap()[port]
    }

    fn set(&self, port: usize, on: bool) {
        self.states.lock().unwrap()[port] = on;
    }
}

/// The executor under test, killed on drop.
struct Executor {
    child: Option<Child>,
    base: String,
    db_path: PathBuf,
    log_path: PathBuf,
    _dir: tempfile::TempDir,
    http: reqwest::Client,
}

impl Drop for Executor {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn mars_yaml(vpdu_port: u16) -> String {
    format!(
        r#"pdus:
  VPDU:
    driver: vpdu
    config:
      hostname: "127.0.0.1:{vpdu_port}"
    reserved_port_ids: []
duts:
  "{DUT_A}":
    base_name: gfx10
    ip_address: 10.42.0.10
    tags: ["amdgpu:gfxversion:gfx10"]
    manual_tags: ["reserved-for-bob"]
    mac_address: "{DUT_A}"
    local_tty_device: ttyS0
    pdu: VPDU
    pdu_port_id: "0"
    pdu_off_delay: 0.1
    ready_for_service: true
    is_retired: false
    first_seen: 2024-01-01T00:00:00Z
  "{DUT_B}":
    base_name: gfx10
    ip_address: 10.42.0.11
    tags: ["amdgpu:gfxversion:gfx10"]
    mac_address: "{DUT_B}"
    pdu: VPDU
    pdu_port_id: "1"
    pdu_off_delay: 0.1
    ready_for_service: true
    is_retired: true
    first_seen: 2024-01-02T00:00:00Z
"#
    )
}

fn executor_env(db_path: &Path, port: u16) -> Vec<(String, String)> {
    [
        ("PATH", std::env::var("PATH").unwrap_or_default()),
        ("FARM_NAME", "tfarm".into()),
        ("MARS_DB_FILE", db_path.display().to_string()),
        ("EXECUTOR_HOST", "127.0.0.1".into()),
        ("EXECUTOR_PORT", port.to_string()),
        ("SERGENT_HARTMAN_QUICK_CHECK", "disabled".into()),
        ("BOOTS_DISABLE_SERVERS", "1".into()),
        ("BOOTS_DEFAULT_KERNEL", "http://h/kernel".into()),
        ("BOOTS_DEFAULT_INITRD", "http://h/initrd".into()),
        ("BOOTS_DEFAULT_CMDLINE", "console=ttyS0 a;b".into()),
        // No SALAD (a closed port): the DUT objects have no logs_endpoint.
        ("SALAD_URL", "http://127.0.0.1:1".into()),
        (
            "GITLAB_CONF_FILE",
            db_path
                .with_file_name("gitlab-runner.toml")
                .display()
                .to_string(),
        ),
        ("RUST_LOG", "info".into()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

fn executor_command(db_path: &Path, port: u16) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_executor"));
    cmd.env_clear().envs(executor_env(db_path, port));
    cmd
}

impl Executor {
    async fn start(vpdu: &Vpdu) -> Executor {
        Self::start_with(mars_yaml(vpdu.port), &[]).await
    }

    /// An executor on MarsDB `yaml`, with `env` added to (or replacing
    /// variables of) [`executor_env`].
    async fn start_with(yaml: String, env: &[(&str, String)]) -> Executor {
        let dir = tempfile::tempdir().unwrap();
        let db_path = dir.path().join("mars_db.yaml");
        std::fs::write(&db_path, yaml).unwrap();
        let log_path = dir.path().join("executor.log");
        let port = free_port();
        let child = executor_command(&db_path, port)
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log_path).unwrap())
            .spawn()
            .expect("start the executor binary");
        let ex = Executor {
            child: Some(child),
            base: format!("http://127.0.0.1:{port}"),
            db_path,
            log_path,
            _dir: dir,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(20))
                .build()
                .unwrap(),
        };
        ex.wait_ready().await;
        ex
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Waits for the API, then for the PDU to list its ports.
    async fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Ok(r) = self.http.get(self.url("/api/v1/pdus")).send().await {
                if let Ok(v) = r.json::<Value>().await {
                    if v["pdus"]["VPDU"]["state"] == "OK" {
                        return;
                    }
                }
            }
            assert!(
                Instant::now() < deadline,
                "the executor did not get ready; its log:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    async fn get(&self, path: &str) -> (u16, String) {
        let r = self.http.get(self.url(path)).send().await.unwrap();
        (r.status().as_u16(), r.text().await.unwrap())
    }

    async fn get_json(&self, path: &str) -> Value {
        let (s, body) = self.get(path).await;
        assert_eq!(s, 200, "GET {path}: {body}");
        serde_json::from_str(&body).unwrap()
    }

    async fn send(&self, method: &str, path: &str, body: Option<Value>) -> (u16, String) {
        let m = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let mut rb = self.http.request(m, self.url(path));
        if let Some(b) = body {
            rb = rb.json(&b);
        }
        let r = rb.send().await.unwrap();
        (r.status().as_u16(), r.text().await.unwrap())
    }

    async fn raw(
        &self,
        method: &str,
        path: &str,
        ct: Option<&str>,
        body: Vec<u8>,
    ) -> (u16, String) {
        let m = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let mut rb = self.http.request(m, self.url(path)).body(body);
        if let Some(ct) = ct {
            rb = rb.header("content-type", ct);
        }
        let r = rb.send().await.unwrap();
        (r.status().as_u16(), r.text().await.unwrap())
    }

    fn db_text(&self) -> String {
        std::fs::read_to_string(&self.db_path).unwrap()
    }

    fn db_yaml(&self) -> serde_yaml::Value {
        serde_yaml::from_str(&self.db_text()).unwrap()
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }
}

fn error_of(body: &str) -> String {
    let v: Value = serde_json::from_str(body)
        .unwrap_or_else(|e| panic!("error body is not JSON ({e}): {body}"));
    v["error"]
        .as_str()
        .unwrap_or_else(|| panic!("no \"error\" string in {body}"))
        .to_string()
}

/// Full state without the clock.
async fn state_without_now(ex: &Executor) -> Value {
    let mut v = ex.get_json("/api/v1/full-state").await;
    v.as_object_mut().unwrap().remove("now");
    // Port polling times move on their own.
    if let Some(pdus) = v["pdus"].as_object_mut() {
        for pdu in pdus.values_mut() {
            if let Some(ports) = pdu["ports"].as_object_mut() {
                for p in ports.values_mut() {
                    p.as_object_mut().unwrap().remove("last_polled");
                }
            }
        }
    }
    v
}

async fn wait_until<F, Fut>(what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(10);
    while !f().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

#[tokio::test]
async fn reads_duts_pdus_full_state_and_boot_script() {
    let vpdu = Vpdu::start(8);
    let ex = Executor::start(&vpdu).await;

    let duts = ex.get_json("/api/v1/duts").await;
    let ids: Vec<&String> = duts["duts"].as_object().unwrap().keys().collect();
    assert_eq!(ids, vec![DUT_A, DUT_B], "MarsDB order");
    let a = &duts["duts"][DUT_A];
    assert_eq!(a["id"], DUT_A);
    assert_eq!(a["state"], "IDLE");
    assert_eq!(a["full_name"], "tfarm-gfx10-1");
    assert_eq!(a["has_pdu_assigned"], true);
    assert_eq!(a["pdu"], json!({"name": "VPDU", "port_id": "0"}));
    assert_eq!(a["pdu_off_delay"], 0.1);
    assert_eq!(a["training"], json!({"state": "IDLE"}));
    assert_eq!(a["manual_tags"], json!(["reserved-for-bob"]));
    assert_eq!(duts["duts"][DUT_B]["state"], "RETIRED");
    // The deprecated alias serves the same.
    assert_eq!(ex.get_json("/api/v1/machines").await, duts);

    // One DUT by id (any MAC spelling), by full name, with a trailing slash.
    assert_eq!(ex.get_json(&format!("/api/v1/dut/{DUT_A}")).await, *a);
    assert_eq!(ex.get_json("/api/v1/dut/52-54-00-11-22-01/").await, *a);
    assert_eq!(ex.get_json("/api/v1/dut/tfarm-gfx10-1").await, *a);
    assert_eq!(ex.get_json("/api/v1/machine/tfarm-gfx10-1/").await, *a);
    let (s, body) = ex.get("/api/v1/dut/00:00:00:00:00:00").await;
    assert_eq!(s, 404);
    assert!(error_of(&body).contains("00:00:00:00:00:00"));

    let pdus = ex.get_json("/api/v1/pdus").await;
    let vp = &pdus["pdus"]["VPDU"];
    assert_eq!(vp["state"], "OK");
    assert_eq!(vp["ports"].as_object().unwrap().len(), 8);
    assert_eq!(ex.get_json("/api/v1/pdu/VPDU").await, *vp);
    let port0 = ex.get_json("/api/v1/pdu/VPDU/port/0").await;
    assert_eq!(port0["state"], "OFF");
    assert_eq!(port0["reserved"], false);
    assert_eq!(port0["min_off_time"], 0.1);
    assert_eq!(ex.get("/api/v1/pdu/NOPE").await.0, 404);
    assert_eq!(ex.get("/api/v1/pdu/VPDU/port/42").await.0, 404);

    let fs = ex.get_json("/api/v1/full-state").await;
    assert_eq!(fs["discover"], Value::Null, "idle discovery is null");
    assert_eq!(fs["duts"], duts["duts"]);
    assert_eq!(fs["pdus"]["VPDU"]["ports"].as_object().unwrap().len(), 8);
    let now = fs["now"].as_str().unwrap();
    chrono::DateTime::parse_from_rfc3339(now).expect("now is RFC 3339");
    assert!(now.ends_with('Z'), "UTC: {now}");
    assert_eq!(fs["marsdb_error"], Value::Null);
    assert_eq!(ex.get_json("/api/v1/dut/discover").await, Value::Null);

    // The iPXE script with the BOOTS_DEFAULT_* defaults.
    for path in [
        format!("/boot/{DUT_A}/boot.ipxe?platform=efi&buildarch=x86_64"),
        format!("/api/v1/duts/{DUT_A}/boot.ipxe?platform=efi&buildarch=x86_64"),
        "/boot/unknown/boot.ipxe?platform=efi&buildarch=x86_64".to_string(),
    ] {
        let (s, script) = ex.get(&path).await;
        assert_eq!(s, 200, "{path}: {script}");
        assert!(script.starts_with("#!ipxe\n"), "{script}");
        assert!(
            script.contains(
                "kernel http://h/kernel initrd=initrd console=ttyS0 a${semicolon:string}b\n"
            ),
            "{script}"
        );
        assert!(
            script.contains("initrd --name initrd http://h/initrd\n"),
            "{script}"
        );
        assert!(script.ends_with("boot\n"));
    }
    let (_, script) = ex
        .get(&format!(
            "/boot/{DUT_A}/boot.ipxe?platform=pcbios&buildarch=i386"
        ))
        .await;
    assert!(
        script.contains("kernel http://h/kernel  console=ttyS0"),
        "{script}"
    );
}

#[tokio::test]
async fn dut_patch_quick_check_cancel_and_delete() {
    let vpdu = Vpdu::start(8);
    let ex = Executor::start(&vpdu).await;

    let (s, body) = ex
        .send(
            "PATCH",
            &format!("/api/v1/dut/{DUT_A}"),
            Some(json!({"comment": "flaky fan", "pdu_off_delay": 2, "manual_tags": ["x", "y"]})),
        )
        .await;
    assert_eq!(s, 200, "{body}");
    assert!(body.starts_with("Updated tfarm-gfx10-1: "), "{body}");
    let a = ex.get_json(&format!("/api/v1/dut/{DUT_A}")).await;
    assert_eq!(a["comment"], "flaky fan");
    assert_eq!(a["pdu_off_delay"], 2.0);
    assert_eq!(a["manual_tags"], json!(["x", "y"]));
    let y = ex.db_yaml();
    assert_eq!(y["duts"][DUT_A]["comment"].as_str(), Some("flaky fan"));
    assert_eq!(y["duts"][DUT_A]["pdu_off_delay"].as_f64(), Some(2.0));
    // The port takes the new minimum off time.
    wait_until("min_off_time 2", || async {
        ex.get_json("/api/v1/pdu/VPDU/port/0").await["min_off_time"] == 2.0
    })
    .await;

    // Quick check: not queued (disabled at start); a requested one is
    // accepted, and, quick checks being disabled (SERGENT_HARTMAN_QUICK_CHECK),
    // cleared at once as in the reference (EX D.4): the DUT stays IDLE.
    assert_eq!(
        ex.get(&format!("/api/v1/dut/{DUT_A}/quick_check")).await,
        (200, "false\n".into())
    );
    let (s, body) = ex
        .send("POST", &format!("/api/v1/dut/{DUT_A}/quick_check"), None)
        .await;
    assert_eq!(
        (s, body.as_str()),
        (200, "Quick check queued for machine tfarm-gfx10-1\n")
    );
    wait_until("quick check cleared, DUT IDLE", || async {
        ex.get(&format!("/api/v1/dut/{DUT_A}/quick_check")).await == (200, "false\n".into())
            && ex.get_json(&format!("/api/v1/dut/{DUT_A}")).await["state"] == "IDLE"
    })
    .await;

    // Un-retiring (quick checks are disabled here: straight to IDLE).
    let (s, _) = ex
        .send(
            "PATCH",
            &format!("/api/v1/dut/{DUT_B}"),
            Some(json!({"is_retired": false})),
        )
        .await;
    assert_eq!(s, 200);
    assert_eq!(
        ex.get(&format!("/api/v1/dut/{DUT_B}/quick_check")).await.1,
        "false\n"
    );
    assert_eq!(
        ex.get_json(&format!("/api/v1/dut/{DUT_B}")).await["state"],
        "IDLE"
    );
    assert_eq!(
        ex.db_yaml()["duts"][DUT_B]["is_retired"].as_bool(),
        Some(false)
    );

    // Nothing runs: cancel_job is a conflict.
    let (s, body) = ex
        .send("POST", &format!("/api/v1/dut/{DUT_A}/cancel_job"), None)
        .await;
    assert_eq!(s, 409, "{body}");
    assert!(error_of(&body).contains("isn't running a job"), "{body}");

    // Delete by full name.
    let (s, body) = ex.send("DELETE", "/api/v1/dut/tfarm-gfx10-2", None).await;
    assert_eq!(
        (s, body.as_str()),
        (200, "The machine tfarm-gfx10-2 was removed\n")
    );
    assert!(ex.db_yaml()["duts"].get(DUT_B).is_none());
    assert_eq!(ex.get(&format!("/api/v1/dut/{DUT_B}")).await.0, 404);
    assert_eq!(
        ex.send("DELETE", &format!("/api/v1/dut/{DUT_B}"), None)
            .await
            .0,
        404
    );
}

#[tokio::test]
async fn discovery_registration_and_port_patch() {
    let vpdu = Vpdu::start(8);
    let ex = Executor::start(&vpdu).await;

    // Refusals: port used by a DUT (409), unknown PDU/port (404), bad input (400).
    let (s, body) = ex
        .send(
            "POST",
            "/api/v1/dut/discover",
            Some(json!({"pdu": "VPDU", "port_id": 0})),
        )
        .await;
    assert_eq!(s, 409, "{body}");
    assert_eq!(
        ex.send(
            "POST",
            "/api/v1/dut/discover",
            Some(json!({"pdu": "X", "port_id": 3}))
        )
        .await
        .0,
        404
    );
    assert_eq!(
        ex.send(
            "POST",
            "/api/v1/dut/discover",
            Some(json!({"pdu": "VPDU", "port_id": 30}))
        )
        .await
        .0,
        404
    );
    assert_eq!(ex.send("DELETE", "/api/v1/dut/discover", None).await.0, 409);

    // Discovery on port 3: switched ON.
    let (s, body) = ex
        .send(
            "POST",
            "/api/v1/dut/discover",
            Some(json!({"pdu": "VPDU", "port_id": "3"})),
        )
        .await;
    assert_eq!(s, 200, "{body}");
    assert!(body.contains("time out after 150 seconds"), "{body}");
    assert!(vpdu.is_on(3));
    let d = ex.get_json("/api/v1/dut/discover").await;
    assert_eq!(
        (d["pdu"].as_str(), d["port_id"].as_str()),
        (Some("VPDU"), Some("3"))
    );
    assert_eq!(d["timeout"], 150.0);
    chrono::DateTime::parse_from_rfc3339(d["date"].as_str().unwrap()).unwrap();
    assert!(d["expires_in"].as_f64().unwrap() > 140.0);
    assert_eq!(
        ex.get_json("/api/v1/full-state").await["discover"]["port_id"],
        "3"
    );
    // One at a time.
    let (s, body) = ex
        .send(
            "POST",
            "/api/v1/dut/discover",
            Some(json!({"pdu": "VPDU", "port_id": 4})),
        )
        .await;
    assert_eq!(s, 409, "{body}");

    // The machine registers: created on VPDU/3 with the driver's minimum off time.
    let (s, body) = ex
        .send(
            "POST",
            "/api/v1/dut/",
            Some(
                json!({"mac_address": DUT_NEW, "base_name": "virtio", "ip_address": "10.42.0.99",
                        "tags": ["virtio:family:VIRTIO"], "local_tty_device": null}),
            ),
        )
        .await;
    assert_eq!(s, 200, "{body}");
    let dut: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(dut["id"], DUT_NEW);
    assert_eq!(dut["pdu"], json!({"name": "VPDU", "port_id": "3"}));
    assert_eq!(dut["pdu_off_delay"], 0.1);
    assert_eq!(dut["state"], "TRAINING");
    assert_eq!(dut["full_name"], "tfarm-virtio-1");
    assert_eq!(
        ex.get_json("/api/v1/dut/discover").await,
        Value::Null,
        "consumed"
    );
    let y = ex.db_yaml();
    assert_eq!(y["duts"][DUT_NEW]["pdu"].as_str(), Some("VPDU"));
    assert_eq!(y["duts"][DUT_NEW]["pdu_port_id"].as_str(), Some("3"));

    // PUT merges into the known DUT.
    let (s, body) = ex
        .send(
            "PUT",
            "/api/v1/dut/",
            Some(json!({"id": DUT_NEW, "tags": ["t2"]})),
        )
        .await;
    assert_eq!(s, 200, "{body}");
    let dut: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(dut["tags"], json!(["t2"]));
    assert_eq!(dut["base_name"], "virtio");

    // Registration without a discovery: created without a PDU.
    let (s, body) = ex
        .send(
            "POST",
            "/api/v1/machine/",
            Some(json!({"mac_address": "52:54:00:11:22:98", "base_name": "b", "ip_address": "10.0.0.8", "tags": []})),
        )
        .await;
    assert_eq!(s, 200, "{body}");
    let dut: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(dut["state"], "WAIT_FOR_CONFIG");
    assert_eq!(dut["pdu"], json!({"name": null, "port_id": null}));

    // Discovery with a short timeout: active expiry switches the port OFF.
    let (s, body) = ex
        .send(
            "POST",
            "/api/v1/dut/discover",
            Some(json!({"pdu": "VPDU", "port_id": 5, "timeout": 0.5})),
        )
        .await;
    assert_eq!(s, 200, "{body}");
    assert!(vpdu.is_on(5));
    wait_until("the discovery expires and port 5 is OFF", || async {
        !vpdu.is_on(5) && ex.get_json("/api/v1/dut/discover").await.is_null()
    })
    .await;

    // DELETE cancels and switches OFF.
    let (s, _) = ex
        .send(
            "POST",
            "/api/v1/dut/discover",
            Some(json!({"pdu": "VPDU", "port_id": 6})),
        )
        .await;
    assert_eq!(s, 200);
    let (s, body) = ex.send("DELETE", "/api/v1/dut/discover", None).await;
    assert_eq!(s, 200, "{body}");
    assert!(!vpdu.is_on(6));
    assert!(ex.get_json("/api/v1/dut/discover").await.is_null());

    // A port that reads ON is refused.
    vpdu.set(7, true);
    wait_until("port 7 polled ON", || async {
        ex.get_json("/api/v1/pdu/VPDU/port/7").await["state"] == "ON"
    })
    .await;
    let (s, body) = ex
        .send(
            "POST",
            "/api/v1/dut/discover",
            Some(json!({"pdu": "VPDU", "port_id": 7})),
        )
        .await;
    assert_eq!(s, 409, "{body}");

    // Port PATCH: a non-retired DUT's port is refused.
    let (s, body) = ex
        .send(
            "PATCH",
            "/api/v1/pdu/VPDU/port/0",
            Some(json!({"state": "on"})),
        )
        .await;
    assert_eq!(s, 409, "{body}");
    assert!(!vpdu.is_on(0));
    // A retired DUT's port may be switched.
    let (s, body) = ex
        .send(
            "PATCH",
            "/api/v1/pdu/VPDU/port/1",
            Some(json!({"state": "ON"})),
        )
        .await;
    assert_eq!(s, 200, "{body}");
    assert!(vpdu.is_on(1));
    // Reservation: persisted, and it refuses changes.
    let (s, body) = ex
        .send(
            "PATCH",
            "/api/v1/pdu/VPDU/port/4",
            Some(json!({"reserved": true})),
        )
        .await;
    assert_eq!(s, 200, "{body}");
    let reserved: Vec<String> = ex.db_yaml()["pdus"]["VPDU"]["reserved_port_ids"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    assert_eq!(reserved, vec!["4"]);
    assert_eq!(
        ex.get_json("/api/v1/pdu/VPDU/port/4").await["reserved"],
        true
    );
    let (s, body) = ex
        .send(
            "PATCH",
            "/api/v1/pdu/VPDU/port/4",
            Some(json!({"state": "on"})),
        )
        .await;
    assert_eq!(s, 409, "{body}");
    assert!(error_of(&body).contains("reserved"));
    let (s, _) = ex
        .send(
            "POST",
            "/api/v1/dut/discover",
            Some(json!({"pdu": "VPDU", "port_id": 4})),
        )
        .await;
    assert_eq!(s, 409);
    let (s, body) = ex
        .send(
            "PATCH",
            "/api/v1/pdu/VPDU/port/4",
            Some(json!({"reserved": "false", "state": "on"})),
        )
        .await;
    assert_eq!(s, 200, "{body}");
    assert!(vpdu.is_on(4));
    assert_eq!(
        ex.db_yaml()["pdus"]["VPDU"]["reserved_port_ids"]
            .as_sequence()
            .map(|s| s.len()),
        Some(0)
    );
}

fn multipart_body(parts: &[(&str, &str, &[u8])], boundary: &str) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, ct, data) in parts {
        out.extend_from_slice(
            format!(
                "--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"; filename=\"{name}\"\r\nContent-Type: {ct}\r\n\r\n"
            )
            .as_bytes(),
        );
        out.extend_from_slice(data);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    out
}

const JOB: &str = r#"version: 1
target:
  tags: ["amdgpu:gfxversion:gfx10"]
console_patterns:
  session_end:
    regex: "^Power down"
deployment:
  start:
    kernel:
      url: "http://h/k"
      cmdline: "console=ttyS0"
    initramfs:
      url: "http://h/i"
"#;

async fn post_job(ex: &Executor, metadata: Value, job: &str) -> (u16, Value) {
    let b = "XyZbOuNdArY";
    let meta = metadata.to_string();
    let body = multipart_body(
        &[
            ("metadata", "application/json", meta.as_bytes()),
            ("job", "application/x-yaml", job.as_bytes()),
        ],
        b,
    );
    let (s, text) = ex
        .raw(
            "POST",
            "/api/v1/jobs",
            Some(&format!("multipart/form-data; boundary={b}")),
            body,
        )
        .await;
    (
        s,
        serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON: {text}")),
    )
}

#[tokio::test]
async fn job_submission_validation_and_selection() {
    let vpdu = Vpdu::start(4);
    let ex = Executor::start(&vpdu).await;
    let meta = |target: Value| json!({"version": 1, "job_id": "j1", "callback": {"port": 40000}, "target": target});

    // Valid, matching an IDLE DUT: accepted by the job engine. Nobody
    // listens on the callback port, so the engine ends the job before
    // powering anything and the farm is as before.
    let before = state_without_now(&ex).await;
    let (s, v) = post_job(&ex, json!({"version": 1, "callback": {"port": 40000}}), JOB).await;
    assert_eq!(s, 200, "{v}");
    assert!(v["dut"].is_string(), "{v}");
    for _ in 0..200 {
        if state_without_now(&ex).await == before {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(state_without_now(&ex).await, before);

    // DUT selection (EX A.15).
    let (s, v) = post_job(&ex, meta(json!({"id": "00:11:22:33:44:55"})), JOB).await;
    assert_eq!(s, 404, "{v}");
    let (s, v) = post_job(&ex, meta(json!({"id": DUT_A, "tags": ["nope"]})), JOB).await;
    assert_eq!(s, 406, "{v}");
    let (s, v) = post_job(&ex, meta(json!({"tags": ["nope"]})), JOB).await;
    assert_eq!(s, 406, "{v}");
    let (s, v) = post_job(&ex, meta(json!({"id": DUT_B})), JOB).await;
    assert_eq!(s, 409, "retired: {v}");
    let (s, v) = post_job(
        &ex,
        meta(json!({"id": "tfarm-gfx10-1", "tags": ["farm:tfarm", "reserved-for-bob"]})),
        JOB,
    )
    .await;
    assert_eq!(s, 200, "selected by full name and tags: {v}");
    assert_eq!(v["dut"], DUT_A, "{v}");
    for _ in 0..200 {
        if state_without_now(&ex).await == before {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }

    // Validation.
    let (s, v) = post_job(&ex, json!({"version": 2, "callback": {"port": 1}}), JOB).await;
    assert_eq!(s, 400, "{v}");
    assert!(v["error"].as_str().unwrap().contains("version"), "{v}");
    let (s, v) = post_job(&ex, json!({"version": 1}), JOB).await;
    assert_eq!(s, 400, "no callback: {v}");
    let (s, v) = post_job(&ex, meta(Value::Null), "version: 1\nbogus_key: 1\n").await;
    assert_eq!(s, 400, "{v}");
    let (s, v) = post_job(&ex, meta(Value::Null), "{% if %}").await;
    assert_eq!(s, 400, "{v}");
    let past = JOB.replace(
        "version: 1\n",
        "version: 1\ndeadline: 2001-01-01T00:00:00Z\n",
    );
    let (s, v) = post_job(&ex, meta(Value::Null), &past).await;
    assert_eq!(s, 400, "{v}");
    assert!(v["error"].as_str().unwrap().contains("deadline"), "{v}");

    let b = "BBB";
    // Metadata part with a wrong content type: 415.
    let body = multipart_body(
        &[
            ("metadata", "text/plain", b"{}"),
            ("job", "application/x-yaml", JOB.as_bytes()),
        ],
        b,
    );
    let (s, _) = ex
        .raw(
            "POST",
            "/api/v1/jobs",
            Some(&format!("multipart/form-data; boundary={b}")),
            body,
        )
        .await;
    assert_eq!(s, 415);
    // Missing job part.
    let body = multipart_body(
        &[(
            "metadata",
            "application/json",
            br#"{"version":1,"callback":{"port":1}}"#,
        )],
        b,
    );
    let (s, text) = ex
        .raw(
            "POST",
            "/api/v1/jobs",
            Some(&format!("multipart/form-data; boundary={b}")),
            body,
        )
        .await;
    assert_eq!(s, 400, "{text}");
    assert!(error_of(&text).contains("job"));
    // A tarball that is not one.
    let body = multipart_body(
        &[
            (
                "metadata",
                "application/json",
                br#"{"version":1,"callback":{"port":1}}"#,
            ),
            ("job", "application/x-yaml", JOB.as_bytes()),
            (
                "job_bucket_initial_state_tarball_file",
                "application/octet-stream",
                b"not a tarball",
            ),
        ],
        b,
    );
    let (s, text) = ex
        .raw(
            "POST",
            "/api/v1/jobs",
            Some(&format!("multipart/form-data; boundary={b}")),
            body,
        )
        .await;
    assert_eq!(s, 400, "{text}");
    assert!(error_of(&text).contains("tarball"));
    // Unknown part.
    let body = multipart_body(&[("other", "application/json", b"{}")], b);
    let (s, _) = ex
        .raw(
            "POST",
            "/api/v1/jobs",
            Some(&format!("multipart/form-data; boundary={b}")),
            body,
        )
        .await;
    assert_eq!(s, 400);
    // Not multipart at all.
    let (s, text) = ex
        .raw("POST", "/api/v1/jobs", Some("text/plain"), b"x".to_vec())
        .await;
    assert_eq!(s, 415, "{text}");
    // Deprecated version 0 JSON body: validated and accepted; nobody
    // listens on the callback port, so the job ends at once.
    let (s, text) = ex
        .send(
            "POST",
            "/api/v1/jobs",
            Some(json!({"metadata": {"callback_port": 4000}, "job": JOB})),
        )
        .await;
    assert_eq!(s, 200, "{text}");
    for _ in 0..200 {
        if state_without_now(&ex).await == before {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(state_without_now(&ex).await, before);
}

/// A corpus of bad requests to every mutating endpoint: each gets its status
/// and a JSON error, and neither MarsDB on disk nor the API's state changes.
#[tokio::test]
async fn bad_requests_change_nothing() {
    let vpdu = Vpdu::start(4);
    let ex = Executor::start(&vpdu).await;
    let dut = format!("/api/v1/dut/{DUT_A}");
    let port = "/api/v1/pdu/VPDU/port/2".to_string();
    let big = format!("{{\"comment\": \"{}\"}}", "x".repeat(200 * 1024));
    type Case = (
        &'static str,
        String,
        Option<&'static str>,
        Vec<u8>,
        u16,
        &'static str,
    );
    let j = Some("application/json");
    let cases: Vec<Case> = vec![
        // Registration.
        ("POST", "/api/v1/dut/".into(), j, b"{".to_vec(), 400, "JSON"),
        ("POST", "/api/v1/dut/".into(), j, b"[]".to_vec(), 400, "object"),
        ("POST", "/api/v1/dut/".into(), j, b"".to_vec(), 400, "empty"),
        ("POST", "/api/v1/dut/".into(), j, format!(r#"{{"mac_address":"{DUT_NEW}","pdu":"VPDU"}}"#).into_bytes(), 400, "pdu"),
        ("POST", "/api/v1/dut/".into(), j, format!(r#"{{"mac_address":"{DUT_NEW}","base_name":"b","ip_address":"10.0.0.1","tags":"x"}}"#).into_bytes(), 400, "tags"),
        ("POST", "/api/v1/dut/".into(), j, format!(r#"{{"mac_address":"{DUT_NEW}","base_name":true,"ip_address":"10.0.0.1","tags":[]}}"#).into_bytes(), 400, "base_name"),
        ("POST", "/api/v1/dut/".into(), j, format!(r#"{{"mac_address":"{DUT_NEW}","base_name":"b","ip_address":"300.0.0.1","tags":[]}}"#).into_bytes(), 400, "ip_address"),
        ("POST", "/api/v1/dut/".into(), j, format!(r#"{{"mac_address":"{DUT_NEW}","base_name":"b","tags":[]}}"#).into_bytes(), 400, "ip_address"),
        ("POST", "/api/v1/dut/".into(), j, br#"{"mac_address":"zz:zz","base_name":"b","ip_address":"10.0.0.1","tags":[]}"#.to_vec(), 400, "mac_address"),
        ("PUT", "/api/v1/dut/".into(), j, format!(r#"{{"id":"{DUT_A}","ready_for_service":"yes"}}"#).into_bytes(), 400, "ready_for_service"),
        ("POST", "/api/v1/dut/".into(), Some("text/plain"), b"{}".to_vec(), 415, "content type"),
        ("POST", "/api/v1/dut/".into(), j, big.clone().into_bytes(), 413, "limit"),
        // PATCH.
        ("PATCH", dut.clone(), j, br#"{"comment": true}"#.to_vec(), 400, "comment"),
        ("PATCH", dut.clone(), j, br#"{"pdu_off_delay": "10"}"#.to_vec(), 400, "pdu_off_delay"),
        ("PATCH", dut.clone(), j, br#"{"pdu_off_delay": -3}"#.to_vec(), 400, "pdu_off_delay"),
        ("PATCH", dut.clone(), j, br#"{"is_retired": "true"}"#.to_vec(), 400, "is_retired"),
        ("PATCH", dut.clone(), j, br#"{"manual_tags": "a"}"#.to_vec(), 400, "manual_tags"),
        ("PATCH", dut.clone(), j, br#"{"comment": "ok", "base_name": "new"}"#.to_vec(), 400, "base_name"),
        ("PATCH", dut.clone(), j, br#"{"comment": "ok", "pdu_off_delay": null}"#.to_vec(), 400, "pdu_off_delay"),
        ("PATCH", dut.clone(), j, b"not json".to_vec(), 400, "JSON"),
        ("PATCH", dut.clone(), Some("application/x-www-form-urlencoded"), b"comment=x".to_vec(), 415, "content type"),
        ("PATCH", dut.clone(), j, big.clone().into_bytes(), 413, "limit"),
        ("PATCH", "/api/v1/dut/00:00:00:00:00:07".into(), j, br#"{"comment": "x"}"#.to_vec(), 404, "00:00:00:00:00:07"),
        // DELETE, quick check, cancel on unknown DUTs; cancel on an idle one.
        ("DELETE", "/api/v1/dut/nobody".into(), None, vec![], 404, "nobody"),
        ("POST", "/api/v1/dut/nobody/quick_check".into(), None, vec![], 404, "nobody"),
        ("POST", "/api/v1/dut/nobody/cancel_job".into(), None, vec![], 404, "nobody"),
        ("POST", format!("{dut}/cancel_job"), None, vec![], 409, "isn't running"),
        // Discovery.
        ("POST", "/api/v1/dut/discover".into(), j, br#"{"pdu": "VPDU"}"#.to_vec(), 400, "port_id"),
        ("POST", "/api/v1/dut/discover".into(), j, br#"{"port_id": 2}"#.to_vec(), 400, "pdu"),
        ("POST", "/api/v1/dut/discover".into(), j, br#"{"pdu": "VPDU", "port_id": 2, "extra": 1}"#.to_vec(), 400, "extra"),
        ("POST", "/api/v1/dut/discover".into(), j, br#"{"pdu": "VPDU", "port_id": true}"#.to_vec(), 400, "port_id"),
        ("POST", "/api/v1/dut/discover".into(), j, br#"{"pdu": "VPDU", "port_id": 2, "timeout": "60"}"#.to_vec(), 400, "timeout"),
        ("POST", "/api/v1/dut/discover".into(), j, br#"{"pdu": "VPDU", "port_id": 2, "timeout": -1}"#.to_vec(), 400, "timeout"),
        ("POST", "/api/v1/dut/discover".into(), j, br#"{"pdu": "NOPE", "port_id": 2}"#.to_vec(), 404, "NOPE"),
        ("POST", "/api/v1/dut/discover".into(), j, br#"{"pdu": "VPDU", "port_id": 0}"#.to_vec(), 409, "assigned"),
        ("DELETE", "/api/v1/dut/discover".into(), None, vec![], 409, "no discovery"),
        // Port PATCH.
        ("PATCH", port.clone(), j, br#"{"state": true}"#.to_vec(), 400, "state"),
        ("PATCH", port.clone(), j, br#"{"state": "up"}"#.to_vec(), 400, "state"),
        ("PATCH", port.clone(), j, br#"{"reserved": "maybe"}"#.to_vec(), 400, "reserved"),
        ("PATCH", port.clone(), j, br#"{"reserved": true, "label": "x"}"#.to_vec(), 400, "label"),
        ("PATCH", port.clone(), j, br#"{}"#.to_vec(), 400, "Nothing"),
        ("PATCH", "/api/v1/pdu/VPDU/port/99".into(), j, br#"{"state": "on"}"#.to_vec(), 404, "99"),
        ("PATCH", "/api/v1/pdu/NOPE/port/1".into(), j, br#"{"state": "on"}"#.to_vec(), 404, "NOPE"),
        ("PATCH", "/api/v1/pdu/VPDU/port/0".into(), j, br#"{"state": "on"}"#.to_vec(), 409, "in use"),
        // Jobs.
        ("POST", "/api/v1/jobs".into(), j, b"{".to_vec(), 400, "JSON"),
        ("POST", "/api/v1/jobs".into(), Some("multipart/form-data"), b"x".to_vec(), 400, "multipart"),
        // Routing.
        ("POST", "/api/v1/duts".into(), j, b"{}".to_vec(), 405, "not allowed"),
        ("PUT", dut.clone(), j, b"{}".to_vec(), 405, "not allowed"),
        ("GET", "/api/v1/nothing".into(), None, vec![], 404, "No route"),
        ("GET", "/elsewhere".into(), None, vec![], 404, "route"),
    ];
    // One connection per request: an error answer may close it.
    let mut ex = ex;
    ex.http = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap();
    let disk_before = ex.db_text();
    let state_before = state_without_now(&ex).await;
    let vpdu_before = vpdu.states.lock().unwrap().clone();
    for (method, path, ct, body, status, needle) in cases {
        let (s, text) = ex.raw(method, &path, ct, body).await;
        assert_eq!(s, status, "{method} {path}: {text}");
        let err = error_of(&text);
        assert!(
            err.to_lowercase().contains(&needle.to_lowercase()),
            "{method} {path}: the error {err:?} should mention {needle:?}"
        );
        assert_eq!(ex.db_text(), disk_before, "{method} {path} changed MarsDB");
    }
    assert_eq!(state_without_now(&ex).await, state_before);
    assert_eq!(*vpdu.states.lock().unwrap(), vpdu_before);
}

#[tokio::test]
async fn openapi_document_matches_the_routes() {
    let vpdu = Vpdu::start(2);
    let ex = Executor::start(&vpdu).await;
    let doc = ex.get_json("/api/v1/openapi.json").await;
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    let mut documented = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for method in item.as_object().unwrap().keys() {
            documented.insert((method.to_uppercase(), path.clone()));
        }
    }
    let routed: BTreeSet<(String, String)> = vivian::api::ROUTES
        .iter()
        .map(|r| (r.method.to_string(), r.path.to_string()))
        .collect();
    assert_eq!(documented, routed);
    // Every documented operation is served: no "no route" 404, no 405.
    for (method, path) in &documented {
        let concrete = path
            .replace("{id}", "00:00:00:00:00:00")
            .replace("{name}", "VPDU")
            .replace("{port_id}", "1")
            .replace("{n}", "0");
        let (s, text) = ex
            .raw(method, &concrete, Some("application/json"), b"{}".to_vec())
            .await;
        assert_ne!(s, 405, "{method} {concrete}: {text}");
        if s == 404 {
            assert!(
                !error_of(&text).contains("No route"),
                "{method} {concrete}: {text}"
            );
        }
    }
}

#[tokio::test]
async fn file_edits_are_served_and_invalid_edits_block_writes() {
    let vpdu = Vpdu::start(2);
    let ex = Executor::start(&vpdu).await;
    // A valid edit (saved by rename, as editors do).
    let edited = ex.db_text().replace(
        "base_name: gfx10\n    ip_address: 10.42.0.10",
        "base_name: gfx11\n    ip_address: 10.42.0.10",
    );
    assert_ne!(edited, ex.db_text());
    let tmp = ex.db_path.with_extension("tmp");
    std::fs::write(&tmp, &edited).unwrap();
    std::fs::rename(&tmp, &ex.db_path).unwrap();
    wait_until("the edit is served", || async {
        // Retried, not asserted: the DUT may briefly be unknown while the
        // edited file is being taken in.
        let (s, body) = ex.get(&format!("/api/v1/dut/{DUT_A}")).await;
        s == 200 && serde_json::from_str::<Value>(&body).is_ok_and(|v| v["base_name"] == "gfx11")
    })
    .await;
    // An invalid edit: the last good database stays, the error is shown,
    // writes are refused and the file is left as the admin wrote it.
    std::fs::write(&ex.db_path, "duts: [not, a, map\n").unwrap();
    wait_until("the error is shown", || async {
        ex.get_json("/api/v1/full-state").await["marsdb_error"].is_string()
    })
    .await;
    assert_eq!(
        ex.get_json(&format!("/api/v1/dut/{DUT_A}")).await["base_name"],
        "gfx11"
    );
    let (s, body) = ex
        .send(
            "PATCH",
            &format!("/api/v1/dut/{DUT_A}"),
            Some(json!({"comment": "x"})),
        )
        .await;
    assert_eq!(s, 409, "{body}");
    assert_eq!(ex.db_text(), "duts: [not, a, map\n");
}

#[tokio::test]
async fn sigterm_stops_gracefully() {
    let vpdu = Vpdu::start(2);
    let mut ex = Executor::start(&vpdu).await;
    let (s, _) = ex
        .send(
            "PATCH",
            &format!("/api/v1/dut/{DUT_A}"),
            Some(json!({"comment": "before stop"})),
        )
        .await;
    assert_eq!(s, 200);
    let pid = ex.pid();
    assert!(Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap()
        .success());
    let mut child = ex.child.take().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        assert!(
            Instant::now() < deadline,
            "the executor did not stop after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(
        status.success(),
        "exit status {status:?}; log:\n{}",
        ex.log()
    );
    assert!(ex.log().contains("SIGTERM"), "{}", ex.log());
    assert_eq!(
        ex.db_yaml()["duts"][DUT_A]["comment"].as_str(),
        Some("before stop")
    );
    // Changes are logged at `info` with method, path, status and duration;
    // so are refusals. Successful reads are `debug` (see
    // `request_log_shows_every_request_at_debug`).
    let log = ex.log();
    assert!(
        log.lines().any(|l| l.contains("PATCH")
            && l.contains(&format!("/api/v1/dut/{DUT_A}"))
            && l.contains("200")
            && l.contains("us")),
        "{log}"
    );
    assert!(
        !log.lines()
            .any(|l| l.contains("vivian::http") && l.contains("GET /api/v1/pdus 200")),
        "successful reads are not logged at info:\n{log}"
    );
}

#[tokio::test]
async fn request_log_shows_every_request_at_debug() {
    let vpdu = Vpdu::start(2);
    let ex = Executor::start_with(
        mars_yaml(vpdu.port),
        &[("RUST_LOG", "info,vivian::http=debug".into())],
    )
    .await;
    assert_eq!(ex.get(&format!("/api/v1/dut/{DUT_A}")).await.0, 200);
    assert_eq!(ex.get("/api/v1/dut/nobody").await.0, 404);
    let line = |needle: &str| {
        strip_ansi(&ex.log())
            .lines()
            .find(|l| l.contains("vivian::http") && l.contains(needle))
            .map(str::to_string)
    };
    wait_until("both requests logged", || async {
        line(&format!("GET /api/v1/dut/{DUT_A} 200")).is_some()
            && line("GET /api/v1/dut/nobody 404").is_some()
    })
    .await;
    let ok = line(&format!("GET /api/v1/dut/{DUT_A} 200")).unwrap();
    assert!(ok.contains("DEBUG") && ok.contains("duration_us="), "{ok}");
    let refused = line("GET /api/v1/dut/nobody 404").unwrap();
    assert!(refused.contains("INFO"), "refusals are info: {refused}");
}

/// `text` without its ANSI escape sequences (the log's colours).
fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // CSI: ESC [ parameters final-byte
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The `salad` binary on an inherited socket of 127.0.0.1 (no serial
/// port, netconsole on loopback), killed on drop.
struct SaladProcess {
    child: Child,
    http: u16,
    _logs: tempfile::TempDir,
}

impl Drop for SaladProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl SaladProcess {
    fn start() -> SaladProcess {
        let sa = which("systemd-socket-activate").expect(
            "systemd-socket-activate is needed (Debian package systemd; scripts/test-all installs it)",
        );
        let http = free_port();
        let logs = tempfile::tempdir().unwrap();
        let child = Command::new(sa)
            .arg("-l")
            .arg(format!("127.0.0.1:{http}"))
            .arg("--fdname=http_ipv4")
            .arg(format!("-ESALAD_TCPCONSOLE_PORT={}", free_port()))
            .arg("-ESALAD_TCPCONSOLE_HOST=127.0.0.1")
            .arg("-ESALAD_MACHINE_HOST=127.0.0.1")
            .arg("-ESALAD_SERIAL_GLOBS=")
            .arg(format!("-ESALAD_LOG_DIR={}", logs.path().display()))
            .arg(env!("CARGO_BIN_EXE_salad"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn systemd-socket-activate");
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", http)).is_err() {
            assert!(
                Instant::now() < deadline,
                "systemd-socket-activate never listened"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        SaladProcess {
            child,
            http,
            _logs: logs,
        }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.http)
    }
}

fn gitlab_yaml(vpdu_port: u16, gitlab_url: &str) -> String {
    format!(
        "{}gitlab:\n  fake:\n    url: \"{gitlab_url}\"\n    registration_token: \"{}\"\n    access_token: \"{}\"\n    expose_runners: true\n    maximum_timeout: 7200\n",
        mars_yaml(vpdu_port),
        fake_gitlab::REGISTRATION_TOKEN,
        fake_gitlab::ACCESS_TOKEN
    )
}

#[tokio::test]
async fn dut_shows_its_runners_and_console_and_delete_removes_its_runners() {
    let vpdu = Vpdu::start(4);
    let gitlab = fake_gitlab::FakeGitlab::start().await;
    let salad = SaladProcess::start();
    let ex = Executor::start_with(
        gitlab_yaml(vpdu.port, &gitlab.url()),
        &[
            ("SALAD_URL", salad.url()),
            ("GITLAB_ALLOW_INSECURE", "true".into()),
        ],
    )
    .await;
    let dut_a = format!("/api/v1/dut/{DUT_A}");

    // The reconciler registers DUT A (B is retired) and the API shows it.
    wait_until("DUT A's runner is registered and checked", || async {
        let a = ex.get_json(&dut_a).await;
        a["gitlab_runners"]["fake"]["in_config"] == true
            && a["gitlab_runners"]["fake"]["is_valid"] == true
    })
    .await;
    let runner = gitlab
        .runner_by_description("tfarm-gfx10-1")
        .expect("a runner for DUT A on GitLab");
    let a = ex.get_json(&dut_a).await;
    let st = &a["gitlab_runners"]["fake"];
    assert_eq!(st["exposed"], true, "{st}");
    assert_eq!(st["active"], true, "{st}");
    assert_eq!(st["registered"], true, "{st}");
    assert_eq!(st["runner_id"], runner.id, "{st}");
    assert_eq!(st["error"], Value::Null, "{st}");
    assert!(
        !a.to_string().contains(&runner.token),
        "a runner token leaked into the API: {a}"
    );
    let b = ex.get_json(&format!("/api/v1/dut/{DUT_B}")).await;
    assert_eq!(b["gitlab_runners"]["fake"]["active"], false, "{b}");
    assert_eq!(b["gitlab_runners"]["fake"]["in_config"], false, "{b}");
    // The lists serve the same objects.
    let duts = ex.get_json("/api/v1/duts").await;
    assert_eq!(duts["duts"][DUT_A]["gitlab_runners"], a["gitlab_runners"]);
    let fs = ex.get_json("/api/v1/full-state").await;
    assert_eq!(fs["duts"][DUT_A]["gitlab_runners"], a["gitlab_runners"]);

    // logs_endpoint: SALAD's read-only console port of the DUT, on the
    // host of SALAD_URL.
    wait_until("logs_endpoint of DUT A", || async {
        ex.get_json(&dut_a).await.get("logs_endpoint").is_some()
    })
    .await;
    let machine: Value = reqwest::get(format!("{}/api/v1/machine/{DUT_A}", salad.url()))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let a = ex.get_json(&dut_a).await;
    assert_eq!(
        a["logs_endpoint"],
        json!({"host": "127.0.0.1", "port": machine["tcp_port_logs"]}),
        "{a}"
    );
    let port = machine["tcp_port_logs"].as_u64().unwrap() as u16;
    TcpStream::connect(("127.0.0.1", port)).expect("the announced console port accepts observers");
    assert_eq!(
        ex.get_json(&format!("/api/v1/dut/{DUT_B}")).await["logs_endpoint"]["host"],
        "127.0.0.1"
    );

    // DELETE removes the DUT's runner from GitLab before it answers.
    let conf_path = ex.db_path.with_file_name("gitlab-runner.toml");
    assert!(std::fs::read_to_string(&conf_path)
        .unwrap()
        .contains("tfarm-gfx10-1"));
    let (s, body) = ex.send("DELETE", &dut_a, None).await;
    assert_eq!(
        (s, body.as_str()),
        (200, "The machine tfarm-gfx10-1 was removed\n")
    );
    assert!(
        gitlab.runners().iter().all(|r| r.id != runner.id),
        "the runner of the deleted DUT is still on GitLab: {:?}",
        gitlab.runners()
    );
    assert!(gitlab
        .requests()
        .iter()
        .any(|r| r == "DELETE /api/v4/runners"));
    assert_eq!(ex.get(&dut_a).await.0, 404);
    // ... and it does not come back.
    wait_until("config.toml without DUT A", || async {
        !std::fs::read_to_string(&conf_path)
            .unwrap()
            .contains("tfarm-gfx10-1")
    })
    .await;
    assert!(gitlab.runner_by_description("tfarm-gfx10-1").is_none());
}

#[tokio::test]
async fn without_salad_or_gitlab_instances_the_dut_object_has_no_such_data() {
    let vpdu = Vpdu::start(2);
    let ex = Executor::start(&vpdu).await;
    wait_until("the executor found SALAD unreachable", || async {
        ex.log()
            .contains("unreachable, the DUTs have no logs_endpoint")
    })
    .await;
    let a = ex.get_json(&format!("/api/v1/dut/{DUT_A}")).await;
    assert!(
        a.get("logs_endpoint").is_none(),
        "SALAD is unreachable: {a}"
    );
    assert_eq!(a["gitlab_runners"], json!({}), "no GitLab instance: {a}");
}

#[tokio::test]
async fn socket_activation_by_name() {
    let sa = which("systemd-socket-activate").expect(
        "systemd-socket-activate is needed (Debian package systemd; scripts/test-all installs it)",
    );
    let vpdu = Vpdu::start(2);
    let dir = tempfile::tempdir().unwrap();
    let db_path = dir.path().join("mars_db.yaml");
    std::fs::write(&db_path, mars_yaml(vpdu.port)).unwrap();
    let port = free_port();
    let unused = free_port();
    let exe = env!("CARGO_BIN_EXE_executor");
    // EXECUTOR_PORT points elsewhere: the API must be served on the
    // inherited socket.
    let log_path = dir.path().join("log");
    let mut args = vec![
        "-l".to_string(),
        format!("127.0.0.1:{port}"),
        "--fdname=http_ipv4".to_string(),
    ];
    // systemd-socket-activate passes only the variables given with -E.
    for (k, v) in executor_env(&db_path, unused) {
        args.push(format!("-E{k}={v}"));
    }
    args.push(exe.to_string());
    let mut child = Command::new(&sa)
        .args(&args)
        .env_clear()
        .envs(executor_env(&db_path, unused))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log_path).unwrap())
        .spawn()
        .expect("spawn systemd-socket-activate");
    let guard = KillOnDrop(&mut child);
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(15);
    let body = loop {
        match http
            .get(format!("http://127.0.0.1:{port}/api/v1/duts"))
            .send()
            .await
        {
            Ok(r) if r.status() == 200 => break r.json::<Value>().await.unwrap(),
            _ => {}
        }
        assert!(
            Instant::now() < deadline,
            "no answer on the activated socket; log:\n{}",
            std::fs::read_to_string(&log_path).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(body["duts"].get(DUT_A).is_some());
    assert!(
        TcpStream::connect(("127.0.0.1", unused)).is_err(),
        "EXECUTOR_PORT must not be bound"
    );
    drop(guard);
}

struct KillOnDrop<'a>(&'a mut Child);

impl Drop for KillOnDrop<'_> {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file())
}
