//! Configuration of the multiplexer, from the environment like the reference
//! `salad` (PyPI `valve-gfx-ci.salad` 0.0.2) plus Vivian's own options.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

/// Default HTTP API port (`SALAD_PORT`).
pub const DEFAULT_HTTP_PORT: u16 = 8005;
/// Default netconsole port (`SALAD_TCPCONSOLE_PORT`).
pub const DEFAULT_TCPCONSOLE_PORT: u16 = 8006;
/// Default serial port globs (`SALAD_SERIAL_GLOBS`).
pub const DEFAULT_SERIAL_GLOBS: &[&str] = &["/dev/ttyUSB*", "/dev/ttyACM*"];
/// Default console log directory (`SALAD_LOG_DIR`).
pub const DEFAULT_LOG_DIR: &str = "/var/log/salad";

/// A configuration value that could not be used.
#[derive(Debug, thiserror::Error)]
#[error("invalid {variable}={value:?}: {reason}")]
pub struct ConfigError {
    /// The environment variable.
    pub variable: String,
    /// Its value.
    pub value: String,
    /// What is wrong with it.
    pub reason: String,
}

/// How the multiplexer runs.
#[derive(Debug, Clone)]
pub struct SaladConfig {
    /// Port of the HTTP API when not socket-activated (`SALAD_PORT`, 8005).
    /// The library does not bind it: the binary does (see
    /// [`crate::serve_http`]).
    pub http_port: u16,
    /// Where the netconsole listener binds (`SALAD_TCPCONSOLE_HOST`, default
    /// `0.0.0.0`, and `SALAD_TCPCONSOLE_PORT`, default 8006; port 0 picks a
    /// free port, see [`crate::Salad::netconsole_addr`]).
    pub netconsole_addr: Option<SocketAddr>,
    /// Address the per-machine read-write and read-only ports bind to
    /// (`SALAD_MACHINE_HOST`, default `0.0.0.0` as the reference); each
    /// port is ephemeral.
    pub machine_bind_ip: IpAddr,
    /// Globs of the serial devices to open (`SALAD_SERIAL_GLOBS`,
    /// comma-separated, default `/dev/ttyUSB*,/dev/ttyACM*`). Symbolic links
    /// are followed: tests point this at `socat` pty links in a directory.
    /// An empty list disables serial ports.
    pub serial_globs: Vec<String>,
    /// How often the serial loop checks whether it must scan the globs
    /// (`SALAD_SERIAL_SCAN_MS`, default 500 ms): a port to retry, a console
    /// that closed on its own. Hot-plug itself is seen through inotify
    /// watches on the globs' directories (and a scan every 10 s); without
    /// inotify, the globs are scanned at this interval.
    pub scan_interval: Duration,
    /// Baud rate of serial ports (115200).
    pub baud_rate: u32,
    /// Directory of the per-machine console logs (`SALAD_LOG_DIR`, default
    /// `/var/log/salad`; an empty value disables logs). Every byte of a
    /// machine's console is appended to `<dir>/<machine id>.log`.
    pub log_dir: Option<PathBuf>,
    /// A client that falls this many bytes behind is disconnected (it can
    /// reconnect and fetch what it missed from the log). Default 8 MiB.
    pub max_client_backlog: usize,
    /// Bytes a console keeps while it is not bound to a machine; they go to
    /// the machine's log and clients when the console announces its machine.
    /// The oldest bytes are dropped beyond this bound. Default 256 KiB.
    pub max_unbound_backlog: usize,
    /// Line bound of the console line splitter (see
    /// [`vivian_core::console::LineSplitter`]).
    pub max_line: usize,
    /// Refuse console resets (`SALAD_CONSOLE_USB_RESET_DISABLE=1`).
    pub usb_reset_disabled: bool,
    /// Power-off time of a USB console reset
    /// (`SALAD_CONSOLE_USB_RESET_POWER_OFF_TIME`, seconds, default 3).
    pub usb_reset_power_off: Duration,
    /// Root of sysfs, `/sys` (tests use a fake tree).
    pub sysfs_root: PathBuf,
    /// Wake-up batching of the `salad` binary's runtime
    /// (`SALAD_BATCH_MS`, 0-20, default 2; 0 disables it): see
    /// [`crate::runtime`]. The library itself runs on whatever runtime
    /// starts it and does not read this.
    pub batch: Duration,
    /// Threads of the `salad` binary's runtime (`SALAD_THREADS`, 1-64,
    /// default 1): see [`crate::runtime`]. Not read by the library either.
    pub threads: usize,
}

impl Default for SaladConfig {
    fn default() -> Self {
        Self {
            http_port: DEFAULT_HTTP_PORT,
            netconsole_addr: Some(SocketAddr::new(
                IpAddr::V4(Ipv4Addr::UNSPECIFIED),
                DEFAULT_TCPCONSOLE_PORT,
            )),
            machine_bind_ip: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            serial_globs: DEFAULT_SERIAL_GLOBS.iter().map(|s| s.to_string()).collect(),
            scan_interval: Duration::from_millis(500),
            baud_rate: 115_200,
            log_dir: Some(PathBuf::from(DEFAULT_LOG_DIR)),
            max_client_backlog: 8 << 20,
            max_unbound_backlog: 256 << 10,
            max_line: vivian_core::console::DEFAULT_MAX_LINE,
            usb_reset_disabled: false,
            usb_reset_power_off: Duration::from_secs(3),
            sysfs_root: PathBuf::from("/sys"),
            batch: crate::runtime::DEFAULT_BATCH,
            threads: 1,
        }
    }
}

impl SaladConfig {
    /// A configuration for tests and embedding: everything on 127.0.0.1 with
    /// ephemeral ports, no serial ports, logs in `log_dir`.
    pub fn local(log_dir: Option<PathBuf>) -> Self {
        let lo = IpAddr::V4(Ipv4Addr::LOCALHOST);
        Self {
            http_port: 0,
            netconsole_addr: Some(SocketAddr::new(lo, 0)),
            machine_bind_ip: lo,
            serial_globs: Vec::new(),
            log_dir,
            ..Self::default()
        }
    }

    /// Read the configuration from the process environment.
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_lookup(|k| std::env::var(k).ok())
    }

    /// Read the configuration from any variable lookup (tests).
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let mut c = Self::default();
        let err = |variable: &str, value: &str, reason: &str| ConfigError {
            variable: variable.into(),
            value: value.into(),
            reason: reason.into(),
        };
        let port = |name: &str, default: u16| -> Result<u16, ConfigError> {
            match get(name) {
                None => Ok(default),
                Some(v) => v
                    .trim()
                    .parse::<u16>()
                    .map_err(|_| err(name, &v, "expected a TCP port number (0-65535)")),
            }
        };
        let ip = |name: &str, default: IpAddr| -> Result<IpAddr, ConfigError> {
            match get(name) {
                None => Ok(default),
                Some(v) => v
                    .trim()
                    .parse::<IpAddr>()
                    .map_err(|_| err(name, &v, "expected an IP address")),
            }
        };
        c.http_port = port("SALAD_PORT", DEFAULT_HTTP_PORT)?;
        let nc_port = port("SALAD_TCPCONSOLE_PORT", DEFAULT_TCPCONSOLE_PORT)?;
        let nc_ip = ip("SALAD_TCPCONSOLE_HOST", IpAddr::V4(Ipv4Addr::UNSPECIFIED))?;
        c.netconsole_addr = Some(SocketAddr::new(nc_ip, nc_port));
        c.machine_bind_ip = ip("SALAD_MACHINE_HOST", c.machine_bind_ip)?;
        if let Some(v) = get("SALAD_SERIAL_GLOBS") {
            let globs: Vec<String> = v
                .split(',')
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .collect();
            for g in &globs {
                glob::Pattern::new(g)
                    .map_err(|e| err("SALAD_SERIAL_GLOBS", &v, &format!("{g:?}: {e}")))?;
            }
            c.serial_globs = globs;
        }
        if let Some(v) = get("SALAD_SERIAL_SCAN_MS") {
            let ms: u64 = v
                .trim()
                .parse()
                .ok()
                .filter(|&ms| (10..=60_000).contains(&ms))
                .ok_or_else(|| {
                    err(
                        "SALAD_SERIAL_SCAN_MS",
                        &v,
                        "expected milliseconds between 10 and 60000",
                    )
                })?;
            c.scan_interval = Duration::from_millis(ms);
        }
        if let Some(v) = get("SALAD_BATCH_MS") {
            let max = crate::runtime::MAX_BATCH.as_millis() as u64;
            let ms: u64 = v
                .trim()
                .parse()
                .ok()
                .filter(|&ms| ms <= max)
                .ok_or_else(|| {
                    err(
                        "SALAD_BATCH_MS",
                        &v,
                        &format!("expected whole milliseconds between 0 and {max}"),
                    )
                })?;
            c.batch = Duration::from_millis(ms);
        }
        if let Some(v) = get("SALAD_THREADS") {
            let max = crate::runtime::MAX_THREADS;
            c.threads = v
                .trim()
                .parse()
                .ok()
                .filter(|n| (1..=max).contains(n))
                .ok_or_else(|| {
                    err(
                        "SALAD_THREADS",
                        &v,
                        &format!("expected a whole number of threads between 1 and {max}"),
                    )
                })?;
        }
        if let Some(v) = get("SALAD_LOG_DIR") {
            c.log_dir = if v.trim().is_empty() {
                None
            } else {
                Some(PathBuf::from(v))
            };
        }
        if let Some(v) = get("SALAD_CONSOLE_USB_RESET_DISABLE") {
            c.usb_reset_disabled = v.trim() == "1";
        }
        if let Some(v) = get("SALAD_CONSOLE_USB_RESET_POWER_OFF_TIME") {
            let s: u64 = v.trim().parse().map_err(|_| {
                err(
                    "SALAD_CONSOLE_USB_RESET_POWER_OFF_TIME",
                    &v,
                    "expected a whole number of seconds",
                )
            })?;
            c.usb_reset_power_off = Duration::from_secs(s);
        }
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn cfg(vars: &[(&str, &str)]) -> Result<SaladConfig, ConfigError> {
        let m: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        SaladConfig::from_lookup(|k| m.get(k).cloned())
    }

    #[test]
    fn defaults_are_the_reference_ones() {
        let c = cfg(&[]).unwrap();
        assert_eq!(c.http_port, 8005);
        assert_eq!(c.netconsole_addr.unwrap().port(), 8006);
        assert_eq!(c.baud_rate, 115200);
        assert_eq!(c.serial_globs, vec!["/dev/ttyUSB*", "/dev/ttyACM*"]);
        assert_eq!(c.usb_reset_power_off, Duration::from_secs(3));
        assert_eq!(c.batch, Duration::from_millis(2));
        assert_eq!(c.threads, 1);
    }

    #[test]
    fn variables_are_read_and_bad_values_named() {
        let c = cfg(&[
            ("SALAD_PORT", "9005"),
            ("SALAD_TCPCONSOLE_PORT", "9006"),
            ("SALAD_SERIAL_GLOBS", "/tmp/x/tty*, /dev/ttyS1"),
            ("SALAD_LOG_DIR", ""),
        ])
        .unwrap();
        assert_eq!(c.http_port, 9005);
        assert_eq!(c.netconsole_addr.unwrap().port(), 9006);
        assert_eq!(c.serial_globs, vec!["/tmp/x/tty*", "/dev/ttyS1"]);
        assert!(c.log_dir.is_none());
        let e = cfg(&[("SALAD_TCPCONSOLE_PORT", "80x")]).unwrap_err();
        assert!(e.to_string().contains("SALAD_TCPCONSOLE_PORT"), "{e}");
        assert_eq!(
            cfg(&[("SALAD_BATCH_MS", "0")]).unwrap().batch,
            Duration::ZERO
        );
        assert_eq!(
            cfg(&[("SALAD_BATCH_MS", "1")]).unwrap().batch,
            Duration::from_millis(1)
        );
        assert_eq!(cfg(&[("SALAD_THREADS", "4")]).unwrap().threads, 4);
        for bad in ["0", "65", "two"] {
            let e = cfg(&[("SALAD_THREADS", bad)]).unwrap_err();
            assert!(e.to_string().contains("SALAD_THREADS"), "{e}");
            assert!(e.to_string().contains("between 1 and 64"), "{e}");
        }
        for bad in ["21", "-1", "1.5", "fast"] {
            let e = cfg(&[("SALAD_BATCH_MS", bad)]).unwrap_err();
            assert!(e.to_string().contains("SALAD_BATCH_MS"), "{e}");
            assert!(e.to_string().contains("between 0 and 20"), "{e}");
        }
        let e = cfg(&[("SALAD_SERIAL_GLOBS", "/dev/[tty")]).unwrap_err();
        assert!(e.to_string().contains("SALAD_SERIAL_GLOBS"), "{e}");
    }
}
