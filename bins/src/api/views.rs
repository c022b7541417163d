//! Rendered JSON of the read endpoints, cached per farm generation.
//!
//! A read serves bytes rendered once per change of the farm (MarsDB
//! snapshot, PDU snapshot or runtime record) or of a hook's answers
//! (runner states, console endpoints): `GET /duts`, `/dut/<id>`, `/pdus`,
//! `/pdu/<name>` are a lookup and an `Arc` clone; `full-state` sends the
//! cached objects and a small tail with the discovery and the time.
//!
//! A rebuild re-renders only what changed: a PDU polling its ports (every
//! second, the most frequent change) re-renders that PDU, and a DUT object
//! whose view and hooks did not change keeps its bytes.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};

use bytes::{BufMut, Bytes, BytesMut};
use vivian_core::farm::{DutView, Farm, FarmView, PduView};
use vivian_core::marsdb::MacAddr;

use super::hooks::{LogsSource, RunnerHook};

/// What a rendering depends on: it is served while all of these hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Key {
    generation: u64,
    /// Address of the MarsDB snapshot (kept alive by the view).
    db: usize,
    runners: u64,
    logs: u64,
}

/// The optional hooks that add members to the DUT objects.
#[derive(Clone, Copy)]
pub(crate) struct Hooks<'a> {
    pub runners: Option<&'a dyn RunnerHook>,
    pub logs: Option<&'a dyn LogsSource>,
}

impl Hooks<'_> {
    fn versions(&self) -> (u64, u64) {
        (
            self.runners.map_or(0, |h| h.version()),
            self.logs.map_or(0, |h| h.version()),
        )
    }
}

/// JSON renderings of one [`FarmView`].
pub(crate) struct Rendered {
    key: Key,
    /// The view itself (also keeps its database alive, see `key`).
    pub view: FarmView,
    /// `{"duts": {...}}`
    pub duts_body: Bytes,
    /// One DUT object by id.
    pub dut: HashMap<MacAddr, Bytes>,
    /// `{"pdus": {...}}`
    pub pdus_body: Bytes,
    /// One PDU object by name.
    pub pdu: HashMap<String, Bytes>,
    /// The MarsDB error as a JSON value (`null` or a string).
    pub db_error: Bytes,
    /// `{"pdus":{...},"duts":{...},"discover":` (the head of `full-state`).
    full_state_head: Bytes,
}

fn json_bytes<T: serde::Serialize + ?Sized>(v: &T) -> Bytes {
    Bytes::from(serde_json::to_vec(v).expect("views serialise"))
}

/// Writes `{"k1":v1,"k2":v2}` from already rendered values.
fn object<'a>(entries: impl Iterator<Item = (&'a str, &'a Bytes)>, cap: usize) -> Bytes {
    let mut out = BytesMut::with_capacity(cap + 2);
    out.put_u8(b'{');
    let mut first = true;
    for (k, v) in entries {
        if !first {
            out.put_u8(b',');
        }
        first = false;
        out.extend_from_slice(&serde_json::to_vec(k).expect("string keys"));
        out.put_u8(b':');
        out.extend_from_slice(v);
    }
    out.put_u8(b'}');
    out.freeze()
}

fn wrap(key: &str, obj: &Bytes) -> Bytes {
    let mut out = BytesMut::with_capacity(obj.len() + key.len() + 6);
    out.extend_from_slice(b"{\"");
    out.extend_from_slice(key.as_bytes());
    out.extend_from_slice(b"\":");
    out.extend_from_slice(obj);
    out.put_u8(b'}');
    out.freeze()
}

/// One DUT object: its view, plus the members the hooks add.
fn render_dut(id: &MacAddr, v: &DutView, hooks: Hooks<'_>) -> Bytes {
    let mut out = serde_json::to_vec(v).expect("views serialise");
    if hooks.runners.is_none() && hooks.logs.is_none() {
        return Bytes::from(out);
    }
    // `{...}` → `{...,"member":value}`
    out.pop();
    if let Some(h) = hooks.runners {
        out.extend_from_slice(b",\"gitlab_runners\":");
        serde_json::to_writer(&mut out, &h.dut_runners(id)).expect("JSON values serialise");
    }
    if let Some(ep) = hooks.logs.and_then(|h| h.logs_endpoint(id)) {
        out.extend_from_slice(b",\"logs_endpoint\":");
        serde_json::to_writer(&mut out, &ep).expect("endpoints serialise");
    }
    out.push(b'}');
    Bytes::from(out)
}

impl Rendered {
    /// Renders `view`, reusing the bytes of `previous` for every DUT and
    /// PDU that did not change (and whose hooks did not change).
    fn build(view: FarmView, key: Key, hooks: Hooks<'_>, previous: Option<&Rendered>) -> Rendered {
        let same_hooks =
            previous.is_some_and(|p| p.key.runners == key.runners && p.key.logs == key.logs);
        let reuse_dut = |id: &MacAddr, v: &DutView| -> Option<Bytes> {
            let p = previous.filter(|_| same_hooks)?;
            (p.view.duts.get(id)? == v).then(|| p.dut.get(id).cloned())?
        };
        let mut dut = HashMap::with_capacity(view.duts.len());
        let mut ids = Vec::with_capacity(view.duts.len());
        let mut total = 0;
        for (id, v) in &view.duts {
            let b = reuse_dut(id, v).unwrap_or_else(|| render_dut(id, v, hooks));
            total += b.len() + 24;
            dut.insert(*id, b);
            ids.push((id.to_string(), *id));
        }
        let duts_obj = object(ids.iter().map(|(s, id)| (s.as_str(), &dut[id])), total);
        let reuse_pdu = |name: &str, v: &PduView| -> Option<Bytes> {
            let p = previous?;
            (p.view.pdus.get(name)? == v).then(|| p.pdu.get(name).cloned())?
        };
        let mut pdu = HashMap::with_capacity(view.pdus.len());
        let mut total = 0;
        for (name, p) in &view.pdus {
            let b = reuse_pdu(name, p).unwrap_or_else(|| json_bytes(p));
            total += b.len() + name.len() + 4;
            pdu.insert(name.clone(), b);
        }
        let pdus_obj = object(view.pdus.keys().map(|n| (n.as_str(), &pdu[n])), total);
        let mut head = BytesMut::with_capacity(pdus_obj.len() + duts_obj.len() + 32);
        head.extend_from_slice(b"{\"pdus\":");
        head.extend_from_slice(&pdus_obj);
        head.extend_from_slice(b",\"duts\":");
        head.extend_from_slice(&duts_obj);
        head.extend_from_slice(b",\"discover\":");
        Rendered {
            key,
            duts_body: wrap("duts", &duts_obj),
            pdus_body: wrap("pdus", &pdus_obj),
            db_error: json_bytes(&view.db_error),
            full_state_head: head.freeze(),
            view,
            dut,
            pdu,
        }
    }

    /// The DUT object for an id or full name.
    pub fn find_dut(&self, key: &str) -> Option<&Bytes> {
        let v = self.view.find_dut(key)?;
        let id: MacAddr = v.id.parse().ok()?;
        self.dut.get(&id)
    }

    /// The `full-state` body, pdus, duts, discover, now, marsdb_error, as
    /// two pieces: the cached head (pdus, duts; shared, not copied) and
    /// the tail rendered for this request.
    pub fn full_state(&self, discover: &[u8], now: &str) -> (Bytes, Bytes) {
        let mut tail = BytesMut::with_capacity(discover.len() + self.db_error.len() + 64);
        tail.extend_from_slice(discover);
        tail.extend_from_slice(b",\"now\":\"");
        tail.extend_from_slice(now.as_bytes());
        tail.extend_from_slice(b"\",\"marsdb_error\":");
        tail.extend_from_slice(&self.db_error);
        tail.put_u8(b'}');
        (self.full_state_head.clone(), tail.freeze())
    }
}

/// The cache: the renderings of the latest generation seen.
pub(crate) struct ViewCache {
    current: RwLock<Option<Arc<Rendered>>>,
    rebuild: Mutex<()>,
}

impl ViewCache {
    pub fn new() -> Self {
        Self {
            current: RwLock::new(None),
            rebuild: Mutex::new(()),
        }
    }

    /// The renderings for the farm's current state: cached unless the
    /// generation, the MarsDB snapshot or a hook's version changed since.
    pub fn get(&self, farm: &Farm, hooks: Hooks<'_>) -> Arc<Rendered> {
        let (runners, logs) = hooks.versions();
        let key = Key {
            generation: farm.generation(),
            db: Arc::as_ptr(&farm.db().snapshot()) as *const u8 as usize,
            runners,
            logs,
        };
        let current = |me: &Self| -> Option<Arc<Rendered>> {
            let cur = me.current.read().unwrap_or_else(|e| e.into_inner());
            cur.as_ref().filter(|r| r.key == key).cloned()
        };
        if let Some(r) = current(self) {
            return r;
        }
        let _one_builder = self.rebuild.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(r) = current(self) {
            return r;
        }
        let previous = self
            .current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        // The versions and the view's generation are read before anything
        // else: if something changes while the rendering is built, the
        // next read rebuilds.
        let (runners, logs) = hooks.versions();
        let view = farm.view();
        let key = Key {
            generation: view.generation,
            db: Arc::as_ptr(&view.db) as *const u8 as usize,
            runners,
            logs,
        };
        let r = Arc::new(Rendered::build(view, key, hooks, previous.as_deref()));
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Some(r.clone());
        r
    }
}
