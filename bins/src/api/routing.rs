//! The route table of the REST API and the resolution of a request path to
//! an endpoint. One table drives the dispatch, the 404/405 answers and the
//! check of the OpenAPI document.

/// One route of the API, as documented in the OpenAPI document.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Route {
    /// HTTP method in upper case.
    pub method: &'static str,
    /// Canonical path template (`{id}` style parameters).
    pub path: &'static str,
}

const fn r(method: &'static str, path: &'static str) -> Route {
    Route { method, path }
}

/// Every canonical route the API serves. The deprecated
/// `/api/v1/machine...` aliases serve the same endpoints as their
/// `/api/v1/dut...` counterparts and are listed in [`ALIASES`].
pub const ROUTES: &[Route] = &[
    r("GET", "/api/v1/duts"),
    r("POST", "/api/v1/dut/"),
    r("PUT", "/api/v1/dut/"),
    r("GET", "/api/v1/dut/discover"),
    r("POST", "/api/v1/dut/discover"),
    r("DELETE", "/api/v1/dut/discover"),
    r("GET", "/api/v1/dut/{id}"),
    r("PATCH", "/api/v1/dut/{id}"),
    r("DELETE", "/api/v1/dut/{id}"),
    r("GET", "/api/v1/dut/{id}/quick_check"),
    r("POST", "/api/v1/dut/{id}/quick_check"),
    r("POST", "/api/v1/dut/{id}/cancel_job"),
    r("GET", "/api/v1/dut/{id}/training/loop/{n}"),
    r("GET", "/api/v1/duts/{id}/boot.ipxe"),
    r("GET", "/api/v1/pdus"),
    r("GET", "/api/v1/pdu/{name}"),
    r("GET", "/api/v1/pdu/{name}/port/{port_id}"),
    r("PATCH", "/api/v1/pdu/{name}/port/{port_id}"),
    r("GET", "/api/v1/full-state"),
    r("POST", "/api/v1/jobs"),
    r("GET", "/api/v1/artifacts"),
    r("GET", "/api/v1/openapi.json"),
    r("GET", "/boot/{id}/boot.ipxe"),
];

/// Deprecated path prefixes and the canonical prefix they stand for.
pub const ALIASES: &[(&str, &str)] = &[
    ("/api/v1/machines", "/api/v1/duts"),
    ("/api/v1/machine", "/api/v1/dut"),
];

/// An endpoint a request path resolved to, with its decoded parameters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// `/api/v1/duts`
    Duts,
    /// `/api/v1/dut/` (registration)
    DutRegister,
    /// `/api/v1/dut/discover`
    Discover,
    /// `/api/v1/dut/{id}`
    Dut(String),
    /// `/api/v1/dut/{id}/quick_check`
    QuickCheck(String),
    /// `/api/v1/dut/{id}/cancel_job`
    CancelJob(String),
    /// `/api/v1/dut/{id}/training/loop/{n}` (`n` a non-negative integer)
    TrainingLoop(String, usize),
    /// `/api/v1/duts/{id}/boot.ipxe` and `/boot/{id}/boot.ipxe`
    BootIpxe(String),
    /// `/api/v1/pdus`
    Pdus,
    /// `/api/v1/pdu/{name}`
    Pdu(String),
    /// `/api/v1/pdu/{name}/port/{port_id}`
    Port(String, String),
    /// `/api/v1/full-state`
    FullState,
    /// `/api/v1/jobs`
    Jobs,
    /// `/api/v1/artifacts`
    Artifacts,
    /// `/api/v1/openapi.json`
    OpenApi,
}

impl Endpoint {
    /// The methods this endpoint answers.
    pub fn methods(&self) -> &'static [&'static str] {
        match self {
            Endpoint::Duts
            | Endpoint::BootIpxe(_)
            | Endpoint::Pdus
            | Endpoint::Pdu(_)
            | Endpoint::FullState
            | Endpoint::TrainingLoop(_, _)
            | Endpoint::Artifacts
            | Endpoint::OpenApi => &["GET"],
            Endpoint::DutRegister => &["POST", "PUT"],
            Endpoint::Discover => &["GET", "POST", "DELETE"],
            Endpoint::Dut(_) => &["GET", "PATCH", "DELETE"],
            Endpoint::QuickCheck(_) => &["GET", "POST"],
            Endpoint::CancelJob(_) | Endpoint::Jobs => &["POST"],
            Endpoint::Port(_, _) => &["GET", "PATCH"],
        }
    }
}

/// Decodes `%XX` escapes of one path segment. Returns `None` for an invalid
/// escape or a result that is not UTF-8.
pub fn percent_decode(seg: &str) -> Option<String> {
    if !seg.contains('%') {
        return Some(seg.to_owned());
    }
    percent_encoding::percent_decode_str(seg)
        .decode_utf8()
        .ok()
        .map(|c| c.into_owned())
}

/// Whether this path belongs to the API (the prefixes it owns).
pub fn is_api_path(path: &str) -> bool {
    path == "/api/v1" || path.starts_with("/api/v1/") || path.starts_with("/boot/")
}

/// Resolves a request path (without query) to an endpoint. A trailing slash
/// is accepted everywhere. `None` means no such route.
pub fn resolve(path: &str) -> Option<Endpoint> {
    let mut segs: Vec<&str> = path.split('/').skip(1).collect();
    if segs.len() > 1 && segs.last() == Some(&"") {
        segs.pop();
    }
    let dec = |s: &str| percent_decode(s);
    match segs.as_slice() {
        ["boot", id, "boot.ipxe"] => Some(Endpoint::BootIpxe(dec(id)?)),
        ["api", "v1", rest @ ..] => match rest {
            ["duts" | "machines"] => Some(Endpoint::Duts),
            ["duts" | "machines", id, "boot.ipxe"] => Some(Endpoint::BootIpxe(dec(id)?)),
            // `/api/v1/dut` and `/api/v1/dut/` are the registration endpoint.
            ["dut" | "machine"] => Some(Endpoint::DutRegister),
            ["dut" | "machine", "discover"] => Some(Endpoint::Discover),
            ["dut" | "machine", id] if !id.is_empty() => Some(Endpoint::Dut(dec(id)?)),
            ["dut" | "machine", id, "quick_check"] if !id.is_empty() => {
                Some(Endpoint::QuickCheck(dec(id)?))
            }
            ["dut" | "machine", id, "cancel_job"] if !id.is_empty() => {
                Some(Endpoint::CancelJob(dec(id)?))
            }
            ["dut" | "machine", id, "training", "loop", n] if !id.is_empty() => {
                Some(Endpoint::TrainingLoop(dec(id)?, n.parse().ok()?))
            }
            ["pdus"] => Some(Endpoint::Pdus),
            ["pdu", name] if !name.is_empty() => Some(Endpoint::Pdu(dec(name)?)),
            ["pdu", name, "port", port] if !name.is_empty() && !port.is_empty() => {
                Some(Endpoint::Port(dec(name)?, dec(port)?))
            }
            ["full-state"] => Some(Endpoint::FullState),
            ["jobs"] => Some(Endpoint::Jobs),
            ["artifacts"] => Some(Endpoint::Artifacts),
            ["openapi.json"] => Some(Endpoint::OpenApi),
            _ => None,
        },
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_canonical_and_alias_paths() {
        assert_eq!(resolve("/api/v1/duts"), Some(Endpoint::Duts));
        assert_eq!(resolve("/api/v1/machines"), Some(Endpoint::Duts));
        assert_eq!(resolve("/api/v1/dut/"), Some(Endpoint::DutRegister));
        assert_eq!(resolve("/api/v1/machine/"), Some(Endpoint::DutRegister));
        assert_eq!(
            resolve("/api/v1/dut/52:54:00:11:22:0a"),
            Some(Endpoint::Dut("52:54:00:11:22:0a".into()))
        );
        assert_eq!(
            resolve("/api/v1/machine/52%3A54%3A00%3A11%3A22%3A0a/"),
            Some(Endpoint::Dut("52:54:00:11:22:0a".into()))
        );
        assert_eq!(resolve("/api/v1/dut/discover"), Some(Endpoint::Discover));
        assert_eq!(
            resolve("/api/v1/pdu/VPDU/port/10"),
            Some(Endpoint::Port("VPDU".into(), "10".into()))
        );
        assert_eq!(
            resolve("/boot/x/boot.ipxe"),
            Some(Endpoint::BootIpxe("x".into()))
        );
        assert_eq!(
            resolve("/api/v1/duts/x/boot.ipxe"),
            Some(Endpoint::BootIpxe("x".into()))
        );
        assert_eq!(resolve("/api/v1/nope"), None);
        assert_eq!(resolve("/api/v1/dut/x/y"), None);
        assert_eq!(
            resolve("/api/v1/dut/x/training/loop/3"),
            Some(Endpoint::TrainingLoop("x".into(), 3))
        );
        assert_eq!(resolve("/api/v1/dut/x/training/loop/-1"), None);
        assert_eq!(resolve("/api/v1/dut/x/training/loop/a"), None);
        assert_eq!(resolve("/api/v1/dut/%ff"), None);
        assert_eq!(resolve("/elsewhere"), None);
    }

    #[test]
    fn every_route_template_resolves_to_an_endpoint_with_its_method() {
        for route in ROUTES {
            let path = route
                .path
                .replace("{id}", "some-id")
                .replace("{name}", "PDU")
                .replace("{port_id}", "3")
                .replace("{n}", "0");
            let ep = resolve(&path).unwrap_or_else(|| panic!("{} does not resolve", route.path));
            assert!(
                ep.methods().contains(&route.method),
                "{} {} resolves to {ep:?} which lacks the method",
                route.method,
                route.path
            );
        }
    }
}
