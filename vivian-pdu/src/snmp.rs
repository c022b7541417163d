//! SNMP PDUs: the generic `snmp` driver and its presets `apc_masterswitch`,
//! `cyberpower_pdu41004` and `cyberpower_pdu15swhviec12atnet`.
//!
//! Ports are discovered by walking the labels column: the i-th walked entry
//! (1-based) is port `"i"`, labelled with the walked value, and its status
//! and control OIDs end with the last component of the walked OID. A state
//! is read with a GET of `<status>.<index>` (an INTEGER mapped back to a
//! state) and written with a SET of `<control>.<index>` (INTEGER).
//!
//! Config keys (all drivers): `hostname` (required; `host` or `host:port`,
//! port 161 by default), `community` (default `private`), `version` (1, the
//! default, or 2 for v2c), `timeout` (seconds per request, default 1),
//! `state_transition_delay` (seconds waited after a write; 1 s, 5 s for
//! Cyberpower). The generic `snmp` driver also takes `outlet_labels`,
//! `outlet_status`, optional `outlet_ctrl`, `state_mapping: {on, off,
//! reboot}`, optional `inverse_state_mapping` and optional `system_id`
//! (every OID key is then relative to `1.3.6.1.4.1.<system_id>`).
//!
//! Transport: the `snmp2` crate's async client (v1 and v2c; the `snmp`
//! crate only speaks v2c). Every request has the configured timeout; after
//! any failure the UDP session is dropped and a new one is made, so a late
//! reply can never be taken for the answer to a later request.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use snmp2::{AsyncSession, Oid, Value};
use vivian_core::pdu::{PduDriver, PduError, PortInfo, PortState};

/// The most entries a labels walk reads (a bound against a looping agent).
const MAX_WALK: usize = 1024;
/// Status OIDs read per GET when polling.
const GET_CHUNK: usize = 16;

/// SNMP protocol version.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SnmpVersion {
    /// SNMPv1.
    V1,
    /// SNMPv2c.
    V2c,
}

/// The values written for each action.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WriteValues {
    /// Written to switch a port ON.
    pub on: i64,
    /// Written to switch a port OFF.
    pub off: i64,
    /// Written to power-cycle a port.
    pub reboot: i64,
}

/// A fully resolved SNMP PDU configuration.
#[derive(Clone, Debug, PartialEq)]
pub struct SnmpConfig {
    /// `host:port` of the agent.
    pub address: String,
    /// Community string.
    pub community: String,
    /// Protocol version.
    pub version: SnmpVersion,
    /// Timeout of each request.
    pub timeout: Duration,
    /// Column walked for the port labels.
    pub labels_oid: Vec<u64>,
    /// Column read for the port states.
    pub status_oid: Vec<u64>,
    /// Column written to change the port states.
    pub ctrl_oid: Vec<u64>,
    /// Values written.
    pub write: WriteValues,
    /// Values read back, and the state each means.
    pub read: BTreeMap<i64, PortState>,
    /// Wait after each write.
    pub state_transition_delay: Duration,
}

/// A preset: the OIDs and values of a known PDU model.
#[derive(Clone, Copy, Debug)]
pub struct SnmpModel {
    /// Registry name.
    pub name: &'static str,
    /// Labels column.
    pub labels: &'static str,
    /// Status column.
    pub status: &'static str,
    /// Control column (`None`: the status column).
    pub ctrl: Option<&'static str>,
    /// Values written for ON, OFF, REBOOT.
    pub write: WriteValues,
    /// Values read for ON, OFF, REBOOT.
    pub read: [i64; 3],
    /// State transition delay.
    pub delay: Duration,
}

/// APC MasterSwitch (PowerNet sPDUOutletCtl).
pub const APC_MASTERSWITCH: SnmpModel = SnmpModel {
    name: "apc_masterswitch",
    labels: "1.3.6.1.4.1.318.1.1.4.4.2.1.4",
    status: "1.3.6.1.4.1.318.1.1.4.4.2.1.3",
    ctrl: None,
    write: WriteValues {
        on: 1,
        off: 2,
        reboot: 3,
    },
    read: [1, 2, 3],
    delay: Duration::from_secs(1),
};

/// Cyberpower PDU41004.
pub const CYBERPOWER_PDU41004: SnmpModel = SnmpModel {
    name: "cyberpower_pdu41004",
    labels: "1.3.6.1.4.1.3808.1.1.3.3.3.1.1.2",
    status: "1.3.6.1.4.1.3808.1.1.3.3.3.1.1.4",
    ctrl: None,
    write: WriteValues {
        on: 1,
        off: 2,
        reboot: 3,
    },
    read: [1, 2, 3],
    delay: Duration::from_secs(5),
};

/// Cyberpower PDU15SWHVIEC12ATNET (RMCARD205): control values 2/3/4,
/// status values 1=ON, 2=OFF, 3=REBOOT.
pub const CYBERPOWER_PDU15SWHVIEC12ATNET: SnmpModel = SnmpModel {
    name: "cyberpower_pdu15swhviec12atnet",
    labels: "1.3.6.1.4.1.3808.1.1.5.6.3.1.2",
    status: "1.3.6.1.4.1.3808.1.1.5.6.3.1.3",
    ctrl: Some("1.3.6.1.4.1.3808.1.1.5.6.5.1.3"),
    write: WriteValues {
        on: 2,
        off: 3,
        reboot: 4,
    },
    read: [1, 2, 3],
    delay: Duration::from_secs(5),
};

/// The presets, by registry name.
pub const MODELS: [SnmpModel; 3] = [
    APC_MASTERSWITCH,
    CYBERPOWER_PDU41004,
    CYBERPOWER_PDU15SWHVIEC12ATNET,
];

/// The generic driver's registry name.
pub const GENERIC_NAME: &str = "snmp";

/// Parses a dotted OID (`1.3.6.1`, `.1.3.6.1`), naming `key` in errors.
pub fn parse_oid(key: &str, text: &str) -> Result<Vec<u64>, PduError> {
    let t = text.trim().trim_start_matches('.');
    let parts: Result<Vec<u64>, _> = t.split('.').map(str::parse::<u64>).collect();
    match parts {
        Ok(p) if !p.is_empty() => Ok(p),
        _ => Err(PduError::config(format!(
            "\"{key}\" must be a dotted OID such as 1.3.6.1.4.1, not \"{text}\""
        ))),
    }
}

fn oid_text(oid: &[u64]) -> String {
    oid.iter().map(u64::to_string).collect::<Vec<_>>().join(".")
}

fn value_text(v: &serde_json::Value) -> Option<String> {
    match v {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

fn get_str(config: &serde_json::Value, key: &str) -> Result<Option<String>, PduError> {
    match config.get(key) {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(v) => value_text(v)
            .map(Some)
            .ok_or_else(|| PduError::config(format!("\"{key}\" must be a string, not {v}"))),
    }
}

fn get_secs(config: &serde_json::Value, key: &str) -> Result<Option<Duration>, PduError> {
    match config.get(key) {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(v) => v
            .as_f64()
            .or_else(|| v.as_str().and_then(|s| s.trim().parse().ok()))
            .filter(|s| s.is_finite() && *s >= 0.0 && *s < 86_400.0)
            .map(|s| Some(Duration::from_secs_f64(s)))
            .ok_or_else(|| {
                PduError::config(format!("\"{key}\" must be a number of seconds, not {v}"))
            }),
    }
}

/// Connection settings common to every SNMP driver.
fn connection(
    config: &serde_json::Value,
) -> Result<(String, String, SnmpVersion, Duration), PduError> {
    if !config.is_object() {
        return Err(PduError::config(format!(
            "the config must be a map with at least \"hostname\", not {config}"
        )));
    }
    let hostname = get_str(config, "hostname")?
        .filter(|h| !h.trim().is_empty())
        .ok_or_else(|| PduError::config("SNMP PDUs require a \"hostname\" configuration key"))?;
    let address = with_default_port(hostname.trim(), 161);
    let community = get_str(config, "community")?.unwrap_or_else(|| "private".to_string());
    let version = match get_str(config, "version")?.as_deref().map(str::trim) {
        None | Some("1") => SnmpVersion::V1,
        Some("2") | Some("2c") | Some("2C") => SnmpVersion::V2c,
        Some("3") => {
            return Err(PduError::config(
                "\"version\": SNMP v3 is not supported (use 1 or 2)",
            ))
        }
        Some(v) => {
            return Err(PduError::config(format!(
                "\"version\" must be 1 or 2, not \"{v}\""
            )))
        }
    };
    let timeout = get_secs(config, "timeout")?.unwrap_or(Duration::from_secs(1));
    if timeout.is_zero() {
        return Err(PduError::config("\"timeout\" must be more than 0 seconds"));
    }
    Ok((address, community, version, timeout))
}

/// `host` → `host:port`; `host:port` and `[v6]:port` are kept.
fn with_default_port(host: &str, port: u16) -> String {
    if host.starts_with('[') {
        if host.contains("]:") {
            host.to_string()
        } else {
            format!("{host}:{port}")
        }
    } else if host.matches(':').count() == 1 {
        host.to_string()
    } else if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

impl SnmpConfig {
    /// The configuration of a preset model, with the connection keys of
    /// `config` (and an optional `state_transition_delay`).
    pub fn for_model(model: &SnmpModel, config: &serde_json::Value) -> Result<Self, PduError> {
        let (address, community, version, timeout) = connection(config)?;
        let labels_oid = parse_oid("labels", model.labels)?;
        let status_oid = parse_oid("status", model.status)?;
        let ctrl_oid = match model.ctrl {
            Some(c) => parse_oid("ctrl", c)?,
            None => status_oid.clone(),
        };
        let read = [PortState::On, PortState::Off, PortState::Reboot]
            .into_iter()
            .zip(model.read)
            .map(|(s, v)| (v, s))
            .collect();
        Ok(Self {
            address,
            community,
            version,
            timeout,
            labels_oid,
            status_oid,
            ctrl_oid,
            write: model.write,
            read,
            state_transition_delay: get_secs(config, "state_transition_delay")?
                .unwrap_or(model.delay),
        })
    }

    /// The configuration of the generic `snmp` driver.
    pub fn generic(config: &serde_json::Value) -> Result<Self, PduError> {
        let (address, community, version, timeout) = connection(config)?;
        let prefix = match config.get("system_id") {
            None | Some(serde_json::Value::Null) => None,
            Some(v) => {
                let t = value_text(v).ok_or_else(|| {
                    PduError::config(format!("\"system_id\" must be a number, not {v}"))
                })?;
                let mut p = vec![1, 3, 6, 1, 4, 1];
                p.extend(parse_oid("system_id", &t)?);
                Some(p)
            }
        };
        let oid = |key: &str| -> Result<Option<Vec<u64>>, PduError> {
            match get_str(config, key)? {
                None => Ok(None),
                Some(t) => {
                    let rel = parse_oid(key, &t)?;
                    Ok(Some(match &prefix {
                        Some(p) => p.iter().copied().chain(rel).collect(),
                        None => rel,
                    }))
                }
            }
        };
        let labels_oid = oid("outlet_labels")?
            .ok_or_else(|| PduError::config("the snmp driver requires an \"outlet_labels\" OID"))?;
        let status_oid = oid("outlet_status")?
            .ok_or_else(|| PduError::config("the snmp driver requires an \"outlet_status\" OID"))?;
        let ctrl_oid = oid("outlet_ctrl")?.unwrap_or_else(|| status_oid.clone());
        let mapping = state_mapping(config, "state_mapping")?.ok_or_else(|| {
            PduError::config(
                "the snmp driver requires a \"state_mapping\" with \"on\", \"off\" and \"reboot\"",
            )
        })?;
        let inverse = state_mapping(config, "inverse_state_mapping")?.unwrap_or(mapping);
        let read = [
            (inverse.on, PortState::On),
            (inverse.off, PortState::Off),
            (inverse.reboot, PortState::Reboot),
        ]
        .into_iter()
        .collect::<BTreeMap<_, _>>();
        if read.len() != 3 {
            return Err(PduError::config(
                "\"inverse_state_mapping\" (or \"state_mapping\") maps two states to the same value",
            ));
        }
        Ok(Self {
            address,
            community,
            version,
            timeout,
            labels_oid,
            status_oid,
            ctrl_oid,
            write: mapping,
            read,
            state_transition_delay: get_secs(config, "state_transition_delay")?
                .unwrap_or(Duration::from_secs(1)),
        })
    }
}

fn state_mapping(config: &serde_json::Value, key: &str) -> Result<Option<WriteValues>, PduError> {
    let map = match config.get(key) {
        None | Some(serde_json::Value::Null) => return Ok(None),
        Some(serde_json::Value::Object(m)) => m,
        Some(v) => {
            return Err(PduError::config(format!(
                "\"{key}\" must be a map {{on: int, off: int, reboot: int}}, not {v}"
            )))
        }
    };
    let mut values: HashMap<String, i64> = HashMap::new();
    for (k, v) in map {
        let name = k.to_ascii_lowercase();
        if name == "unknown" {
            continue;
        }
        if !matches!(name.as_str(), "on" | "off" | "reboot") {
            return Err(PduError::config(format!(
                "\"{key}\": unknown state \"{k}\" (expected on, off, reboot)"
            )));
        }
        let n = v
            .as_i64()
            .or_else(|| v.as_str().and_then(|s| s.trim().parse().ok()))
            .ok_or_else(|| {
                PduError::config(format!("\"{key}\".{k} must be an integer, not {v}"))
            })?;
        values.insert(name, n);
    }
    let get = |s: &str| {
        values
            .get(s)
            .copied()
            .ok_or_else(|| PduError::config(format!("\"{key}\" lacks a value for \"{s}\"")))
    };
    Ok(Some(WriteValues {
        on: get("on")?,
        off: get("off")?,
        reboot: get("reboot")?,
    }))
}

/// An owned SNMP value, as far as the drivers care.
#[derive(Clone, Debug, PartialEq)]
enum Val {
    Int(i64),
    Text(String),
    EndOfMib,
    NoSuch,
    Other(String),
}

impl Val {
    fn from_value(v: &Value<'_>) -> Self {
        match v {
            Value::Integer(n) => Val::Int(*n),
            Value::Unsigned32(n) | Value::Counter32(n) | Value::Timeticks(n) => {
                Val::Int(i64::from(*n))
            }
            Value::OctetString(s) => Val::Text(String::from_utf8_lossy(s).into_owned()),
            Value::EndOfMibView => Val::EndOfMib,
            Value::NoSuchObject | Value::NoSuchInstance => Val::NoSuch,
            other => Val::Other(format!("{other:?}")),
        }
    }
}

enum Req<'a> {
    Get(&'a [Vec<u64>]),
    GetNext(&'a [u64]),
    Set(&'a [u64], i64),
}

impl Req<'_> {
    fn describe(&self) -> String {
        match self {
            Req::Get(oids) if oids.len() == 1 => format!("SNMP GET {}", oid_text(&oids[0])),
            Req::Get(oids) => format!(
                "SNMP GET {} (+{} more)",
                oids.first().map(|o| oid_text(o)).unwrap_or_default(),
                oids.len().saturating_sub(1)
            ),
            Req::GetNext(oid) => format!("SNMP GETNEXT {}", oid_text(oid)),
            Req::Set(oid, v) => format!("SNMP SET {} = {v}", oid_text(oid)),
        }
    }
}

/// SNMPv1 error-status names (RFC 1157, RFC 3416).
fn error_status_name(status: u32) -> &'static str {
    match status {
        1 => "tooBig",
        2 => "noSuchName",
        3 => "badValue",
        4 => "readOnly",
        5 => "genErr",
        6 => "noAccess",
        7 => "wrongType",
        8 => "wrongLength",
        9 => "wrongEncoding",
        10 => "wrongValue",
        11 => "noCreation",
        12 => "inconsistentValue",
        13 => "resourceUnavailable",
        14 => "commitFailed",
        15 => "undoFailed",
        16 => "authorizationError",
        17 => "notWritable",
        18 => "inconsistentName",
        _ => "unknown error",
    }
}

fn to_oid(oid: &[u64]) -> Result<Oid<'static>, PduError> {
    Oid::from(oid).map_err(|e| PduError::Protocol(format!("invalid OID {}: {e:?}", oid_text(oid))))
}

/// An SNMP PDU.
pub struct SnmpDriver {
    name: &'static str,
    config: SnmpConfig,
    session: tokio::sync::Mutex<Option<AsyncSession>>,
    /// Port id → OID index, from the last labels walk.
    indexes: Mutex<HashMap<String, u64>>,
}

impl std::fmt::Debug for SnmpDriver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SnmpDriver")
            .field("name", &self.name)
            .field("config", &self.config)
            .finish()
    }
}

impl SnmpDriver {
    /// A driver for a resolved configuration; `name` is used in logs.
    pub fn new(name: &'static str, config: SnmpConfig) -> Self {
        Self {
            name,
            config,
            session: tokio::sync::Mutex::new(None),
            indexes: Mutex::new(HashMap::new()),
        }
    }

    /// The generic `snmp` driver from its MarsDB config.
    pub fn generic(config: &serde_json::Value) -> Result<Self, PduError> {
        Ok(Self::new(GENERIC_NAME, SnmpConfig::generic(config)?))
    }

    /// A preset model's driver from its MarsDB config.
    pub fn model(model: &SnmpModel, config: &serde_json::Value) -> Result<Self, PduError> {
        Ok(Self::new(model.name, SnmpConfig::for_model(model, config)?))
    }

    /// The resolved configuration.
    pub fn config(&self) -> &SnmpConfig {
        &self.config
    }

    async fn connect(&self) -> Result<AsyncSession, PduError> {
        let c = &self.config;
        let made = match c.version {
            SnmpVersion::V1 => AsyncSession::new_v1(&c.address, c.community.as_bytes(), 1).await,
            SnmpVersion::V2c => AsyncSession::new_v2c(&c.address, c.community.as_bytes(), 1).await,
        };
        made.map_err(|e| PduError::Transport(format!("cannot reach {}: {e}", c.address)))
    }

    async fn request(&self, req: Req<'_>) -> Result<Vec<(Vec<u64>, Val)>, PduError> {
        let mut guard = self.session.lock().await;
        let op = req.describe();
        let timeout = self.config.timeout;
        let result = tokio::time::timeout(timeout, async {
            if guard.is_none() {
                *guard = Some(self.connect().await?);
            }
            let session = guard.as_mut().expect("session just made");
            exchange(session, &req).await
        })
        .await;
        match result {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => {
                *guard = None;
                Err(match e {
                    PduError::Protocol(m) => {
                        PduError::Protocol(format!("{op} to {}: {m}", self.config.address))
                    }
                    PduError::Transport(m) => {
                        PduError::Transport(format!("{op} to {}: {m}", self.config.address))
                    }
                    e => e,
                })
            }
            Err(_) => {
                *guard = None;
                Err(PduError::Timeout {
                    operation: format!(
                        "{op} to {} (no answer: is the agent up and the community right?)",
                        self.config.address
                    ),
                    timeout,
                })
            }
        }
    }

    /// The OID index of a port: from the last walk, or (before any walk)
    /// the port id itself.
    fn index(&self, port_id: &str) -> Result<u64, PduError> {
        let indexes = self.indexes.lock().unwrap();
        let no_port = || PduError::Protocol(format!("no port \"{port_id}\""));
        if indexes.is_empty() {
            port_id.parse::<u64>().map_err(|_| no_port())
        } else {
            indexes.get(port_id).copied().ok_or_else(no_port)
        }
    }

    fn decode_state(&self, oid: &[u64], val: &Val) -> Result<PortState, PduError> {
        match val {
            Val::Int(n) => self.config.read.get(n).copied().ok_or_else(|| {
                PduError::Protocol(format!(
                    "{} reads {n}, which is no known state (expected {})",
                    oid_text(oid),
                    self.config
                        .read
                        .iter()
                        .map(|(v, s)| format!("{v}={s}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                ))
            }),
            Val::NoSuch | Val::EndOfMib => Err(PduError::Protocol(format!(
                "{} does not exist on the agent",
                oid_text(oid)
            ))),
            other => Err(PduError::Protocol(format!(
                "{} reads {other:?}, expected an INTEGER",
                oid_text(oid)
            ))),
        }
    }

    fn status_oid(&self, index: u64) -> Vec<u64> {
        let mut o = self.config.status_oid.clone();
        o.push(index);
        o
    }
}

async fn exchange(
    session: &mut AsyncSession,
    req: &Req<'_>,
) -> Result<Vec<(Vec<u64>, Val)>, PduError> {
    let map_err = |e: snmp2::Error| match e {
        snmp2::Error::Send | snmp2::Error::Receive => PduError::Transport(e.to_string()),
        e => PduError::Protocol(e.to_string()),
    };
    let pdu = match req {
        Req::Get(oids) => {
            let oids = oids
                .iter()
                .map(|o| to_oid(o))
                .collect::<Result<Vec<_>, _>>()?;
            let refs: Vec<&Oid<'_>> = oids.iter().collect();
            session.get_many(&refs).await.map_err(map_err)?
        }
        Req::GetNext(oid) => session.getnext(&to_oid(oid)?).await.map_err(map_err)?,
        Req::Set(oid, v) => session
            .set(&[(&to_oid(oid)?, Value::Integer(*v))])
            .await
            .map_err(map_err)?,
    };
    if pdu.error_status != 0 {
        return Err(PduError::Protocol(format!(
            "the agent answered error {} ({}) at varbind {}",
            pdu.error_status,
            error_status_name(pdu.error_status),
            pdu.error_index
        )));
    }
    Ok(pdu
        .varbinds
        .map(|(oid, v)| {
            let o = oid.iter().map(|i| i.collect()).unwrap_or_default();
            (o, Val::from_value(&v))
        })
        .collect())
}

#[async_trait]
impl PduDriver for SnmpDriver {
    async fn ports(&self) -> Result<Vec<PortInfo>, PduError> {
        let base = &self.config.labels_oid;
        let mut cursor = base.clone();
        let mut ports = Vec::new();
        let mut indexes = HashMap::new();
        for _ in 0..MAX_WALK {
            let answer = match self.request(Req::GetNext(&cursor)).await {
                Ok(a) => a,
                // SNMPv1 ends a walk at the end of the MIB with noSuchName.
                Err(PduError::Protocol(m))
                    if self.config.version == SnmpVersion::V1 && m.contains("noSuchName") =>
                {
                    break
                }
                Err(e) => return Err(e),
            };
            let Some((oid, val)) = answer.into_iter().next() else {
                return Err(PduError::Protocol(format!(
                    "empty answer to the walk of {}",
                    oid_text(base)
                )));
            };
            if val == Val::EndOfMib || oid.len() <= base.len() || !oid.starts_with(base) {
                break;
            }
            if oid <= cursor {
                return Err(PduError::Protocol(format!(
                    "the agent's walk of {} does not advance ({} after {})",
                    oid_text(base),
                    oid_text(&oid),
                    oid_text(&cursor)
                )));
            }
            let index = *oid.last().expect("longer than the base");
            let label = match &val {
                Val::Text(s) => s.clone(),
                Val::Int(n) => n.to_string(),
                other => format!("{other:?}"),
            };
            let id = (ports.len() + 1).to_string();
            indexes.insert(id.clone(), index);
            ports.push(PortInfo::new(id, Some(label)));
            cursor = oid;
        }
        *self.indexes.lock().unwrap() = indexes;
        tracing::debug!(driver = self.name, ports = ports.len(), "SNMP ports walked");
        Ok(ports)
    }

    async fn get_state(&self, port_id: &str) -> Result<PortState, PduError> {
        let oid = self.status_oid(self.index(port_id)?);
        let answer = self.request(Req::Get(std::slice::from_ref(&oid))).await?;
        let (_, val) = answer.first().ok_or_else(|| {
            PduError::Protocol(format!("no value in the answer for {}", oid_text(&oid)))
        })?;
        self.decode_state(&oid, val)
    }

    async fn get_states(&self, ports: &[PortInfo]) -> Result<Vec<PortState>, PduError> {
        let oids = ports
            .iter()
            .map(|p| Ok(self.status_oid(self.index(&p.id)?)))
            .collect::<Result<Vec<_>, PduError>>()?;
        let mut states = Vec::with_capacity(oids.len());
        for chunk in oids.chunks(GET_CHUNK) {
            let answer = self.request(Req::Get(chunk)).await?;
            if answer.len() != chunk.len() {
                return Err(PduError::Protocol(format!(
                    "asked {} values, got {}",
                    chunk.len(),
                    answer.len()
                )));
            }
            for (asked, (got, val)) in chunk.iter().zip(&answer) {
                if asked != got {
                    return Err(PduError::Protocol(format!(
                        "asked {}, got {}",
                        oid_text(asked),
                        oid_text(got)
                    )));
                }
                states.push(self.decode_state(asked, val)?);
            }
        }
        Ok(states)
    }

    async fn set_state(&self, port_id: &str, state: PortState) -> Result<(), PduError> {
        let value = match state {
            PortState::On => self.config.write.on,
            PortState::Off => self.config.write.off,
            PortState::Reboot => self.config.write.reboot,
            PortState::Unknown => {
                return Err(PduError::InvalidState("UNKNOWN cannot be written".into()))
            }
        };
        let mut oid = self.config.ctrl_oid.clone();
        oid.push(self.index(port_id)?);
        self.request(Req::Set(&oid, value)).await?;
        Ok(())
    }

    fn supports_reboot(&self) -> bool {
        true
    }

    fn state_transition_delay(&self) -> Duration {
        self.config.state_transition_delay
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn generic_config_with_system_id_and_inverse_mapping() {
        let c = SnmpConfig::generic(&json!({
            "hostname": "10.0.0.42", "community": "private", "system_id": 318,
            "outlet_labels": "1.1.4.4.2.1.4", "outlet_status": "1.1.4.4.2.1.3",
            "state_mapping": {"ON": 1, "off": 2, "reboot": 3, "unknown": 0},
            "inverse_state_mapping": {"on": 5, "off": 6, "reboot": 7},
        }))
        .unwrap();
        assert_eq!(c.address, "10.0.0.42:161");
        assert_eq!(
            c.labels_oid,
            parse_oid("x", "1.3.6.1.4.1.318.1.1.4.4.2.1.4").unwrap()
        );
        assert_eq!(c.ctrl_oid, c.status_oid);
        assert_eq!(
            c.write,
            WriteValues {
                on: 1,
                off: 2,
                reboot: 3
            }
        );
        assert_eq!(c.read.get(&6), Some(&PortState::Off));
        assert_eq!(c.version, SnmpVersion::V1);
        assert_eq!(c.timeout, Duration::from_secs(1));
    }

    #[test]
    fn config_errors_name_the_key() {
        let cases = [
            (json!({}), "hostname"),
            (json!({"hostname": "h", "version": 3}), "version"),
            (json!({"hostname": "h", "version": "x"}), "version"),
            (json!({"hostname": "h", "timeout": "soon"}), "timeout"),
        ];
        for (cfg, key) in cases {
            let e = SnmpConfig::for_model(&APC_MASTERSWITCH, &cfg)
                .unwrap_err()
                .to_string();
            assert!(e.contains(key), "{e} should name {key}");
        }
        let base = json!({"hostname": "h", "outlet_labels": "1.2", "outlet_status": "1.3"});
        let e = SnmpConfig::generic(&base).unwrap_err().to_string();
        assert!(e.contains("state_mapping"), "{e}");
        let mut bad = base.clone();
        bad["state_mapping"] = json!({"on": 1, "off": 2});
        let e = SnmpConfig::generic(&bad).unwrap_err().to_string();
        assert!(e.contains("reboot"), "{e}");
        bad["state_mapping"] = json!({"on": 1, "off": 2, "reboot": 2});
        assert!(SnmpConfig::generic(&bad).is_err());
        bad["outlet_status"] = json!("1.x.3");
        let e = SnmpConfig::generic(&bad).unwrap_err().to_string();
        assert!(e.contains("outlet_status"), "{e}");
    }

    #[test]
    fn hostnames_get_the_snmp_port() {
        assert_eq!(with_default_port("pdu.lan", 161), "pdu.lan:161");
        assert_eq!(with_default_port("127.0.0.1:1161", 161), "127.0.0.1:1161");
        assert_eq!(with_default_port("::1", 161), "[::1]:161");
        assert_eq!(with_default_port("[::1]:99", 161), "[::1]:99");
    }

    #[test]
    fn cyberpower_15sw_reads_and_writes_different_values() {
        let c = SnmpConfig::for_model(&CYBERPOWER_PDU15SWHVIEC12ATNET, &json!({"hostname": "h"}))
            .unwrap();
        assert_ne!(c.ctrl_oid, c.status_oid);
        assert_eq!(
            c.write,
            WriteValues {
                on: 2,
                off: 3,
                reboot: 4
            }
        );
        assert_eq!(c.read.get(&1), Some(&PortState::On));
        assert_eq!(c.read.get(&2), Some(&PortState::Off));
        assert_eq!(c.state_transition_delay, Duration::from_secs(5));
    }
}
