//! Rendered JSON of the read endpoints, cached per farm generation.
//!
//! A read serves bytes rendered once per change of the farm (MarsDB
//! snapshot, PDU snapshot or runtime record): `GET /duts`, `/dut/<id>`,
//! `/pdus`, `/pdu/<name>` are a lookup and an `Arc` clone; `full-state`
//! splices the cached objects with the discovery and the time.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};

use bytes::{BufMut, Bytes, BytesMut};
use vivian_core::farm::{Farm, FarmView};
use vivian_core::marsdb::MacAddr;

/// JSON renderings of one [`FarmView`].
pub(crate) struct Rendered {
    key: (u64, usize),
    /// The view itself (also keeps its database alive, see `key`).
    pub view: FarmView,
    /// `{"duts": {...}}`
    pub duts_body: Bytes,
    /// `{...}` (id → DUT object)
    pub duts_obj: Bytes,
    /// One DUT object by id.
    pub dut: HashMap<MacAddr, Bytes>,
    /// `{"pdus": {...}}`
    pub pdus_body: Bytes,
    /// `{...}` (name → PDU object)
    pub pdus_obj: Bytes,
    /// One PDU object by name.
    pub pdu: HashMap<String, Bytes>,
    /// The MarsDB error as a JSON value (`null` or a string).
    pub db_error: Bytes,
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

impl Rendered {
    fn build(view: FarmView, key: (u64, usize)) -> Rendered {
        let mut dut = HashMap::with_capacity(view.duts.len());
        let mut ids = Vec::with_capacity(view.duts.len());
        let mut total = 0;
        for (id, v) in &view.duts {
            let b = json_bytes(v);
            total += b.len() + 24;
            dut.insert(*id, b);
            ids.push((id.to_string(), *id));
        }
        let duts_obj = object(ids.iter().map(|(s, id)| (s.as_str(), &dut[id])), total);
        let mut pdu = HashMap::with_capacity(view.pdus.len());
        let mut total = 0;
        for (name, p) in &view.pdus {
            let b = json_bytes(p);
            total += b.len() + name.len() + 4;
            pdu.insert(name.clone(), b);
        }
        let pdus_obj = object(view.pdus.keys().map(|n| (n.as_str(), &pdu[n])), total);
        Rendered {
            key,
            duts_body: wrap("duts", &duts_obj),
            pdus_body: wrap("pdus", &pdus_obj),
            db_error: json_bytes(&view.db_error),
            view,
            duts_obj,
            dut,
            pdus_obj,
            pdu,
        }
    }

    /// The DUT object for an id or full name.
    pub fn find_dut(&self, key: &str) -> Option<&Bytes> {
        let v = self.view.find_dut(key)?;
        let id: MacAddr = v.id.parse().ok()?;
        self.dut.get(&id)
    }

    /// The `full-state` body: pdus, duts, discover, now, marsdb_error.
    pub fn full_state(&self, discover: &Bytes, now: &str) -> Bytes {
        let mut out = BytesMut::with_capacity(
            self.pdus_obj.len() + self.duts_obj.len() + discover.len() + self.db_error.len() + 96,
        );
        out.extend_from_slice(b"{\"pdus\":");
        out.extend_from_slice(&self.pdus_obj);
        out.extend_from_slice(b",\"duts\":");
        out.extend_from_slice(&self.duts_obj);
        out.extend_from_slice(b",\"discover\":");
        out.extend_from_slice(discover);
        out.extend_from_slice(b",\"now\":\"");
        out.extend_from_slice(now.as_bytes());
        out.extend_from_slice(b"\",\"marsdb_error\":");
        out.extend_from_slice(&self.db_error);
        out.put_u8(b'}');
        out.freeze()
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
    /// generation or the MarsDB snapshot changed since.
    pub fn get(&self, farm: &Farm) -> Arc<Rendered> {
        let key = (
            farm.generation(),
            Arc::as_ptr(&farm.db().snapshot()) as *const u8 as usize,
        );
        if let Some(r) = self.current.read().unwrap().as_ref() {
            if r.key == key {
                return r.clone();
            }
        }
        let _one_builder = self.rebuild.lock().unwrap();
        if let Some(r) = self.current.read().unwrap().as_ref() {
            if r.key == key {
                return r.clone();
            }
        }
        // The view reads the generation before anything else: if the farm
        // changes while it is built, the next read rebuilds.
        let view = farm.view();
        let key = (view.generation, Arc::as_ptr(&view.db) as *const u8 as usize);
        let r = Arc::new(Rendered::build(view, key));
        *self.current.write().unwrap() = Some(r.clone());
        r
    }
}
