//! Validated domain types of MarsDB.
//!
//! These types are what the rest of Vivian works with. Leaf invariants are
//! enforced by the types themselves (a [`MacAddr`] is always a valid MAC, an
//! IP address is an [`Ipv4Addr`], a [`PortId`] is always a string); the
//! cross-references between entries (a DUT's `pdu` names a PDU, ...) are
//! checked by [`Database::validate`], which every backend runs before it
//! commits a change.

use std::collections::HashSet;
use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

use chrono::{DateTime, SubsecRound, Utc};
use indexmap::{IndexMap, IndexSet};

use super::error::ValidationError;

/// Name of the PDU forced into the database by `EXECUTOR_VPDU_ENDPOINT`.
pub const VPDU_NAME: &str = "VPDU";
/// Driver name of the virtual PDU.
pub const VPDU_DRIVER: &str = "vpdu";
/// Token value of a runner that is not registered on GitLab.
pub const PLACEHOLDER_TOKEN: &str = "<invalid default>";
/// Default `pdu_off_delay` of a DUT, in seconds.
pub const DEFAULT_PDU_OFF_DELAY: f64 = 30.0;
/// Default `maximum_timeout` of a GitLab instance, in seconds (6 hours).
pub const DEFAULT_MAXIMUM_TIMEOUT: u64 = 21600;

/// A MAC address, always displayed in lower-case colon form
/// (`52:54:00:11:22:33`).
///
/// Parsing accepts upper or lower case hexadecimal digits separated by `:`
/// or `-`, two digits per byte.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MacAddr(pub [u8; 6]);

/// Error returned when a string is not a MAC address.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid MAC address {0:?}: expected six pairs of hexadecimal digits separated by ':' (e.g. 52:54:00:11:22:33)")]
pub struct ParseMacError(pub String);

impl MacAddr {
    /// The six bytes of the address.
    pub fn octets(&self) -> [u8; 6] {
        self.0
    }
}

impl FromStr for MacAddr {
    type Err = ParseMacError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || ParseMacError(s.to_string());
        let bytes = s.as_bytes();
        if bytes.len() != 17 {
            return Err(err());
        }
        let sep = bytes[2];
        if sep != b':' && sep != b'-' {
            return Err(err());
        }
        let mut out = [0u8; 6];
        for (i, chunk) in bytes.chunks(3).enumerate() {
            if chunk.len() == 3 && chunk[2] != sep {
                return Err(err());
            }
            let hex = std::str::from_utf8(&chunk[..2]).map_err(|_| err())?;
            if !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(err());
            }
            out[i] = u8::from_str_radix(hex, 16).map_err(|_| err())?;
        }
        Ok(MacAddr(out))
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5]
        )
    }
}

impl fmt::Debug for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MacAddr({self})")
    }
}

impl serde::Serialize for MacAddr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for MacAddr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // A visitor (not a parse after the fact) so that the format can
        // attach the location of the offending node to the error.
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = MacAddr;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a MAC address")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<MacAddr, E> {
                v.parse().map_err(E::custom)
            }
        }
        d.deserialize_str(V)
    }
}

/// The id of a PDU port. Always a string: MarsDB and the REST API compare
/// port ids as strings, and integers found in the file are converted
/// (`pdu_port_id: 1` is the port `"1"`).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortId(String);

impl PortId {
    /// A port id from any string.
    pub fn new(id: impl Into<String>) -> Self {
        PortId(id.into())
    }

    /// The id as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for PortId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for PortId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PortId({:?})", self.0)
    }
}

impl From<&str> for PortId {
    fn from(s: &str) -> Self {
        PortId(s.to_string())
    }
}

impl From<String> for PortId {
    fn from(s: String) -> Self {
        PortId(s)
    }
}

impl From<u64> for PortId {
    fn from(n: u64) -> Self {
        PortId(n.to_string())
    }
}

impl From<i64> for PortId {
    fn from(n: i64) -> Self {
        PortId(n.to_string())
    }
}

impl From<u32> for PortId {
    fn from(n: u32) -> Self {
        PortId(n.to_string())
    }
}

impl serde::Serialize for PortId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> serde::Deserialize<'de> for PortId {
    /// Accepts a string or an integer (coerced to its decimal string).
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = PortId;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a port id (a string or an integer)")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<PortId, E> {
                if v.is_empty() {
                    return Err(E::custom("a port id cannot be empty"));
                }
                Ok(PortId(v.to_string()))
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<PortId, E> {
                Ok(PortId(v.to_string()))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<PortId, E> {
                Ok(PortId(v.to_string()))
            }
        }
        d.deserialize_any(V)
    }
}

/// The three places a GitLab runner can be registered in.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, Default, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum RunnerType {
    /// A runner available to the whole instance (needs an admin token).
    #[default]
    InstanceType,
    /// A runner of one group (`group_id` required).
    GroupType,
    /// A runner of one project (`project_id` required).
    ProjectType,
}

impl RunnerType {
    /// The wire name (`instance_type`, `group_type`, `project_type`), as
    /// used by MarsDB and the GitLab API.
    pub fn as_str(self) -> &'static str {
        match self {
            RunnerType::InstanceType => "instance_type",
            RunnerType::GroupType => "group_type",
            RunnerType::ProjectType => "project_type",
        }
    }
}

impl fmt::Display for RunnerType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The driver configuration of a PDU: the raw map of the file, kept
/// verbatim and in order (driver-specific, e.g. `hostname`).
pub type PduConfig = serde_json::Map<String, serde_json::Value>;

/// A power delivery unit (`pdus.<name>`).
#[derive(Clone, Debug, PartialEq)]
pub struct Pdu {
    /// Registry name of the driver (`apc_masterswitch`, `vpdu`, ...).
    pub driver: String,
    /// Driver-specific configuration, verbatim.
    pub config: PduConfig,
    /// Ports that no DUT may use and that the API may not switch
    /// (persisted, unlike the reference).
    pub reserved_port_ids: IndexSet<PortId>,
}

impl Pdu {
    /// A PDU with no reserved port.
    pub fn new(driver: impl Into<String>, config: PduConfig) -> Self {
        Pdu {
            driver: driver.into(),
            config,
            reserved_port_ids: IndexSet::new(),
        }
    }

    /// The `config.hostname` string, if present.
    pub fn hostname(&self) -> Option<&str> {
        self.config.get("hostname").and_then(|v| v.as_str())
    }

    /// Whether `port` is reserved.
    pub fn is_reserved(&self, port: &PortId) -> bool {
        self.reserved_port_ids.contains(port)
    }
}

/// A DUT's runner on one GitLab instance (`duts.<id>.gitlab.<instance>`),
/// also the shape of an instance's `gateway_runner` (V2024 shape).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GitlabRunner {
    /// Runner authentication token; [`PLACEHOLDER_TOKEN`] when unregistered.
    pub token: String,
    /// Whether the admin wants this runner exposed (MANUAL).
    pub exposed: bool,
    /// GitLab's runner id; -1 when unregistered.
    pub runner_id: i64,
}

impl Default for GitlabRunner {
    fn default() -> Self {
        GitlabRunner {
            token: PLACEHOLDER_TOKEN.to_string(),
            exposed: true,
            runner_id: -1,
        }
    }
}

impl GitlabRunner {
    /// Whether the token looks usable (a string of 8 characters or more),
    /// as the reference decides.
    pub fn token_looks_valid(&self) -> bool {
        self.token.chars().count() >= 8 && self.token != PLACEHOLDER_TOKEN
    }
}

/// A GitLab instance the DUTs are exposed on (`gitlab.<name>`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GitlabInstance {
    /// Base URL, `https://` or `http://`.
    pub url: String,
    /// Token able to create runners (`create_runner` scope).
    pub registration_token: Option<String>,
    /// Where runners are registered.
    pub runner_type: RunnerType,
    /// Group of `group_type` runners (required for that type).
    pub group_id: Option<u64>,
    /// Project of `project_type` runners (required for that type).
    pub project_id: Option<u64>,
    /// Read-only API token used to verify runners.
    pub access_token: Option<String>,
    /// Master switch: expose the DUTs on this instance at all.
    pub expose_runners: bool,
    /// Maximum job timeout in seconds (positive).
    pub maximum_timeout: u64,
    /// A runner that runs on the gateway itself, if configured.
    pub gateway_runner: Option<GitlabRunner>,
}

impl GitlabInstance {
    /// An instance with the reference's defaults (instance runners, exposed,
    /// 6 hour timeout, no tokens).
    pub fn new(url: impl Into<String>) -> Self {
        GitlabInstance {
            url: url.into(),
            registration_token: None,
            runner_type: RunnerType::InstanceType,
            group_id: None,
            project_id: None,
            access_token: None,
            expose_runners: true,
            maximum_timeout: DEFAULT_MAXIMUM_TIMEOUT,
            gateway_runner: None,
        }
    }
}

/// A device under test (`duts.<mac>`).
#[derive(Clone, Debug, PartialEq)]
pub struct Dut {
    /// Most significant characteristic; basis of the full name (non-empty).
    pub base_name: String,
    /// The DUT's IPv4 address.
    pub ip_address: Ipv4Addr,
    /// Tags from the registration.
    pub tags: Vec<String>,
    /// Tags the admin added (MANUAL / REST-patch).
    pub manual_tags: Vec<String>,
    /// Gateway serial port the DUT's console is on (e.g. `ttyUSB0`).
    pub local_tty_device: Option<String>,
    /// The DUT's MAC address (defaults to its id when absent from the file).
    pub mac_address: MacAddr,
    /// Runners per GitLab instance name.
    pub gitlab: IndexMap<String, GitlabRunner>,
    /// Name of the PDU powering the DUT; must name an entry of `pdus`.
    pub pdu: Option<String>,
    /// Port of that PDU.
    pub pdu_port_id: Option<PortId>,
    /// Seconds the port stays OFF when power-cycling (finite, >= 0).
    pub pdu_off_delay: f64,
    /// Qualified for service by training.
    pub ready_for_service: bool,
    /// Taken out of service by the admin.
    pub is_retired: bool,
    /// When the DUT was first seen (microsecond precision).
    pub first_seen: DateTime<Utc>,
    /// Free-form admin note.
    pub comment: Option<String>,
}

impl Dut {
    /// A new DUT as registration creates it: no PDU, no runner, defaults
    /// applied (`pdu_off_delay` 30, not ready, not retired) and
    /// `first_seen` set to now.
    pub fn new(
        mac_address: MacAddr,
        base_name: impl Into<String>,
        ip_address: Ipv4Addr,
        tags: Vec<String>,
    ) -> Self {
        Dut {
            base_name: base_name.into(),
            ip_address,
            tags,
            manual_tags: Vec::new(),
            local_tty_device: None,
            mac_address,
            gitlab: IndexMap::new(),
            pdu: None,
            pdu_port_id: None,
            pdu_off_delay: DEFAULT_PDU_OFF_DELAY,
            ready_for_service: false,
            is_retired: false,
            first_seen: now_micros(),
            comment: None,
        }
    }

    /// `ready_for_service && !is_retired`.
    pub fn available(&self) -> bool {
        self.ready_for_service && !self.is_retired
    }

    /// The PDU and port the DUT is wired to, when both are set.
    pub fn pdu_port(&self) -> Option<(&str, &PortId)> {
        match (&self.pdu, &self.pdu_port_id) {
            (Some(p), Some(id)) => Some((p.as_str(), id)),
            _ => None,
        }
    }

    /// Sorted, de-duplicated union of `tags`, `manual_tags` and
    /// `farm:<FARM_NAME>` (the runner tags of the reference).
    pub fn all_tags(&self, farm_name: &str) -> Vec<String> {
        let mut all: Vec<String> = self
            .tags
            .iter()
            .chain(self.manual_tags.iter())
            .cloned()
            .chain(std::iter::once(format!("farm:{farm_name}")))
            .collect();
        all.sort();
        all.dedup();
        all
    }
}

/// The current time truncated to microseconds, the precision MarsDB stores.
pub fn now_micros() -> DateTime<Utc> {
    Utc::now().trunc_subsecs(6)
}

/// The whole farm database. Maps keep the file's order.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Database {
    /// PDUs by name.
    pub pdus: IndexMap<String, Pdu>,
    /// DUTs by id (their MAC address).
    pub duts: IndexMap<MacAddr, Dut>,
    /// GitLab instances by name.
    pub gitlab: IndexMap<String, GitlabInstance>,
}

impl Database {
    /// An empty database.
    pub fn new() -> Self {
        Self::default()
    }

    /// Checks the invariants that span entries. Returns the first error,
    /// with its field path (e.g. `duts.52:54:00:11:22:33.pdu`); no file
    /// location (the backends add it).
    ///
    /// * PDU names and `driver` are non-empty;
    /// * a DUT's `base_name` is non-empty, `pdu_off_delay` finite and >= 0,
    ///   `pdu` names an existing PDU;
    /// * a GitLab instance's `url` is `http(s)://`, `maximum_timeout` > 0,
    ///   `group_type` has a `group_id`, `project_type` a `project_id`.
    pub fn validate(&self) -> Result<(), ValidationError> {
        for (name, pdu) in &self.pdus {
            if name.is_empty() {
                return Err(ValidationError::new("pdus", "a PDU name cannot be empty"));
            }
            if pdu.driver.trim().is_empty() {
                return Err(ValidationError::new(
                    format!("pdus.{name}.driver"),
                    "the driver name cannot be empty",
                ));
            }
        }
        let mut macs = HashSet::new();
        for (id, dut) in &self.duts {
            let path = |field: &str| format!("duts.{id}.{field}");
            if dut.base_name.trim().is_empty() {
                return Err(ValidationError::new(
                    path("base_name"),
                    "base_name cannot be empty",
                ));
            }
            if !dut.pdu_off_delay.is_finite() || dut.pdu_off_delay < 0.0 {
                return Err(ValidationError::new(
                    path("pdu_off_delay"),
                    format!(
                        "must be a number of seconds >= 0, got {}",
                        dut.pdu_off_delay
                    ),
                ));
            }
            if let Some(pdu) = &dut.pdu {
                if !self.pdus.contains_key(pdu) {
                    return Err(ValidationError::new(
                        path("pdu"),
                        format!("unknown PDU {pdu:?}"),
                    ));
                }
            }
            if !macs.insert(dut.mac_address) {
                return Err(ValidationError::new(
                    path("mac_address"),
                    format!(
                        "MAC address {} is already used by another DUT",
                        dut.mac_address
                    ),
                ));
            }
        }
        for (name, gl) in &self.gitlab {
            let path = |field: &str| format!("gitlab.{name}.{field}");
            if !(gl.url.starts_with("https://") || gl.url.starts_with("http://"))
                || gl.url.len() <= "https://".len()
            {
                return Err(ValidationError::new(
                    path("url"),
                    format!("expected an http:// or https:// URL, got {:?}", gl.url),
                ));
            }
            if gl.maximum_timeout == 0 {
                return Err(ValidationError::new(
                    path("maximum_timeout"),
                    "must be a positive number of seconds",
                ));
            }
            match gl.runner_type {
                RunnerType::GroupType if gl.group_id.is_none() => {
                    return Err(ValidationError::new(
                        path("group_id"),
                        "required when runner_type is group_type",
                    ))
                }
                RunnerType::ProjectType if gl.project_id.is_none() => {
                    return Err(ValidationError::new(
                        path("project_id"),
                        "required when runner_type is project_type",
                    ))
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// The derived full name of a DUT, `<farm_name>-<base_name>-<n>`, where
    /// n = 1 + the number of DUTs with the same base name seen before it
    /// (earlier `first_seen`; on a tie, earlier in the file, so names are
    /// unique). Names shift when DUTs are removed, as in the reference.
    /// `None` for an unknown id.
    pub fn full_name(&self, id: &MacAddr, farm_name: &str) -> Option<String> {
        let (index, _, dut) = self.duts.get_full(id)?;
        let n = 1 + self
            .duts
            .values()
            .enumerate()
            .filter(|(i, other)| {
                other.base_name == dut.base_name
                    && (other.first_seen < dut.first_seen
                        || (other.first_seen == dut.first_seen && *i < index))
            })
            .count();
        Some(format!("{farm_name}-{}-{n}", dut.base_name))
    }

    /// Finds a DUT the way the REST API does: first by id (a MAC in any
    /// accepted form), then by full name.
    pub fn find_dut(&self, key: &str, farm_name: &str) -> Option<(&MacAddr, &Dut)> {
        if let Ok(mac) = key.parse::<MacAddr>() {
            if let Some(found) = self.duts.get_key_value(&mac) {
                return Some(found);
            }
        }
        self.duts
            .iter()
            .find(|(id, _)| self.full_name(id, farm_name).as_deref() == Some(key))
    }

    /// The DUT wired to `port` of PDU `pdu`, if any (the first in file order).
    pub fn dut_on_port(&self, pdu: &str, port: &PortId) -> Option<(&MacAddr, &Dut)> {
        self.duts
            .iter()
            .find(|(_, d)| d.pdu.as_deref() == Some(pdu) && d.pdu_port_id.as_ref() == Some(port))
    }

    /// Adds or overwrites the PDU `VPDU` (driver `vpdu`, `config.hostname`
    /// = `endpoint`), as `EXECUTOR_VPDU_ENDPOINT` asks. An existing entry
    /// keeps its position and its reserved ports.
    pub fn apply_vpdu_endpoint(&mut self, endpoint: &str) {
        let mut config = PduConfig::new();
        config.insert(
            "hostname".to_string(),
            serde_json::Value::String(endpoint.to_string()),
        );
        match self.pdus.get_mut(VPDU_NAME) {
            Some(pdu) => {
                pdu.driver = VPDU_DRIVER.to_string();
                pdu.config = config;
            }
            None => {
                self.pdus
                    .insert(VPDU_NAME.to_string(), Pdu::new(VPDU_DRIVER, config));
            }
        }
    }
}
