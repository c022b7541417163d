//! The `deployment` section (EX B.5): what the DUT boots first (`start`)
//! and on every later boot (`continue`, deep-merged over `start`).

use std::collections::BTreeMap;
use std::fmt;

use serde::Deserialize;
use serde_yaml::Value;

use super::JobError;

/// The category of plain (string or list) command line items.
pub const UNCATEGORISED: &str = ":uncategorised";

/// A kernel command line: named categories plus uncategorised items.
///
/// It is written as a string, a list of strings (joined by spaces) or a map
/// `{<category>: str|[str], ":uncategorised": [...]}`. It renders as the
/// categories sorted by name, then the uncategorised items.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Cmdline {
    /// Items by category name (names never start with `:`).
    pub categories: BTreeMap<String, Vec<String>>,
    /// Items given without a category.
    pub uncategorised: Vec<String>,
}

impl Cmdline {
    /// The command line as the kernel gets it.
    pub fn render(&self) -> String {
        self.categories
            .values()
            .flatten()
            .chain(self.uncategorised.iter())
            .filter(|s| !s.is_empty())
            .cloned()
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// Merges `other` (a `continue` command line) over `self`: its
    /// categories replace same-named ones, its uncategorised items replace
    /// ours only if it has any.
    pub fn merge(&mut self, other: &Cmdline) {
        for (k, v) in &other.categories {
            self.categories.insert(k.clone(), v.clone());
        }
        if !other.uncategorised.is_empty() {
            self.uncategorised = other.uncategorised.clone();
        }
    }

    fn items(value: &Value, path: &str) -> Result<Vec<String>, JobError> {
        match value {
            Value::Null => Ok(Vec::new()),
            Value::Sequence(seq) => seq
                .iter()
                .enumerate()
                .map(|(i, v)| {
                    scalar_string(v).ok_or_else(|| JobError::Invalid {
                        path: format!("{path}[{i}]"),
                        message: "expected a string".into(),
                    })
                })
                .collect(),
            v => scalar_string(v)
                .map(|s| vec![s])
                .ok_or_else(|| JobError::Invalid {
                    path: path.to_string(),
                    message: "expected a string or a list of strings".into(),
                }),
        }
    }

    /// Parses the YAML forms of a command line; `path` names it in errors.
    pub fn from_yaml(value: &Value, path: &str) -> Result<Cmdline, JobError> {
        match value {
            Value::Mapping(map) => {
                let mut out = Cmdline::default();
                for (k, v) in map {
                    let Some(name) = k.as_str() else {
                        return Err(JobError::Invalid {
                            path: path.to_string(),
                            message: format!("category names must be strings, got {k:?}"),
                        });
                    };
                    let sub = format!("{path}.{name}");
                    let items = Self::items(v, &sub)?;
                    if name == UNCATEGORISED {
                        out.uncategorised = items;
                    } else if name.starts_with(':') {
                        return Err(JobError::Invalid {
                            path: sub,
                            message: format!(
                                "command line category names cannot start with ':' (got '{name}')"
                            ),
                        });
                    } else {
                        out.categories.insert(name.to_string(), items);
                    }
                }
                Ok(out)
            }
            other => Ok(Cmdline {
                categories: BTreeMap::new(),
                uncategorised: Self::items(other, path)?,
            }),
        }
    }
}

impl fmt::Display for Cmdline {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.render())
    }
}

fn scalar_string(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(if *b { "True" } else { "False" }.to_string()),
        _ => None,
    }
}

/// A downloadable boot artifact.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Artifact {
    /// Its http(s) URL.
    pub url: String,
}

/// The kernel to boot.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Kernel {
    /// The kernel's URL.
    pub url: Option<String>,
    /// Its command line.
    pub cmdline: Option<Cmdline>,
}

/// A file served to the DUT by the per-job HTTP server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpStorageItem {
    /// Absolute path.
    pub path: String,
    /// Contents.
    pub data: String,
}

/// Fastboot boot-image parameters (kept as given; only used by fastboot DUTs).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(missing_docs)]
pub struct Fastboot {
    pub header_version: Option<u64>,
    pub base: Option<u64>,
    pub kernel_offset: Option<u64>,
    pub ramdisk_offset: Option<u64>,
    pub dtb_offset: Option<u64>,
    pub tags_offset: Option<u64>,
    pub board: Option<String>,
    pub pagesize: Option<u64>,
}

impl Fastboot {
    fn merge(&mut self, o: &Fastboot) {
        macro_rules! m {
            ($($f:ident),*) => { $( if o.$f.is_some() { self.$f = o.$f.clone(); } )* };
        }
        m!(
            header_version,
            base,
            kernel_offset,
            ramdisk_offset,
            dtb_offset,
            tags_offset,
            board,
            pagesize
        );
    }
}

/// What the DUT boots on one boot.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeploymentState {
    /// The kernel and its command line.
    pub kernel: Kernel,
    /// Initramfs artifacts, concatenated in order.
    pub initramfs: Vec<Artifact>,
    /// Device trees.
    pub dtb: Vec<Artifact>,
    /// Files served over the per-job HTTP server.
    pub storage_http: Vec<HttpStorageItem>,
    /// Fastboot parameters.
    pub fastboot: Option<Fastboot>,
}

impl DeploymentState {
    /// The rendered kernel command line, if any.
    pub fn cmdline(&self) -> Option<String> {
        self.kernel.cmdline.as_ref().map(Cmdline::render)
    }
}

/// The validated `deployment` section.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Deployment {
    /// The first boot.
    pub start: DeploymentState,
    /// Every later boot: `start` deep-merged with the `continue` fields.
    pub continue_: DeploymentState,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ArtifactWire {
    url: String,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct KernelWire {
    url: Option<String>,
    cmdline: Option<Value>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct HttpItemWire {
    path: String,
    data: String,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct StorageWire {
    http: Option<Vec<HttpItemWire>>,
}

/// One artifact or a list of them.
#[derive(Debug, Clone)]
pub(crate) enum OneOrMany {
    One(ArtifactWire),
    Many(Vec<ArtifactWire>),
}

impl<'de> Deserialize<'de> for OneOrMany {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        let v = Value::deserialize(d)?;
        match v {
            Value::Sequence(_) => serde_yaml::from_value(v).map(OneOrMany::Many),
            Value::Mapping(_) => serde_yaml::from_value(v).map(OneOrMany::One),
            _ => {
                return Err(D::Error::custom(
                    "expected an artifact {url: ...} or a list of artifacts",
                ))
            }
        }
        .map_err(D::Error::custom)
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct StateWire {
    kernel: Option<KernelWire>,
    initramfs: Option<OneOrMany>,
    dtb: Option<OneOrMany>,
    storage: Option<StorageWire>,
    fastboot: Option<Fastboot>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct DeploymentWire {
    start: StateWire,
    #[serde(rename = "continue")]
    continue_: Option<StateWire>,
}

fn check_url(url: &str, path: &str) -> Result<String, JobError> {
    let url = url.trim();
    let rest = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"))
        .ok_or_else(|| JobError::Invalid {
            path: path.to_string(),
            message: format!("unsupported URL '{url}': only http:// and https:// URLs are allowed"),
        })?;
    let host = rest.split(['/', '?', '#']).next().unwrap_or("");
    if host.is_empty() || url.chars().any(char::is_whitespace) {
        return Err(JobError::Invalid {
            path: path.to_string(),
            message: format!("the URL '{url}' is malformed"),
        });
    }
    Ok(url.to_string())
}

fn artifacts(w: &OneOrMany, path: &str) -> Result<Vec<Artifact>, JobError> {
    let list: Vec<&ArtifactWire> = match w {
        OneOrMany::One(a) => vec![a],
        OneOrMany::Many(v) => v.iter().collect(),
    };
    list.iter()
        .enumerate()
        .map(|(i, a)| {
            let p = match w {
                OneOrMany::One(_) => format!("{path}.url"),
                OneOrMany::Many(_) => format!("{path}[{i}].url"),
            };
            Ok(Artifact {
                url: check_url(&a.url, &p)?,
            })
        })
        .collect()
}

impl StateWire {
    /// Applies this (partial) state over `base`; `path` names it in errors.
    fn apply(&self, base: &mut DeploymentState, path: &str) -> Result<(), JobError> {
        if let Some(k) = &self.kernel {
            if let Some(url) = &k.url {
                base.kernel.url = Some(check_url(url, &format!("{path}.kernel.url"))?);
            }
            if let Some(c) = &k.cmdline {
                let c = Cmdline::from_yaml(c, &format!("{path}.kernel.cmdline"))?;
                match &mut base.kernel.cmdline {
                    Some(old) => old.merge(&c),
                    None => base.kernel.cmdline = Some(c),
                }
            }
        }
        if let Some(i) = &self.initramfs {
            base.initramfs = artifacts(i, &format!("{path}.initramfs"))?;
        }
        if let Some(d) = &self.dtb {
            base.dtb = artifacts(d, &format!("{path}.dtb"))?;
        }
        if let Some(items) = self.storage.as_ref().and_then(|s| s.http.as_ref()) {
            for (i, item) in items.iter().enumerate() {
                if !item.path.starts_with('/') {
                    return Err(JobError::Invalid {
                        path: format!("{path}.storage.http[{i}].path"),
                        message: format!("the path '{}' must be absolute", item.path),
                    });
                }
                let new = HttpStorageItem {
                    path: item.path.clone(),
                    data: item.data.clone(),
                };
                match base.storage_http.iter_mut().find(|x| x.path == item.path) {
                    Some(old) => *old = new,
                    None => base.storage_http.push(new),
                }
            }
        }
        if let Some(f) = &self.fastboot {
            base.fastboot.get_or_insert_with(Fastboot::default).merge(f);
        }
        Ok(())
    }
}

impl DeploymentWire {
    pub(crate) fn validate(&self) -> Result<Deployment, JobError> {
        let mut start = DeploymentState::default();
        self.start.apply(&mut start, "deployment.start")?;
        let mut continue_ = start.clone();
        if let Some(c) = &self.continue_ {
            c.apply(&mut continue_, "deployment.continue")?;
        }
        Ok(Deployment { start, continue_ })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cl(yaml: &str) -> Cmdline {
        Cmdline::from_yaml(&serde_yaml::from_str(yaml).unwrap(), "c").unwrap()
    }

    #[test]
    fn cmdline_forms() {
        assert_eq!(cl("a b").render(), "a b");
        assert_eq!(cl("[a, b]").render(), "a b");
        assert_eq!(
            cl("{z: [z1], a: a1, ':uncategorised': [u], n: null}").render(),
            "a1 z1 u"
        );
        assert!(
            Cmdline::from_yaml(&serde_yaml::from_str("{':bad': x}").unwrap(), "k.cmdline")
                .unwrap_err()
                .to_string()
                .contains("k.cmdline.:bad")
        );
    }

    #[test]
    fn cmdline_merge() {
        let mut s = cl("{defaults: [my, default cmdline]}");
        s.merge(&cl("my continue cmdline"));
        assert_eq!(s.render(), "my default cmdline my continue cmdline");
        let mut s = cl("{a: x, ':uncategorised': [u]}");
        s.merge(&cl("{a: y, b: z}"));
        assert_eq!(s.render(), "y z u");
        let mut s = cl("start");
        s.merge(&cl("continue"));
        assert_eq!(s.render(), "continue");
    }

    #[test]
    fn urls() {
        assert_eq!(check_url(" http://h/k ", "p").unwrap(), "http://h/k");
        assert!(check_url("ftp://h/k", "p")
            .unwrap_err()
            .to_string()
            .contains("only http"));
        assert!(check_url("http:///k", "p")
            .unwrap_err()
            .to_string()
            .contains("malformed"));
        assert!(check_url("/k", "p").is_err());
    }
}
