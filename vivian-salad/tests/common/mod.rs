//! Shared helpers of the integration tests: a running multiplexer with its
//! HTTP API, socat pseudo-terminal pairs, TCP helpers.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::net::TcpStream;
use vivian_salad::{Salad, SaladConfig};

pub struct TestSalad {
    pub salad: Salad,
    pub url: String,
    pub logs: tempfile::TempDir,
}

impl TestSalad {
    pub async fn start(serial_glob: Option<&Path>) -> Self {
        Self::start_scanning(serial_glob, Duration::from_millis(100)).await
    }

    /// With the serial ports' scan interval (`SALAD_SERIAL_SCAN_MS`).
    pub async fn start_scanning(serial_glob: Option<&Path>, scan_interval: Duration) -> Self {
        let logs = tempfile::tempdir().unwrap();
        let mut config = SaladConfig::local(Some(logs.path().to_path_buf()));
        if let Some(g) = serial_glob {
            config.serial_globs = vec![g.display().to_string()];
            config.scan_interval = scan_interval;
        }
        let salad = Salad::start(config).await.unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(vivian_salad::serve_http(salad.clone(), listener));
        Self { salad, url, logs }
    }

    pub fn netconsole(&self) -> SocketAddr {
        self.salad.netconsole_addr().unwrap()
    }

    pub async fn get_json(&self, path: &str) -> (u16, serde_json::Value) {
        let r = reqwest::get(format!("{}{}", self.url, path)).await.unwrap();
        let status = r.status().as_u16();
        let text = r.text().await.unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text)),
        )
    }

    pub async fn machine(&self, id: &str) -> serde_json::Value {
        let (s, v) = self.get_json(&format!("/api/v1/machine/{id}")).await;
        assert_eq!(s, 200, "{v}");
        v
    }

    pub async fn connect(&self, port: u64) -> TcpStream {
        let s = TcpStream::connect(("127.0.0.1", port as u16))
            .await
            .unwrap();
        s.set_nodelay(true).unwrap();
        s
    }

    /// Wait until `cond` holds (bounded).
    pub async fn wait_for(&self, what: &str, mut cond: impl FnMut(&Salad) -> bool) {
        for _ in 0..300 {
            if cond(&self.salad) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("timed out waiting for: {what}");
    }

    pub fn console_machine(&self, name_part: &str) -> Option<Option<String>> {
        self.salad
            .consoles()
            .into_iter()
            .find(|c| c.name.contains(name_part))
            .map(|c| c.machine_id)
    }
}

/// Read until `want` bytes arrived (bounded by `timeout`).
pub async fn read_exact_within<R: AsyncRead + Unpin>(
    r: &mut R,
    want: usize,
    timeout: Duration,
) -> Vec<u8> {
    let mut out = vec![0u8; want];
    tokio::time::timeout(timeout, r.read_exact(&mut out))
        .await
        .unwrap_or_else(|_| panic!("timed out reading {want} bytes"))
        .unwrap();
    out
}

/// Read until the accumulated bytes contain `needle` (bounded).
pub async fn read_until<R: AsyncRead + Unpin>(r: &mut R, needle: &[u8]) -> Vec<u8> {
    let mut acc = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !acc.windows(needle.len()).any(|w| w == needle) {
        let n = tokio::time::timeout_at(deadline, r.read(&mut buf))
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "timed out waiting for {:?}; got {:?}",
                    String::from_utf8_lossy(needle),
                    String::from_utf8_lossy(&acc)
                )
            })
            .unwrap();
        assert!(
            n > 0,
            "end of stream before {:?}; got {:?}",
            String::from_utf8_lossy(needle),
            String::from_utf8_lossy(&acc)
        );
        acc.extend_from_slice(&buf[..n]);
    }
    acc
}

/// Read to end of stream (bounded).
pub async fn read_to_eof<R: AsyncRead + Unpin>(r: &mut R) -> Vec<u8> {
    let mut acc = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), r.read_to_end(&mut acc))
        .await
        .expect("timed out waiting for end of stream")
        .unwrap();
    acc
}

/// A socat pseudo-terminal pair: `salad_end` matches the multiplexer's glob
/// (`<dir>/ttySALAD*`), `dut_end` is where the test plays the DUT.
pub struct PtyPair {
    child: Child,
    pub salad_end: PathBuf,
    pub dut_end: PathBuf,
}

impl PtyPair {
    pub fn start(dir: &Path, n: u32) -> Self {
        let salad_end = dir.join(format!("ttySALAD{n}"));
        let dut_end = dir.join(format!("dut{n}"));
        let child = Command::new("socat")
            .arg("-d")
            .arg(format!("pty,raw,echo=0,link={}", salad_end.display()))
            .arg(format!("pty,raw,echo=0,link={}", dut_end.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("socat is needed for the serial console tests (Debian package socat, see scripts/test-all)");
        let pair = Self {
            child,
            salad_end,
            dut_end,
        };
        for _ in 0..500 {
            if pair.salad_end.exists() && pair.dut_end.exists() {
                return pair;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("socat did not create {} in time", pair.salad_end.display());
    }

    /// Open the DUT end as a serial port.
    pub fn open_dut(&self) -> tokio_serial::SerialStream {
        let b = tokio_serial::new(self.dut_end.to_string_lossy(), 115200);
        tokio_serial::SerialStream::open(&b).unwrap()
    }

    /// Unplug: kill socat (its links are removed or left dangling).
    pub fn unplug(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.salad_end);
        let _ = std::fs::remove_file(&self.dut_end);
    }
}

impl Drop for PtyPair {
    fn drop(&mut self) {
        self.stop();
    }
}
