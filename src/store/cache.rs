//! A cache of current resource versions for reads by id (FHIR R4 http.html#read), used
//! with SQLite only, where one server process owns the database. With PostgreSQL several
//! processes write, so every read goes to the database.
//!
//! Coherence: the SQLite writer records each committed write here *after* COMMIT; a reader
//! that missed inserts what it read only if the cache holds nothing newer. So a reader can
//! never replace a newer version with an older one it read before a concurrent commit.
//! Memory is bounded by bytes per shard: a full shard is emptied (cheap, and rare).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use super::resource::Stored;

const SHARDS: usize = 16;

/// What the cache keeps per resource.
#[derive(Debug, Clone)]
pub struct Cached {
    pub version: i64,
    pub last_updated: i64,
    pub method: Arc<str>,
    /// `None`: deleted.
    pub body: Option<Arc<str>>,
}

#[derive(Default)]
struct Shard {
    map: HashMap<(String, String), Cached>,
    bytes: usize,
}

pub struct ResourceCache {
    shards: Vec<Mutex<Shard>>,
    max_shard_bytes: usize,
}

fn shard_of(ty: &str, id: &str) -> usize {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in ty.bytes().chain(id.bytes()) {
        h ^= b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    (h % SHARDS as u64) as usize
}

fn size(ty: &str, id: &str, c: &Cached) -> usize {
    ty.len() + id.len() + c.body.as_ref().map_or(0, |b| b.len()) + 96
}

impl ResourceCache {
    pub fn new(max_bytes: usize) -> Self {
        ResourceCache {
            shards: (0..SHARDS).map(|_| Mutex::new(Shard::default())).collect(),
            max_shard_bytes: (max_bytes / SHARDS).max(1),
        }
    }

    pub fn get(&self, ty: &str, id: &str) -> Option<Stored> {
        let shard = self.shards[shard_of(ty, id)].lock().ok()?;
        let c = shard.map.get(&(ty.to_string(), id.to_string()))?;
        Some(Stored {
            res_type: ty.to_string(),
            id: id.to_string(),
            version: c.version,
            last_updated: c.last_updated,
            method: c.method.to_string(),
            body: c.body.as_deref().map(str::to_string),
            seq: 0,
        })
    }

    /// Records a committed write (always wins).
    pub fn committed(&self, ty: &str, id: &str, c: Cached) {
        self.put(ty, id, c, true);
    }

    /// Records what a reader found, unless something newer is already known.
    pub fn observed(&self, s: &Stored) {
        let c = Cached {
            version: s.version,
            last_updated: s.last_updated,
            method: Arc::from(s.method.as_str()),
            body: s.body.as_deref().map(Arc::from),
        };
        self.put(&s.res_type, &s.id, c, false);
    }

    fn put(&self, ty: &str, id: &str, c: Cached, committed: bool) {
        let Ok(mut shard) = self.shards[shard_of(ty, id)].lock() else {
            return;
        };
        let key = (ty.to_string(), id.to_string());
        if let Some(old) = shard.map.get(&key) {
            if !committed && old.version >= c.version {
                return;
            }
            let old_size = size(ty, id, old);
            shard.bytes = shard.bytes.saturating_sub(old_size);
        }
        let add = size(ty, id, &c);
        if shard.bytes + add > self.max_shard_bytes {
            shard.map.clear();
            shard.bytes = 0;
            if add > self.max_shard_bytes {
                return;
            }
        }
        shard.bytes += add;
        shard.map.insert(key, c);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cached(v: i64) -> Cached {
        Cached {
            version: v,
            last_updated: v,
            method: Arc::from("PUT"),
            body: Some(Arc::from("{}")),
        }
    }

    #[test]
    fn readers_never_replace_newer_versions() {
        let c = ResourceCache::new(1 << 20);
        c.committed("Patient", "1", cached(2));
        let older = Stored {
            res_type: "Patient".into(),
            id: "1".into(),
            version: 1,
            last_updated: 1,
            method: "PUT".into(),
            body: Some("{}".into()),
            seq: 0,
        };
        c.observed(&older);
        assert_eq!(c.get("Patient", "1").map(|s| s.version), Some(2));
        c.committed(
            "Patient",
            "1",
            Cached {
                body: None,
                ..cached(3)
            },
        );
        assert!(c.get("Patient", "1").is_some_and(|s| s.body.is_none()));
    }

    #[test]
    fn memory_stays_bounded() {
        let c = ResourceCache::new(SHARDS * 1000);
        for i in 0..10_000 {
            c.committed("Basic", &i.to_string(), cached(1));
        }
        for s in &c.shards {
            assert!(s.lock().map(|s| s.bytes).unwrap_or(0) <= 1000);
        }
    }
}
