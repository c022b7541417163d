//! The `vpdu` driver: client of the virtual PDU byte protocol.
//!
//! One TCP connection per command. The client sends a big-endian u32: bits
//! 0–1 the command, bits 2–12 the port index (0-based), bit 13 "shut the
//! server down after this request"; the server answers one byte and closes.
//!
//! | command | word | reply |
//! |---|---|---|
//! | port count | `0` | the count |
//! | ON | `port << 2 \| 1` | `0x01` |
//! | OFF | `port << 2 \| 2` | `0x01` |
//! | status | `port << 2 \| 3` | `0x03` ON, `0x04` OFF, `0x05` unknown |
//!
//! Malformed requests and ports out of range get `0x00`. Config:
//! `hostname: host:port` (default `localhost:9191`). Ports are `"0"`..,
//! without labels; REBOOT is OFF then ON (done by the port layer); the
//! default minimum off time is 0.1 s.

use std::time::Duration;

use async_trait::async_trait;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use vivian_core::pdu::{PduDriver, PduError, PortInfo, PortState};

/// The driver's registry name.
pub const NAME: &str = "vpdu";
/// The endpoint used when the config has no `hostname`.
pub const DEFAULT_ENDPOINT: &str = "localhost:9191";

/// Command: how many ports.
pub const CMD_COUNT: u32 = 0;
/// Command: power ON.
pub const CMD_ON: u32 = 1;
/// Command: power OFF.
pub const CMD_OFF: u32 = 2;
/// Command: status.
pub const CMD_STATUS: u32 = 3;
/// Flag bit: shut the server down after this request.
pub const FLAG_SHUTDOWN: u32 = 1 << 13;
/// Highest port index the protocol can address.
pub const MAX_PORT: u32 = (1 << 11) - 1;
/// Reply: command done.
pub const REPLY_OK: u8 = 0x01;
/// Reply: malformed request or port out of range.
pub const REPLY_ERROR: u8 = 0x00;
/// Status reply: ON.
pub const STATUS_ON: u8 = 0x03;
/// Status reply: OFF.
pub const STATUS_OFF: u8 = 0x04;
/// Status reply: unknown.
pub const STATUS_UNKNOWN: u8 = 0x05;

/// Encodes a request word.
pub fn encode(port: u32, command: u32, shutdown: bool) -> u32 {
    ((port & MAX_PORT) << 2) | (command & 3) | if shutdown { FLAG_SHUTDOWN } else { 0 }
}

/// A decoded request word.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request {
    /// The command (0–3).
    pub command: u32,
    /// The port index.
    pub port: u32,
    /// Shut the server down after answering.
    pub shutdown: bool,
}

/// Decodes a request word; `None` if bits 14–31 are set or a port is given
/// with the count command.
pub fn decode(word: u32) -> Option<Request> {
    if word >> 14 != 0 {
        return None;
    }
    let r = Request {
        command: word & 3,
        port: (word >> 2) & MAX_PORT,
        shutdown: word & FLAG_SHUTDOWN != 0,
    };
    if r.command == CMD_COUNT && r.port != 0 {
        return None;
    }
    Some(r)
}

/// The virtual PDU client.
#[derive(Clone, Debug)]
pub struct VpduDriver {
    endpoint: String,
    io_timeout: Duration,
}

impl VpduDriver {
    /// A client of the server at `host:port`.
    pub fn new(endpoint: impl Into<String>) -> Self {
        Self {
            endpoint: endpoint.into(),
            io_timeout: Duration::from_secs(5),
        }
    }

    /// Builds the driver from its MarsDB config (`hostname: host:port`).
    pub fn from_config(config: &serde_json::Value) -> Result<Self, PduError> {
        let endpoint = match config.get("hostname") {
            None | Some(serde_json::Value::Null) => DEFAULT_ENDPOINT.to_string(),
            Some(serde_json::Value::String(s))
                if s.rsplit_once(':')
                    .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok()) =>
            {
                s.clone()
            }
            Some(v) => {
                return Err(PduError::config(format!(
                    "\"hostname\" must be \"host:port\", not {v}"
                )))
            }
        };
        Ok(Self::new(endpoint))
    }

    /// The server endpoint.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// Sends one request word and returns the reply byte.
    pub async fn exchange(&self, word: u32) -> Result<u8, PduError> {
        let io = async {
            let mut stream = TcpStream::connect(&self.endpoint).await.map_err(|e| {
                PduError::Transport(format!("connecting to {}: {e}", self.endpoint))
            })?;
            stream.set_nodelay(true).ok();
            stream
                .write_all(&word.to_be_bytes())
                .await
                .map_err(|e| PduError::Transport(format!("sending to {}: {e}", self.endpoint)))?;
            let mut reply = [0u8; 1];
            match stream.read_exact(&mut reply).await {
                Ok(_) => Ok(reply[0]),
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Err(PduError::Protocol(
                    format!("{} closed the connection without a reply", self.endpoint),
                )),
                Err(e) => Err(PduError::Transport(format!(
                    "reading from {}: {e}",
                    self.endpoint
                ))),
            }
        };
        tokio::time::timeout(self.io_timeout, io)
            .await
            .map_err(|_| PduError::Timeout {
                operation: format!("vpdu request {word:#010x} to {}", self.endpoint),
                timeout: self.io_timeout,
            })?
    }

    fn port(port_id: &str) -> Result<u32, PduError> {
        port_id
            .parse::<u32>()
            .ok()
            .filter(|p| *p <= MAX_PORT)
            .ok_or_else(|| PduError::Protocol(format!("no port \"{port_id}\"")))
    }
}

#[async_trait]
impl PduDriver for VpduDriver {
    async fn ports(&self) -> Result<Vec<PortInfo>, PduError> {
        let n = self.exchange(encode(0, CMD_COUNT, false)).await?;
        Ok((0..n).map(|i| PortInfo::new(i.to_string(), None)).collect())
    }

    async fn get_state(&self, port_id: &str) -> Result<PortState, PduError> {
        let port = Self::port(port_id)?;
        match self.exchange(encode(port, CMD_STATUS, false)).await? {
            STATUS_ON => Ok(PortState::On),
            STATUS_OFF => Ok(PortState::Off),
            STATUS_UNKNOWN => Ok(PortState::Unknown),
            REPLY_ERROR => Err(PduError::Protocol(format!(
                "{} refused the status of port {port} (out of range?)",
                self.endpoint
            ))),
            b => Err(PduError::Protocol(format!(
                "{} answered {b:#04x} to the status of port {port}",
                self.endpoint
            ))),
        }
    }

    async fn set_state(&self, port_id: &str, state: PortState) -> Result<(), PduError> {
        let port = Self::port(port_id)?;
        let command = match state {
            PortState::On => CMD_ON,
            PortState::Off => CMD_OFF,
            s => {
                return Err(PduError::InvalidState(format!(
                    "the vpdu driver cannot write {s}"
                )))
            }
        };
        match self.exchange(encode(port, command, false)).await? {
            REPLY_OK => Ok(()),
            b => Err(PduError::Protocol(format!(
                "{} answered {b:#04x} instead of 0x01 to {state} on port {port}",
                self.endpoint
            ))),
        }
    }

    fn default_min_off_time(&self) -> Duration {
        Duration::from_millis(100)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_match_the_reference_examples() {
        assert_eq!(encode(2, CMD_OFF, false).to_be_bytes(), [0, 0, 0, 0x0a]);
        assert_eq!(encode(2, CMD_ON, false).to_be_bytes(), [0, 0, 0, 0x09]);
        assert_eq!(encode(0, CMD_STATUS, false).to_be_bytes(), [0, 0, 0, 0x03]);
        assert_eq!(
            decode(encode(5, CMD_ON, true)),
            Some(Request {
                command: CMD_ON,
                port: 5,
                shutdown: true
            })
        );
        assert_eq!(decode(1 << 14), None);
        assert_eq!(decode(encode(3, CMD_COUNT, false)), None);
    }

    #[test]
    fn config_hostname() {
        let d = VpduDriver::from_config(&serde_json::json!({})).unwrap();
        assert_eq!(d.endpoint(), DEFAULT_ENDPOINT);
        let d =
            VpduDriver::from_config(&serde_json::json!({"hostname": "127.0.0.1:9999"})).unwrap();
        assert_eq!(d.endpoint(), "127.0.0.1:9999");
        let e = VpduDriver::from_config(&serde_json::json!({"hostname": "nohost"}))
            .unwrap_err()
            .to_string();
        assert!(e.contains("hostname"), "{e}");
    }
}
