//! Serde wire types mirroring the MarsDB YAML file exactly (V2024 shapes),
//! and their conversion from and to the validated domain types.
//!
//! Field order here is the key order of the written file (the schema order
//! of the reference). Unknown keys are rejected everywhere.

use std::fmt;
use std::hash::Hash;
use std::marker::PhantomData;
use std::net::Ipv4Addr;

use chrono::{DateTime, NaiveDate, NaiveDateTime, SubsecRound, Utc};
use indexmap::IndexMap;
use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::{Deserialize, Serialize};

use super::error::ValidationError;
use super::types::{
    Database, Dut, GitlabInstance, GitlabRunner, MacAddr, Pdu, PduConfig, PortId, RunnerType,
    DEFAULT_MAXIMUM_TIMEOUT, DEFAULT_PDU_OFF_DELAY, PLACEHOLDER_TOKEN,
};

/// The whole file.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[serde(rename = "MarsDb")]
pub(crate) struct WireDb {
    #[serde(default, deserialize_with = "unique_map")]
    pub pdus: IndexMap<String, WirePdu>,
    #[serde(default, deserialize_with = "unique_map")]
    pub duts: IndexMap<MacAddr, WireDut>,
    #[serde(default, deserialize_with = "unique_map")]
    pub gitlab: IndexMap<String, WireGitlab>,
}

/// `pdus.<name>`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[serde(rename = "Pdu")]
pub(crate) struct WirePdu {
    pub driver: String,
    pub config: PduConfig,
    #[serde(default, deserialize_with = "null_as_default")]
    pub reserved_port_ids: Vec<PortId>,
}

/// `duts.<id>`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[serde(rename = "Dut")]
pub(crate) struct WireDut {
    pub base_name: String,
    pub ip_address: Ipv4Addr,
    pub tags: Vec<String>,
    #[serde(default, deserialize_with = "null_as_default")]
    pub manual_tags: Vec<String>,
    #[serde(default)]
    pub local_tty_device: Option<String>,
    #[serde(default)]
    pub mac_address: Option<MacAddr>,
    #[serde(default, deserialize_with = "unique_map")]
    pub gitlab: IndexMap<String, WireRunner>,
    #[serde(default)]
    pub pdu: Option<String>,
    #[serde(default)]
    pub pdu_port_id: Option<PortId>,
    #[serde(default = "default_off_delay")]
    pub pdu_off_delay: f64,
    #[serde(default)]
    pub ready_for_service: bool,
    #[serde(default)]
    pub is_retired: bool,
    #[serde(default)]
    pub first_seen: Option<Timestamp>,
    #[serde(default)]
    pub comment: Option<String>,
}

/// A runner entry (`duts.<id>.gitlab.<instance>`, `gitlab.<n>.gateway_runner`).
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[serde(rename = "GitlabRunner")]
pub(crate) struct WireRunner {
    #[serde(default = "placeholder_token")]
    pub token: String,
    #[serde(default = "yes")]
    pub exposed: bool,
    #[serde(default = "minus_one")]
    pub runner_id: i64,
}

/// `gitlab.<name>`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[serde(rename = "GitlabInstance")]
pub(crate) struct WireGitlab {
    pub url: String,
    #[serde(default)]
    pub registration_token: Option<String>,
    #[serde(default)]
    pub runner_type: RunnerType,
    #[serde(default)]
    pub group_id: Option<u64>,
    #[serde(default)]
    pub project_id: Option<u64>,
    #[serde(default)]
    pub access_token: Option<String>,
    #[serde(default = "yes")]
    pub expose_runners: bool,
    #[serde(default = "default_max_timeout")]
    pub maximum_timeout: u64,
    #[serde(default)]
    pub gateway_runner: Option<WireRunner>,
}

fn default_off_delay() -> f64 {
    DEFAULT_PDU_OFF_DELAY
}
fn placeholder_token() -> String {
    PLACEHOLDER_TOKEN.to_string()
}
fn yes() -> bool {
    true
}
fn minus_one() -> i64 {
    -1
}
fn default_max_timeout() -> u64 {
    DEFAULT_MAXIMUM_TIMEOUT
}

/// A `first_seen` value: written like Python writes a datetime
/// (`2021-12-22 16:57:08.146275`, UTC); read from that form, with a `T`
/// separator, with an offset or `Z`, or as a bare date.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Timestamp(pub DateTime<Utc>);

impl Timestamp {
    pub(crate) fn parse(s: &str) -> Option<DateTime<Utc>> {
        let s = s.trim();
        if let Ok(dt) = DateTime::parse_from_rfc3339(s) {
            return Some(dt.with_timezone(&Utc));
        }
        for fmt in ["%Y-%m-%d %H:%M:%S%.f%:z", "%Y-%m-%d %H:%M:%S%.f%z"] {
            if let Ok(dt) = DateTime::parse_from_str(s, fmt) {
                return Some(dt.with_timezone(&Utc));
            }
        }
        let naive = s.strip_suffix('Z').unwrap_or(s);
        for fmt in ["%Y-%m-%d %H:%M:%S%.f", "%Y-%m-%dT%H:%M:%S%.f"] {
            if let Ok(dt) = NaiveDateTime::parse_from_str(naive, fmt) {
                return Some(dt.and_utc());
            }
        }
        if let Ok(d) = NaiveDate::parse_from_str(s, "%Y-%m-%d") {
            return d.and_hms_opt(0, 0, 0).map(|dt| dt.and_utc());
        }
        None
    }

    pub(crate) fn format(dt: &DateTime<Utc>) -> String {
        if dt.timestamp_subsec_micros() == 0 {
            dt.format("%Y-%m-%d %H:%M:%S").to_string()
        } else {
            dt.format("%Y-%m-%d %H:%M:%S%.6f").to_string()
        }
    }
}

impl Serialize for Timestamp {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&Timestamp::format(&self.0))
    }
}

impl<'de> Deserialize<'de> for Timestamp {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Timestamp;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a date and time (YYYY-MM-DD HH:MM:SS[.ffffff])")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Timestamp, E> {
                match Timestamp::parse(s) {
                    Some(dt) => Ok(Timestamp(dt.trunc_subsecs(6))),
                    None => Err(E::custom(format!(
                        "invalid date {s:?}: expected YYYY-MM-DD HH:MM:SS[.ffffff]"
                    ))),
                }
            }
        }
        d.deserialize_str(V)
    }
}

/// `null` reads as the default (an empty list or map).
fn null_as_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de> + Default,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

/// A map that refuses duplicate keys (after key normalisation, e.g. two
/// spellings of one MAC) and reads `null` as empty.
fn unique_map<'de, D, K, V>(d: D) -> Result<IndexMap<K, V>, D::Error>
where
    D: Deserializer<'de>,
    K: Deserialize<'de> + Eq + Hash + fmt::Display,
    V: Deserialize<'de>,
{
    struct Unique<K, V>(PhantomData<(K, V)>);
    impl<'de, K, V> Visitor<'de> for Unique<K, V>
    where
        K: Deserialize<'de> + Eq + Hash + fmt::Display,
        V: Deserialize<'de>,
    {
        type Value = IndexMap<K, V>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a map")
        }
        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(IndexMap::new())
        }
        fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(IndexMap::new())
        }
        fn visit_some<D2: Deserializer<'de>>(self, d: D2) -> Result<Self::Value, D2::Error> {
            d.deserialize_map(self)
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let mut out = IndexMap::new();
            while let Some(k) = map.next_key::<K>()? {
                if out.contains_key(&k) {
                    return Err(de::Error::custom(format!("duplicate key {k}")));
                }
                let v = map.next_value::<V>()?;
                out.insert(k, v);
            }
            Ok(out)
        }
    }
    d.deserialize_option(Unique(PhantomData))
}

impl WireRunner {
    fn into_domain(self) -> GitlabRunner {
        GitlabRunner {
            token: self.token,
            exposed: self.exposed,
            runner_id: self.runner_id,
        }
    }

    fn from_domain(r: &GitlabRunner) -> Self {
        WireRunner {
            token: r.token.clone(),
            exposed: r.exposed,
            runner_id: r.runner_id,
        }
    }
}

impl WireDb {
    /// Converts into the domain database, applying defaults. A DUT without
    /// `first_seen` keeps the one it had in `previous` (so a reload does not
    /// rename it), else gets `now`. Cross-entry checks are left to
    /// [`Database::validate`].
    pub(crate) fn into_domain(self, previous: Option<&Database>, now: DateTime<Utc>) -> Database {
        let pdus = self
            .pdus
            .into_iter()
            .map(|(name, p)| {
                (
                    name,
                    Pdu {
                        driver: p.driver,
                        config: p.config,
                        reserved_port_ids: p.reserved_port_ids.into_iter().collect(),
                    },
                )
            })
            .collect();
        let duts = self
            .duts
            .into_iter()
            .map(|(id, d)| {
                let first_seen = match d.first_seen {
                    Some(t) => t.0,
                    None => previous
                        .and_then(|p| p.duts.get(&id))
                        .map(|old| old.first_seen)
                        .unwrap_or(now),
                };
                let dut = Dut {
                    base_name: d.base_name,
                    ip_address: d.ip_address,
                    tags: d.tags,
                    manual_tags: d.manual_tags,
                    local_tty_device: d.local_tty_device,
                    mac_address: d.mac_address.unwrap_or(id),
                    gitlab: d
                        .gitlab
                        .into_iter()
                        .map(|(k, r)| (k, r.into_domain()))
                        .collect(),
                    pdu: d.pdu,
                    pdu_port_id: d.pdu_port_id,
                    pdu_off_delay: d.pdu_off_delay,
                    ready_for_service: d.ready_for_service,
                    is_retired: d.is_retired,
                    first_seen,
                    comment: d.comment,
                };
                (id, dut)
            })
            .collect();
        let gitlab = self
            .gitlab
            .into_iter()
            .map(|(name, g)| {
                (
                    name,
                    GitlabInstance {
                        url: g.url,
                        registration_token: g.registration_token,
                        runner_type: g.runner_type,
                        group_id: g.group_id,
                        project_id: g.project_id,
                        access_token: g.access_token,
                        expose_runners: g.expose_runners,
                        maximum_timeout: g.maximum_timeout,
                        gateway_runner: g.gateway_runner.map(WireRunner::into_domain),
                    },
                )
            })
            .collect();
        Database { pdus, duts, gitlab }
    }

    /// The wire form of a domain database (every field written, as the
    /// reference does).
    pub(crate) fn from_domain(db: &Database) -> Self {
        WireDb {
            pdus: db
                .pdus
                .iter()
                .map(|(name, p)| {
                    (
                        name.clone(),
                        WirePdu {
                            driver: p.driver.clone(),
                            config: p.config.clone(),
                            reserved_port_ids: p.reserved_port_ids.iter().cloned().collect(),
                        },
                    )
                })
                .collect(),
            duts: db
                .duts
                .iter()
                .map(|(id, d)| {
                    (
                        *id,
                        WireDut {
                            base_name: d.base_name.clone(),
                            ip_address: d.ip_address,
                            tags: d.tags.clone(),
                            manual_tags: d.manual_tags.clone(),
                            local_tty_device: d.local_tty_device.clone(),
                            mac_address: Some(d.mac_address),
                            gitlab: d
                                .gitlab
                                .iter()
                                .map(|(k, r)| (k.clone(), WireRunner::from_domain(r)))
                                .collect(),
                            pdu: d.pdu.clone(),
                            pdu_port_id: d.pdu_port_id.clone(),
                            pdu_off_delay: d.pdu_off_delay,
                            ready_for_service: d.ready_for_service,
                            is_retired: d.is_retired,
                            first_seen: Some(Timestamp(d.first_seen)),
                            comment: d.comment.clone(),
                        },
                    )
                })
                .collect(),
            gitlab: db
                .gitlab
                .iter()
                .map(|(name, g)| {
                    (
                        name.clone(),
                        WireGitlab {
                            url: g.url.clone(),
                            registration_token: g.registration_token.clone(),
                            runner_type: g.runner_type,
                            group_id: g.group_id,
                            project_id: g.project_id,
                            access_token: g.access_token.clone(),
                            expose_runners: g.expose_runners,
                            maximum_timeout: g.maximum_timeout,
                            gateway_runner: g.gateway_runner.as_ref().map(WireRunner::from_domain),
                        },
                    )
                })
                .collect(),
        }
    }
}

/// Turns a serde_yaml error into a [`ValidationError`] (location, and the
/// field path when serde_yaml gave one).
pub(crate) fn yaml_error(e: &serde_yaml::Error) -> ValidationError {
    let mut msg = e.to_string();
    let loc = e.location();
    if let Some(l) = &loc {
        let suffix = format!(" at line {} column {}", l.line(), l.column());
        if let Some(stripped) = msg.strip_suffix(&suffix) {
            msg = stripped.to_string();
        }
    }
    let mut path = String::new();
    for top in ["pdus", "duts", "gitlab"] {
        if msg.starts_with(top) && matches!(msg.as_bytes().get(top.len()), Some(b'.') | Some(b':'))
        {
            if let Some(i) = msg.find(": ") {
                path = msg[..i].to_string();
                msg = msg[i + 2..].to_string();
            }
            break;
        }
    }
    let mut err = ValidationError::new(path, msg);
    if let Some(l) = loc {
        err = err.at(l.line(), l.column());
    }
    err
}
