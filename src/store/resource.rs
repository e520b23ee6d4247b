//! Versioned resource rows and their search indexes (FHIR R4 http.html "versioning";
//! search.html parameter types). Every function here runs on a [`Db`] the caller owns,
//! inside or outside a transaction.

use std::sync::OnceLock;

use serde_json::Value;

use super::{Arg, Db, SqlBuilder, Ty, Val};
use crate::error::{FhirError, Result};
use crate::search::extract::{IndexEntry, IndexValue};
use crate::time::{Micros, format_instant};

/// The current row of a resource.
#[derive(Debug, Clone)]
pub struct Current {
    pub rid: i64,
    pub version: i64,
    pub last_updated: Micros,
    pub deleted: bool,
    pub seq: i64,
    pub idx_mask: i64,
}

/// One stored version. `body` is `None` for a delete tombstone.
#[derive(Debug, Clone)]
pub struct Stored {
    pub res_type: String,
    pub id: String,
    pub version: i64,
    pub last_updated: Micros,
    pub method: String,
    pub body: Option<String>,
    pub seq: i64,
}

/// A resource made ready for storage outside the write transaction: serialised with
/// placeholders for the server-owned `meta.versionId` and `meta.lastUpdated`, and with its
/// search index entries extracted. The single SQLite writer then only substitutes two
/// strings and runs SQL; the CPU work happens on the request's own task.
#[derive(Debug, Clone)]
pub struct Prepared {
    pub body: String,
    pub index: Vec<IndexEntry>,
}

struct Placeholders {
    version: String,
    updated: String,
}

/// Random per process, so no client-supplied text can ever equal them.
fn placeholders() -> &'static Placeholders {
    static P: OnceLock<Placeholders> = OnceLock::new();
    P.get_or_init(|| {
        let n = uuid::Uuid::new_v4().simple().to_string();
        Placeholders {
            version: format!("vid-{n}"),
            updated: format!("upd-{n}"),
        }
    })
}

/// Sets server-owned meta to placeholders, serialises, extracts index entries.
pub fn prepare(resource: &mut Value, index: Vec<IndexEntry>) -> Result<Prepared> {
    let p = placeholders();
    let obj = resource
        .as_object_mut()
        .ok_or_else(|| FhirError::invalid("a resource must be a JSON object"))?;
    let meta = obj
        .entry("meta")
        .or_insert_with(|| Value::Object(Default::default()));
    if !meta.is_object() {
        *meta = Value::Object(Default::default());
    }
    if let Some(meta) = meta.as_object_mut() {
        meta.insert("versionId".into(), Value::String(p.version.clone()));
        meta.insert("lastUpdated".into(), Value::String(p.updated.clone()));
    }
    let body = serde_json::to_string(resource).map_err(|e| FhirError::internal(e.to_string()))?;
    Ok(Prepared { body, index })
}

/// Fills the placeholders of a prepared body.
pub fn finish_body(body: &str, version: i64, last_updated: Micros) -> String {
    let p = placeholders();
    body.replacen(&p.version, &version.to_string(), 1).replacen(
        &p.updated,
        &format_instant(last_updated),
        1,
    )
}

/// The result of writing one version.
#[derive(Debug, Clone)]
pub struct Written {
    pub id: String,
    pub version: i64,
    pub last_updated: Micros,
    /// The stored JSON (meta filled), `None` for a delete.
    pub body: Option<String>,
    pub created: bool,
}

/// The SQLite writer's id allocator: it is the only writer of its database, so it hands out
/// `resource_version.seq` and `resource.rid` itself instead of asking for them row by row.
#[derive(Debug, Clone, Copy)]
pub struct IdAlloc {
    pub next_seq: i64,
    pub next_rid: i64,
}

/// PostgreSQL: `(seq, rid)` pairs a job took from the shared identity sequences in one
/// query, so that its rows can wait for one flush like SQLite's (ids from `RETURNING` cost
/// a round trip per row, and each flushed the index rows of the row before: six statements
/// per resource). A job takes a few first, then larger blocks; unused ids are gaps, as a
/// rolled-back insert leaves.
#[derive(Debug, Default)]
pub struct Reserved {
    ids: std::collections::VecDeque<(i64, i64)>,
    /// How many the next reservation takes.
    block: i64,
}

impl Reserved {
    /// The next reserved `(seq, rid)` whose `seq` follows `after`; older ones are dropped.
    fn take(&mut self, after: i64) -> Option<(i64, i64)> {
        while let Some((seq, rid)) = self.ids.pop_front() {
            if seq > after {
                return Some((seq, rid));
            }
        }
        None
    }
}

/// PostgreSQL: how a job holds the write gate, an advisory lock every job that locks keys
/// takes first. PostgreSQL keeps advisory locks in a shared table of
/// `max_locks_per_transaction` (64) x `max_connections` slots: a transaction of thousands
/// of entries, one lock per entry, ran out of it ("out of shared memory"). So a job with
/// more than [`KEY_LOCKS_PER_JOB`] keys takes the gate exclusively instead and no key
/// locks; every other job takes it shared, then its key locks. Any two jobs that write one
/// resource are still serialised; a large job waits for the writers in progress and holds
/// off new ones until it commits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Gate {
    #[default]
    None,
    Shared,
    Exclusive,
}

/// See [`Gate`].
pub const KEY_LOCKS_PER_JOB: usize = 64;

/// The gate's advisory lock key.
fn gate_key() -> i64 {
    lock_key(&["write gate"])
}

/// Where the SQLite writer's per-job savepoint stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Savepoint {
    /// Not managed: PostgreSQL, readers, and the first job of a SQLite writer's group
    /// (which is undone by rolling back the transaction).
    #[default]
    Off,
    /// A job runs; its savepoint opens with its first write.
    Wanted,
    /// The job has written inside `SAVEPOINT job`.
    Open,
    /// The job's only write is its final flush, without a savepoint.
    Unprotected,
}

/// Rows a SQLite job has written but not yet sent (see [`Db::flush`]).
#[derive(Debug, Default)]
pub struct Pending {
    /// The resources (type, id) these rows write.
    pub keys: std::collections::HashSet<(String, String)>,
    pub versions: Vec<Value>,
    pub inserts: Vec<Value>,
    pub updates: Vec<Value>,
    pub clears: [Vec<i64>; 7],
    /// Statements that go last in the flush (see [`Db::execute_final`]).
    pub tail: Vec<(String, Vec<Arg>)>,
}

impl Pending {
    pub fn touches(&self, ty: &str, id: &str) -> bool {
        !self.keys.is_empty() && self.keys.contains(&(ty.to_string(), id.to_string()))
    }

    pub fn is_empty(&self) -> bool {
        self.versions.is_empty()
            && self.inserts.is_empty()
            && self.updates.is_empty()
            && self.clears.iter().all(Vec::is_empty)
            && self.tail.is_empty()
    }
}

/// One version row to write: what both backends' write strategies take.
#[derive(Clone, Copy)]
struct NewVersion<'a> {
    ty: &'a str,
    id: &'a str,
    prior: Option<&'a Current>,
    version: i64,
    last_updated: Micros,
    method: &'a str,
    body: Option<&'a str>,
    deleted: i64,
    mask: i64,
}

/// A search-index row waiting for [`Db::flush`].
#[derive(Debug, Clone)]
pub struct PendingIndex {
    pub rid: i64,
    pub res_type: String,
    pub entry: IndexEntry,
}

const CURRENT_COLS: [Ty; 6] = [Ty::Int, Ty::Int, Ty::Int, Ty::Int, Ty::Int, Ty::Int];

fn current_from(row: Vec<Val>) -> Current {
    Current {
        rid: row[0].int(),
        version: row[1].int(),
        last_updated: row[2].int(),
        deleted: row[3].int() != 0,
        seq: row[4].int(),
        idx_mask: row[5].int(),
    }
}

pub(crate) const INDEX_TABLES: [&str; 7] = [
    "idx_token",
    "idx_string",
    "idx_reference",
    "idx_date",
    "idx_number",
    "idx_quantity",
    "idx_uri",
];

fn kind_bit(v: &IndexValue) -> usize {
    match v {
        IndexValue::Token { .. } => 0,
        IndexValue::String { .. } => 1,
        IndexValue::Reference { .. } => 2,
        IndexValue::Date { .. } => 3,
        IndexValue::Number { .. } => 4,
        IndexValue::Quantity { .. } => 5,
        IndexValue::Uri(_) => 6,
    }
}

/// An index table's name and its columns with their PostgreSQL types, by kind bit.
fn index_columns(bit: usize) -> (&'static str, &'static [(&'static str, &'static str)]) {
    match bit {
        0 => (
            "idx_token",
            &[
                ("rid", "bigint"),
                ("param", "bigint"),
                ("system", "text"),
                ("value", "text"),
                ("text", "text"),
            ],
        ),
        1 => (
            "idx_string",
            &[
                ("rid", "bigint"),
                ("param", "bigint"),
                ("norm", "text"),
                ("exact", "text"),
            ],
        ),
        2 => (
            "idx_reference",
            &[
                ("rid", "bigint"),
                ("param", "bigint"),
                ("target_type", "text"),
                ("target_id", "text"),
                ("url", "text"),
            ],
        ),
        3 => (
            "idx_date",
            &[
                ("rid", "bigint"),
                ("param", "bigint"),
                ("lo", "bigint"),
                ("hi", "bigint"),
            ],
        ),
        4 => (
            "idx_number",
            &[
                ("rid", "bigint"),
                ("param", "bigint"),
                ("value", "double precision"),
            ],
        ),
        5 => (
            "idx_quantity",
            &[
                ("rid", "bigint"),
                ("param", "bigint"),
                ("value", "double precision"),
                ("system", "text"),
                ("unit_code", "text"),
                ("unit", "text"),
            ],
        ),
        _ => (
            "idx_uri",
            &[("rid", "bigint"), ("param", "bigint"), ("value", "text")],
        ),
    }
}

/// PostgreSQL: `INSERT ... SELECT` over a JSON array of row arrays in argument `$1`.
fn bulk_insert_sql(bit: usize) -> String {
    let (table, cols) = index_columns(bit);
    let names: Vec<&str> = cols.iter().map(|c| c.0).collect();
    let values: Vec<String> = cols
        .iter()
        .enumerate()
        .map(|(i, (_, t))| format!("(e->>{i})::{t}"))
        .collect();
    format!(
        "INSERT INTO {table} ({}) SELECT {} FROM json_array_elements($1::json) AS e",
        names.join(", "),
        values.join(", ")
    )
}

/// SQLite: index rows are written by `INSERT OR FAIL ... VALUES` statements of these many
/// rows, largest first, with every value a bound argument. A statement without a function
/// call (`->>` on JSON rows) cannot abort halfway, so SQLite opens no statement journal for
/// it: the journal copied every B-tree page an `INSERT ... SELECT` touched, one 4 KiB page
/// per row in the large indexes (`OR FAIL` keeps `NOT NULL` from counting as an abort).
/// Fixed sizes keep the statement texts few, so each is prepared once per connection.
const SQLITE_INDEX_CHUNKS: [usize; 5] = [256, 64, 16, 4, 1];

/// The `INSERT OR FAIL ... VALUES` statements by kind bit, one per size of
/// [`SQLITE_INDEX_CHUNKS`] in its order: built once, not on each write.
static SQLITE_INDEX_INSERTS: std::sync::LazyLock<Vec<Vec<String>>> =
    std::sync::LazyLock::new(|| {
        (0..INDEX_TABLES.len())
            .map(|bit| {
                SQLITE_INDEX_CHUNKS
                    .iter()
                    .map(|&rows| sqlite_index_insert_sql(bit, rows))
                    .collect()
            })
            .collect()
    });

/// The `INSERT OR FAIL ... VALUES` of `rows` rows into the index table of kind `bit`.
fn sqlite_index_insert_sql(bit: usize, rows: usize) -> String {
    let (table, cols) = index_columns(bit);
    let names: Vec<&str> = cols.iter().map(|c| c.0).collect();
    let row = format!("({})", vec!["?"; cols.len()].join(", "));
    format!(
        "INSERT OR FAIL INTO {table} ({}) VALUES {}",
        names.join(", "),
        vec![row.as_str(); rows].join(", ")
    )
}

/// How SQLite bulk rows are read: `MATERIALIZED` because, read straight from `json_each`,
/// every `e.value->>N` has it re-serialise the whole row (a stored body included) for each
/// column; materialised, each row is produced once and its parse is reused by the columns
/// that follow. Followed by the JSON argument and `))`.
const MATERIALIZED: &str = "WITH e(v) AS MATERIALIZED (SELECT value FROM json_each(";

/// Shifts the `$N` placeholders of one statement by `offset`, to append it to a
/// multi-statement query whose earlier statements hold `offset` arguments. Our SQL has no
/// `$` inside literals.
fn renumber(sql: &str, offset: usize) -> String {
    let mut out = String::with_capacity(sql.len() + 8);
    let mut chars = sql.chars().peekable();
    while let Some(c) = chars.next() {
        out.push(c);
        if c != '$' {
            continue;
        }
        let mut n = String::new();
        while let Some(d) = chars.peek().filter(|d| d.is_ascii_digit()) {
            n.push(*d);
            chars.next();
        }
        match n.parse::<usize>() {
            Ok(k) => out.push_str(&(k + offset).to_string()),
            Err(_) => out.push_str(&n),
        }
    }
    out
}

/// FNV-1a, 64 bits: stable across builds and platforms (unlike `std`'s hashers).
fn fnv1a(bytes: impl Iterator<Item = u8>) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// A stable 63-bit hash (FNV-1a) for PostgreSQL advisory locks.
pub fn lock_key(parts: &[&str]) -> i64 {
    let h = fnv1a(
        parts
            .iter()
            .flat_map(|p| p.bytes().chain(std::iter::once(0))),
    );
    (h >> 1) as i64
}

/// Bits of [`param_key`] that hold the resource type.
const TYPE_BITS: u32 = 15;

/// The `param` column of the index tables: search parameter (or derived) `code` of resource
/// type `ty` as one integer, so index keys compare one integer instead of two strings and
/// the indexes do not repeat both as text in every entry. The high 48 bits hash the code,
/// the low 15 the type (no two R4 resource types share them; a test checks), so the rows of
/// one code over every type form one range ([`param_range`]). Stored in every index row:
/// changing this function needs a migration that rebuilds the indexes.
pub fn param_key(ty: &str, code: &str) -> i64 {
    let (lo, _) = param_range(code);
    lo | (fnv1a(ty.bytes()) & ((1 << TYPE_BITS) - 1)) as i64
}

/// The inclusive range of [`param_key`] values of `code` over every resource type.
pub fn param_range(code: &str) -> (i64, i64) {
    let lo = ((fnv1a(code.bytes()) >> 16) << TYPE_BITS) as i64;
    (lo, lo | ((1 << TYPE_BITS) - 1))
}

/// One resource to index again (`iomt-fhir reindex`, `$reindex`).
#[derive(Debug, Clone)]
pub struct Reindexed {
    pub rid: i64,
    /// The version the entries were extracted from; a resource written since keeps the
    /// index its own write gave it.
    pub version: i64,
    pub res_type: String,
    pub index: Vec<IndexEntry>,
}

impl Db {
    /// Replaces the search index rows of resources whose current version is still the one
    /// given; returns how many were replaced. The job commits them like any write.
    pub async fn replace_indexes(&mut self, items: Vec<Reindexed>) -> Result<usize> {
        if items.is_empty() {
            return Ok(0);
        }
        let mut b =
            SqlBuilder::new("SELECT rid, version FROM resource WHERE deleted = 0 AND rid IN ");
        b.list(items.iter().map(|it| it.rid));
        let current: std::collections::HashMap<i64, i64> = self
            .fetch_all(&b.sql, &b.args, &[Ty::Int, Ty::Int])
            .await?
            .into_iter()
            .filter_map(|r| Some((r.first()?.int(), r.get(1)?.int())))
            .collect();
        let kept: Vec<Reindexed> = items
            .into_iter()
            .filter(|it| current.get(&it.rid) == Some(&it.version))
            .collect();
        if kept.is_empty() {
            return Ok(0);
        }
        let in_list = |sql: &str| {
            let mut b = SqlBuilder::new(sql);
            b.push(" WHERE rid IN ").list(kept.iter().map(|it| it.rid));
            b
        };
        for table in INDEX_TABLES {
            let b = in_list(&format!("DELETE FROM {table}"));
            self.execute(&b.sql, &b.args).await?;
        }
        // Every table may now hold rows: a later write clears them all.
        let b = in_list("UPDATE resource SET idx_mask = 127");
        self.execute(&b.sql, &b.args).await?;
        let n = kept.len();
        for it in kept {
            self.pending_index
                .extend(it.index.into_iter().map(|entry| PendingIndex {
                    rid: it.rid,
                    res_type: it.res_type.clone(),
                    entry,
                }));
        }
        Ok(n)
    }

    /// Reads the current rows and bodies of many resources in one query, so that the
    /// [`Db::current`], [`Db::current_for_update`] and [`Db::vread`] calls of a job's entries
    /// (a transaction Bundle, a device batch, an import chunk) cost no round trip each. On
    /// SQLite the single writer guarantees nothing else changes those rows before the job
    /// ends. On PostgreSQL the job first takes the advisory locks of all the keys (in one
    /// statement, in ascending key order) and reads the rows `FOR UPDATE`: the same locks
    /// [`Db::current_for_update`] takes one by one, taken at once.
    pub async fn prefetch(&mut self, keys: &[(String, String)]) -> Result<()> {
        let pg = self.is_postgres();
        if (!pg && self.alloc.is_none()) || keys.len() < 2 {
            return Ok(());
        }
        let wanted: Vec<&(String, String)> = keys
            .iter()
            .filter(|k| !self.prefetched.contains_key(*k) && !self.pending.touches(&k.0, &k.1))
            .collect();
        if wanted.is_empty() {
            return Ok(());
        }
        if pg {
            let mut locks: Vec<i64> = wanted.iter().map(|(t, i)| lock_key(&[t, i])).collect();
            locks.sort_unstable();
            locks.dedup();
            if locks.len() > KEY_LOCKS_PER_JOB {
                self.hold_write_gate().await?;
            }
            if self.gate != Gate::Exclusive {
                self.take_shared_gate().await?;
                self.execute(
                    "SELECT count(pg_advisory_xact_lock(k)) FROM (SELECT (e #>> '{}')::bigint AS k FROM json_array_elements($1::json) AS e ORDER BY 1) AS s",
                    &[Arg::Text(Value::from(locks).to_string())],
                )
                .await?;
            }
        }
        let rows = self.current_rows(&wanted, pg).await?;
        for (t, i) in wanted {
            self.prefetched.insert((t.clone(), i.clone()), None);
        }
        for (key, current, method, body) in rows {
            self.prefetched.insert(key, Some((current, method, body)));
        }
        Ok(())
    }

    /// The ids of the current resources matching `identifier=system|value`, for many
    /// (type, system, value) at once: what a conditional `Type?identifier=system|value`
    /// search finds, in one query instead of one per condition. At most `limit` per item.
    pub async fn ids_by_identifier(
        &mut self,
        items: &[(String, String, String)],
        limit: usize,
    ) -> Result<Vec<Vec<String>>> {
        let items: Vec<(String, String, String, String)> = items
            .iter()
            .map(|(t, s, v)| (t.clone(), "identifier".to_string(), s.clone(), v.clone()))
            .collect();
        self.ids_by_token(&items, limit).await
    }

    /// [`Db::ids_by_identifier`] for any token parameter: `(type, parameter, system, code)`.
    pub async fn ids_by_token(
        &mut self,
        items: &[(String, String, String, String)],
        limit: usize,
    ) -> Result<Vec<Vec<String>>> {
        let list = Value::Array(
            items
                .iter()
                .map(|(t, p, s, v)| {
                    Value::Array(vec![
                        param_key(t, p).into(),
                        s.as_str().into(),
                        v.as_str().into(),
                    ])
                })
                .collect(),
        );
        let sql = if self.is_postgres() {
            "SELECT e.ord::bigint - 1, r.res_id FROM json_array_elements($1::json) WITH ORDINALITY AS e(v, ord) JOIN idx_token t ON t.param = (e.v->>0)::bigint AND t.value = e.v->>2 AND t.system = e.v->>1 JOIN resource r ON r.rid = t.rid AND r.deleted = 0 ORDER BY 1, r.rid"
        } else {
            "SELECT e.key, r.res_id FROM json_each($1) AS e JOIN idx_token t ON t.param = e.value->>0 AND t.value = e.value->>2 AND t.system = e.value->>1 JOIN resource r ON r.rid = t.rid AND r.deleted = 0 ORDER BY 1, r.rid"
        };
        let rows = self
            .search_rows(sql, &[Arg::Text(list.to_string())], &[Ty::Int, Ty::Text])
            .await?;
        let mut out = vec![Vec::new(); items.len()];
        for row in rows {
            let mut it = row.into_iter();
            let (Some(k), Some(id)) = (it.next(), it.next().and_then(Val::text)) else {
                continue;
            };
            if let Some(ids) = usize::try_from(k.int()).ok().and_then(|k| out.get_mut(k))
                && ids.len() < limit
                && !ids.contains(&id)
            {
                ids.push(id);
            }
        }
        Ok(out)
    }

    /// The current rows and bodies of many resources, without locking (for readers: see
    /// [`Db::prefetch`] inside a write).
    pub async fn currents(
        &mut self,
        keys: &[(String, String)],
    ) -> Result<std::collections::HashMap<(String, String), (Current, Option<String>)>> {
        let keys: Vec<&(String, String)> = keys.iter().collect();
        Ok(self
            .current_rows(&keys, false)
            .await?
            .into_iter()
            .map(|(key, current, _, body)| (key, (current, body)))
            .collect())
    }

    /// The current rows and bodies of `(type, id)` keys, in one query; `lock`: `FOR UPDATE`
    /// (PostgreSQL only; SQLite has a single writer).
    #[allow(clippy::type_complexity)]
    async fn current_rows(
        &mut self,
        keys: &[&(String, String)],
        lock: bool,
    ) -> Result<Vec<((String, String), Current, String, Option<String>)>> {
        let list = Value::Array(
            keys.iter()
                .map(|(t, i)| Value::Array(vec![t.as_str().into(), i.as_str().into()]))
                .collect(),
        );
        let sql = if self.is_postgres() {
            format!(
                "SELECT r.res_type, r.res_id, r.rid, r.version, r.last_updated, r.deleted, r.seq, r.idx_mask, v.method, v.body FROM json_array_elements($1::json) AS e JOIN resource r ON r.res_type = e->>0 AND r.res_id = e->>1 JOIN resource_version v ON v.seq = r.seq{}",
                if lock { " FOR UPDATE OF r" } else { "" }
            )
        } else {
            "SELECT r.res_type, r.res_id, r.rid, r.version, r.last_updated, r.deleted, r.seq, r.idx_mask, v.method, v.body FROM json_each($1) AS e JOIN resource r ON r.res_type = e.value->>0 AND r.res_id = e.value->>1 JOIN resource_version v ON v.seq = r.seq".to_string()
        };
        let rows = self
            .fetch_all(
                &sql,
                &[Arg::Text(list.to_string())],
                &[
                    Ty::Text,
                    Ty::Text,
                    Ty::Int,
                    Ty::Int,
                    Ty::Int,
                    Ty::Int,
                    Ty::Int,
                    Ty::Int,
                    Ty::Text,
                    Ty::OptText,
                ],
            )
            .await?;
        let mut out = Vec::with_capacity(rows.len());
        for mut row in rows {
            let body = row.pop().and_then(Val::text);
            let method = row.pop().and_then(Val::text).unwrap_or_default();
            let current = current_from(row.split_off(2));
            let mut key = row.into_iter().map(|v| v.text().unwrap_or_default());
            let (Some(t), Some(i)) = (key.next(), key.next()) else {
                continue;
            };
            out.push(((t, i), current, method, body));
        }
        Ok(out)
    }

    /// The current row, without locking.
    pub async fn current(&mut self, ty: &str, id: &str) -> Result<Option<Current>> {
        if let Some(p) = self.prefetched.get(&(ty.to_string(), id.to_string())) {
            return Ok(p.as_ref().map(|(c, _, _)| c.clone()));
        }
        let row = self
            .fetch_resource_rows(
                ty,
                id,
                "SELECT rid, version, last_updated, deleted, seq, idx_mask FROM resource WHERE res_type = $1 AND res_id = $2",
                &[Arg::Text(ty.into()), Arg::Text(id.into())],
                &CURRENT_COLS,
            )
            .await?
            .into_iter()
            .next();
        Ok(row.map(current_from))
    }

    /// The current row, locked against concurrent writers until the transaction ends.
    /// On PostgreSQL an advisory lock on (type, id) also serialises two creators of the
    /// same new id; SQLite has a single writer, so reading is enough.
    pub async fn current_for_update(&mut self, ty: &str, id: &str) -> Result<Option<Current>> {
        // Prefetched on PostgreSQL means locked already (see `Db::prefetch`).
        if !self.is_postgres()
            || self
                .prefetched
                .contains_key(&(ty.to_string(), id.to_string()))
        {
            return self.current(ty, id).await;
        }
        self.lock_key_pg(lock_key(&[ty, id])).await?;
        let row = self
            .fetch_optional(
                "SELECT rid, version, last_updated, deleted, seq, idx_mask FROM resource WHERE res_type = $1 AND res_id = $2 FOR UPDATE",
                &[Arg::Text(ty.into()), Arg::Text(id.into())],
                &CURRENT_COLS,
            )
            .await?;
        Ok(row.map(current_from))
    }

    /// Serialises writers that test a condition before creating (conditional create and
    /// update): two concurrent `If-None-Exist` creates must not both create.
    pub async fn lock_condition(&mut self, ty: &str, condition: &str) -> Result<()> {
        if self.is_postgres() {
            self.lock_key_pg(lock_key(&["condition", ty, condition]))
                .await?;
        }
        Ok(())
    }

    /// PostgreSQL: one key's advisory lock, after the gate (see [`Gate`]); nothing if the
    /// job holds the gate exclusively.
    async fn lock_key_pg(&mut self, key: i64) -> Result<()> {
        match self.gate {
            Gate::Exclusive => Ok(()),
            Gate::Shared => {
                self.execute("SELECT pg_advisory_xact_lock($1)", &[Arg::Int(key)])
                    .await?;
                Ok(())
            }
            Gate::None => {
                // Left to right: the gate before the key. Either order would be safe: the job
                // acts only once it holds both, and an exclusive holder takes no key locks.
                self.execute(
                    "SELECT pg_advisory_xact_lock_shared($1), pg_advisory_xact_lock($2)",
                    &[Arg::Int(gate_key()), Arg::Int(key)],
                )
                .await?;
                self.gate = Gate::Shared;
                Ok(())
            }
        }
    }

    /// PostgreSQL: the write gate, exclusively, for a job that may lock more than
    /// [`KEY_LOCKS_PER_JOB`] keys; it then takes no key locks. Call it before the job's
    /// first lock: a job that holds the gate shared keeps it so (it cannot be raised without
    /// risking a deadlock) and goes on locking key by key. Nothing elsewhere.
    pub async fn hold_write_gate(&mut self) -> Result<()> {
        if self.is_postgres() && self.gate == Gate::None {
            self.execute("SELECT pg_advisory_xact_lock($1)", &[Arg::Int(gate_key())])
                .await?;
            self.gate = Gate::Exclusive;
        }
        Ok(())
    }

    /// PostgreSQL: the gate, shared, unless the job holds it already (see [`Gate`]).
    async fn take_shared_gate(&mut self) -> Result<()> {
        if self.gate == Gate::None {
            self.execute(
                "SELECT pg_advisory_xact_lock_shared($1)",
                &[Arg::Int(gate_key())],
            )
            .await?;
            self.gate = Gate::Shared;
        }
        Ok(())
    }

    /// The current version of a resource (deleted ones come back with `body: None`).
    pub async fn read(&mut self, ty: &str, id: &str) -> Result<Option<Stored>> {
        let row = self
            .fetch_resource_rows(
                ty,
                id,
                "SELECT v.version, v.last_updated, v.method, v.body, v.seq FROM resource r JOIN resource_version v ON v.seq = r.seq WHERE r.res_type = $1 AND r.res_id = $2",
                &[Arg::Text(ty.into()), Arg::Text(id.into())],
                &[Ty::Int, Ty::Int, Ty::Text, Ty::OptText, Ty::Int],
            )
            .await?
            .into_iter()
            .next();
        Ok(row.map(|r| stored_from(ty, id, r)))
    }

    /// One version of a resource.
    pub async fn vread(&mut self, ty: &str, id: &str, version: i64) -> Result<Option<Stored>> {
        if let Some(Some((c, method, body))) =
            self.prefetched.get(&(ty.to_string(), id.to_string()))
            && c.version == version
        {
            return Ok(Some(Stored {
                res_type: ty.to_string(),
                id: id.to_string(),
                version,
                last_updated: c.last_updated,
                method: method.clone(),
                body: body.clone(),
                seq: c.seq,
            }));
        }
        let row = self
            .fetch_resource_rows(
                ty,
                id,
                "SELECT version, last_updated, method, body, seq FROM resource_version WHERE res_type = $1 AND res_id = $2 AND version = $3",
                &[Arg::Text(ty.into()), Arg::Text(id.into()), Arg::Int(version)],
                &[Ty::Int, Ty::Int, Ty::Text, Ty::OptText, Ty::Int],
            )
            .await?
            .into_iter()
            .next();
        Ok(row.map(|r| stored_from(ty, id, r)))
    }

    /// Writes a new version (or a tombstone when `prepared` is `None`) after `prior`,
    /// which the caller read with [`Db::current_for_update`] in this transaction.
    pub async fn write_version(
        &mut self,
        ty: &str,
        id: &str,
        prior: Option<&Current>,
        prepared: Option<&Prepared>,
        method: &str,
        now: Micros,
    ) -> Result<Written> {
        if !self.prefetched.is_empty() {
            self.prefetched.remove(&(ty.to_string(), id.to_string()));
        }
        let version = prior.map_or(1, |c| c.version + 1);
        // lastUpdated never goes backwards for one resource, even if the clock does.
        let last_updated = prior.map_or(now, |c| now.max(c.last_updated + 1));
        let body = prepared.map(|p| finish_body(&p.body, version, last_updated));
        let deleted = i64::from(prepared.is_none());
        let mut mask = 0i64;
        if let Some(p) = prepared {
            for e in &p.index {
                mask |= 1 << kind_bit(&e.value);
            }
        }
        let row = NewVersion {
            ty,
            id,
            prior,
            version,
            last_updated,
            method,
            body: body.as_deref(),
            deleted,
            mask,
        };
        let (seq, new_rid) = match self.alloc.as_mut() {
            Some(alloc) => {
                alloc.next_seq += 1;
                alloc.next_rid += i64::from(prior.is_none());
                (alloc.next_seq - 1, alloc.next_rid - 1)
            }
            None => self.reserve_ids(prior.map_or(0, |c| c.seq)).await?,
        };
        let rid = self.buffer_version(&row, seq, new_rid);
        self.written.push((
            ty.to_string(),
            id.to_string(),
            super::cache::Cached {
                version,
                last_updated,
                method: std::sync::Arc::from(method),
                body: body.as_deref().map(std::sync::Arc::from),
            },
        ));
        if let Some(p) = prepared {
            self.pending_index
                .extend(p.index.iter().map(|e| PendingIndex {
                    rid,
                    res_type: ty.to_string(),
                    entry: e.clone(),
                }));
        }
        Ok(Written {
            id: id.to_string(),
            version,
            last_updated,
            body,
            created: prior.is_none(),
        })
    }

    /// The version row and the current row wait in [`Pending`] for the job's flush, with
    /// `seq` and, for a new resource, `new_rid` (see [`Db::flush`]).
    fn buffer_version(&mut self, v: &NewVersion<'_>, seq: i64, new_rid: i64) -> i64 {
        let NewVersion {
            ty,
            id,
            prior,
            version,
            last_updated,
            method,
            body,
            deleted,
            mask,
        } = *v;
        // The prior version was read after this job's rows for the resource were flushed
        // (every read flushes what it touches). PostgreSQL's one-statement flush relies on
        // it: its parts see the database as it was before the statement.
        debug_assert!(
            !self.pending.touches(ty, id),
            "{ty}/{id} written twice unflushed"
        );
        let rid = prior.map_or(new_rid, |c| c.rid);
        let body = body.map_or(Value::Null, Value::from);
        self.pending.keys.insert((ty.to_string(), id.to_string()));
        self.pending.versions.push(Value::Array(vec![
            seq.into(),
            ty.into(),
            id.into(),
            version.into(),
            last_updated.into(),
            method.into(),
            body,
        ]));
        let row = Value::Array(vec![
            rid.into(),
            ty.into(),
            id.into(),
            version.into(),
            last_updated.into(),
            deleted.into(),
            seq.into(),
            mask.into(),
        ]);
        match prior {
            Some(c) => {
                self.pending.updates.push(row);
                self.pending_index.retain(|p| p.rid != rid);
                for bit in 0..INDEX_TABLES.len() {
                    if c.idx_mask & (1 << bit) != 0 {
                        self.pending.clears[bit].push(rid);
                    }
                }
            }
            None => self.pending.inserts.push(row),
        }
        rid
    }

    /// PostgreSQL: the next `(seq, rid)` from this job's reservation, taking more from the
    /// sequences when it runs out. Several processes share the sequences, so a reservation
    /// may predate another process's write of the same resource, committed since; `seq`
    /// must still follow the version it replaces (`after`, read under the resource's lock),
    /// or history would list them out of order: older reservations are dropped until it does.
    async fn reserve_ids(&mut self, after: i64) -> Result<(i64, i64)> {
        loop {
            if let Some(ids) = self.reserved.take(after) {
                return Ok(ids);
            }
            let n = self.reserved.block.clamp(4, 4096);
            self.reserved.block = n * 4;
            let rows = self
                .fetch_all_unflushed(
                    "SELECT nextval(pg_get_serial_sequence('resource_version', 'seq')), nextval(pg_get_serial_sequence('resource', 'rid')) FROM generate_series(1, $1)",
                    &[Arg::Int(n)],
                    &[Ty::Int, Ty::Int],
                )
                .await?;
            self.reserved
                .ids
                .extend(rows.into_iter().map(|r| (r[0].int(), r[1].int())));
        }
    }

    /// Writes what the job has buffered, in few round trips: on SQLite one multi-statement
    /// query holds the savepoint operations, the versions, the current rows and the index
    /// deletions (rows travel as JSON array arguments, so the SQL text is fixed per shape and
    /// cached); the index rows follow as bound `INSERT OR FAIL ... VALUES` statements of
    /// fixed sizes ([`SQLITE_INDEX_CHUNKS`]), then the job's tail. PostgreSQL takes one
    /// statement per query with arguments: the versions, the new and updated current rows,
    /// each index table's deletions and new rows go as data-modifying CTEs of one statement
    /// (see [`Db::execute_parts_pg`]).
    /// Every read on a [`Db`] calls this first, so a job always sees its own writes.
    pub async fn flush(&mut self) -> Result<()> {
        if self.pending_index.is_empty() && self.pending.is_empty() {
            return Ok(());
        }
        self.flush_inner().await
    }

    /// The SQLite writer's savepoint statements due before a job's next write: the previous
    /// job's savepoint is released there rather than by a call of its own, and this job's
    /// opens if it wants one (see [`Savepoint`]). Empty elsewhere.
    pub(crate) fn savepoint_sql(&mut self) -> String {
        let mut sql = String::new();
        if self.is_postgres() {
            return sql;
        }
        if std::mem::take(&mut self.release_pending) {
            sql.push_str("RELEASE job;\n");
        }
        if self.savepoint == Savepoint::Wanted {
            sql.push_str("SAVEPOINT job;\n");
            self.savepoint = Savepoint::Open;
        }
        sql
    }

    /// The last flush of a job. A job that has not written before needs no savepoint: its
    /// writes go in one multi-statement query, and if that fails the writer rolls back the
    /// whole group (the database itself failed; every job of the group is answered with the
    /// error and nothing is committed). Savepoints cost a copy of every touched page.
    pub async fn flush_final(&mut self) -> Result<()> {
        if self.savepoint == Savepoint::Wanted {
            self.savepoint = Savepoint::Unprotected;
        }
        let r = self.flush().await;
        if r.is_err() && self.savepoint == Savepoint::Unprotected {
            self.group_failed = true;
        }
        r
    }

    /// Runs a job's last statement together with its buffered writes, in the same round
    /// trip and without a savepoint (see [`Db::flush_final`]): the job must not write after
    /// it, and if it fails the writer's whole group rolls back, so use it only for
    /// statements that cannot fail on input (e.g. `ON CONFLICT DO NOTHING` inserts).
    /// Elsewhere (PostgreSQL) it is a plain [`Db::execute`].
    pub async fn execute_final(&mut self, sql: &str, args: Vec<Arg>) -> Result<()> {
        if self.alloc.is_none() {
            self.execute(sql, &args).await?;
            return Ok(());
        }
        self.pending.tail.push((sql.to_string(), args));
        self.flush_final().await
    }

    /// PostgreSQL's flush: the buffered version and current rows, the index deletions they
    /// bring and the index rows `tables` (by kind bit), one statement per kind with its rows
    /// as one JSON array argument `$1`, all sent as one (see [`Db::execute_parts_pg`]); then
    /// the job's tail. `OVERRIDING SYSTEM VALUE`: the ids came from the identity sequences
    /// already (see [`Reserved`]).
    async fn flush_pg(&mut self, pending: Pending, tables: [Vec<Arg>; 7]) -> Result<()> {
        let json = |rows: Vec<Value>| Arg::Text(Value::Array(rows).to_string());
        let mut parts = Vec::new();
        if !pending.versions.is_empty() {
            parts.push((
                "INSERT INTO resource_version (seq, res_type, res_id, version, last_updated, method, body) OVERRIDING SYSTEM VALUE SELECT (e->>0)::bigint, e->>1, e->>2, (e->>3)::bigint, (e->>4)::bigint, e->>5, e->>6 FROM json_array_elements($1::json) AS e".to_string(),
                json(pending.versions),
            ));
        }
        if !pending.inserts.is_empty() {
            parts.push((
                "INSERT INTO resource (rid, res_type, res_id, version, last_updated, deleted, seq, idx_mask) OVERRIDING SYSTEM VALUE SELECT (e->>0)::bigint, e->>1, e->>2, (e->>3)::bigint, (e->>4)::bigint, (e->>5)::bigint, (e->>6)::bigint, (e->>7)::bigint FROM json_array_elements($1::json) AS e".to_string(),
                json(pending.inserts),
            ));
        }
        if !pending.updates.is_empty() {
            parts.push((
                "UPDATE resource SET version = u.version, last_updated = u.last_updated, deleted = u.deleted, seq = u.seq, idx_mask = u.idx_mask FROM (SELECT (e->>0)::bigint AS rid, (e->>3)::bigint AS version, (e->>4)::bigint AS last_updated, (e->>5)::bigint AS deleted, (e->>6)::bigint AS seq, (e->>7)::bigint AS idx_mask FROM json_array_elements($1::json) AS e) AS u WHERE resource.rid = u.rid".to_string(),
                json(pending.updates),
            ));
        }
        for (bit, rids) in pending.clears.into_iter().enumerate() {
            if !rids.is_empty() {
                parts.push((
                    format!(
                        "DELETE FROM {} WHERE rid IN (SELECT (e #>> '{{}}')::bigint FROM json_array_elements($1::json) AS e)",
                        INDEX_TABLES[bit]
                    ),
                    Arg::Text(Value::from(rids).to_string()),
                ));
            }
        }
        for (bit, args) in tables.into_iter().enumerate() {
            if args.is_empty() {
                continue;
            }
            let width = index_columns(bit).1.len();
            let mut args = args.into_iter().map(Arg::into_json);
            let rows: Vec<Value> = (0..args.len() / width)
                .map(|_| Value::Array(args.by_ref().take(width).collect()))
                .collect();
            parts.push((bulk_insert_sql(bit), json(rows)));
        }
        if !parts.is_empty() {
            self.execute_parts_pg(parts).await?;
        }
        for (sql, args) in pending.tail {
            self.execute_unflushed(&sql, &args).await?;
        }
        Ok(())
    }

    /// PostgreSQL: `parts` (statements with one argument `$1` each) in one round trip, as
    /// data-modifying CTEs of one statement. They all see the snapshot from before it, so an
    /// index deletion removes the rows of the replaced version, never the new ones written
    /// beside it.
    async fn execute_parts_pg(&mut self, parts: Vec<(String, Arg)>) -> Result<()> {
        if let [(sql, arg)] = parts.as_slice() {
            self.execute_unflushed(sql, std::slice::from_ref(arg))
                .await?;
            return Ok(());
        }
        let mut sql = String::from("WITH ");
        let mut args = Vec::with_capacity(parts.len());
        for (k, (part, arg)) in parts.into_iter().enumerate() {
            if k > 0 {
                sql.push_str(", ");
            }
            sql.push_str(&format!("w{k} AS ({})", renumber(&part, k)));
            args.push(arg);
        }
        sql.push_str(" SELECT 1");
        self.execute_unflushed(&sql, &args).await?;
        Ok(())
    }

    async fn flush_inner(&mut self) -> Result<()> {
        let pending = std::mem::take(&mut self.pending_index);
        let mut tables: [Vec<Arg>; 7] = Default::default();
        for p in pending {
            let (rid, param) = (
                Arg::Int(p.rid),
                Arg::Int(param_key(&p.res_type, &p.entry.code)),
            );
            let opt = Arg::OptText;
            let real = |v: f64| {
                if v.is_finite() {
                    Arg::Real(v)
                } else {
                    Arg::OptText(None)
                }
            };
            let bit = kind_bit(&p.entry.value);
            let row = match p.entry.value {
                IndexValue::Token {
                    system,
                    code: c,
                    text,
                } => vec![rid, param, opt(system), opt(c), opt(text)],
                IndexValue::String { normalized, exact } => {
                    vec![rid, param, Arg::Text(normalized), Arg::Text(exact)]
                }
                IndexValue::Reference {
                    target_type,
                    target_id,
                    url,
                } => vec![rid, param, opt(target_type), opt(target_id), Arg::Text(url)],
                IndexValue::Date { start, end } => {
                    vec![rid, param, Arg::Int(start), Arg::Int(end)]
                }
                IndexValue::Number { value } => vec![rid, param, real(value)],
                IndexValue::Quantity {
                    value,
                    system,
                    code: c,
                    unit,
                } => vec![rid, param, real(value), opt(system), opt(c), opt(unit)],
                IndexValue::Uri(u) => vec![rid, param, Arg::Text(u)],
            };
            tables[bit].extend(row);
        }
        let pending = std::mem::take(&mut self.pending);
        if self.is_postgres() {
            return self.flush_pg(pending, tables).await;
        }
        let mut b = SqlBuilder::default();
        // The job's savepoint opens with its first write, in the same round trip.
        b.push(&self.savepoint_sql());
        if !pending.versions.is_empty() {
            b.push(MATERIALIZED)
                .text(Value::Array(pending.versions).to_string())
                .push(")) INSERT INTO resource_version (seq, res_type, res_id, version, last_updated, method, body) SELECT e.v->>0, e.v->>1, e.v->>2, e.v->>3, e.v->>4, e.v->>5, e.v->>6 FROM e;\n");
        }
        if !pending.inserts.is_empty() {
            b.push(MATERIALIZED)
                .text(Value::Array(pending.inserts).to_string())
                .push(")) INSERT INTO resource (rid, res_type, res_id, version, last_updated, deleted, seq, idx_mask) SELECT e.v->>0, e.v->>1, e.v->>2, e.v->>3, e.v->>4, e.v->>5, e.v->>6, e.v->>7 FROM e;\n");
        }
        if !pending.updates.is_empty() {
            b.push("UPDATE resource SET version = u.version, last_updated = u.last_updated, deleted = u.deleted, seq = u.seq, idx_mask = u.idx_mask FROM (SELECT e.value->>0 AS rid, e.value->>3 AS version, e.value->>4 AS last_updated, e.value->>5 AS deleted, e.value->>6 AS seq, e.value->>7 AS idx_mask FROM json_each(")
                .text(Value::Array(pending.updates).to_string())
                .push(") AS e) AS u WHERE resource.rid = u.rid;\n");
        }
        for (bit, rids) in pending.clears.into_iter().enumerate() {
            if !rids.is_empty() {
                b.push(&format!(
                    "DELETE FROM {} WHERE rid IN (SELECT value FROM json_each(",
                    INDEX_TABLES[bit]
                ))
                .text(Value::from(rids).to_string())
                .push("));\n");
            }
        }
        if tables.iter().any(|t| !t.is_empty()) {
            // SQLite: what is buffered so far first (the savepoint among it), then the index
            // rows by bound statements (see `SQLITE_INDEX_CHUNKS`), then the tail.
            if !b.sql.is_empty() {
                self.execute_unflushed(&b.sql, &b.args).await?;
                b = SqlBuilder::default();
            }
            for ((bit, args), inserts) in tables.into_iter().enumerate().zip(&*SQLITE_INDEX_INSERTS)
            {
                let width = index_columns(bit).1.len();
                let mut left = args.len() / width;
                let mut args = args.into_iter();
                for (&size, sql) in SQLITE_INDEX_CHUNKS.iter().zip(inserts) {
                    while left >= size {
                        let chunk: Vec<Arg> = args.by_ref().take(size * width).collect();
                        self.execute_owned(sql, chunk).await?;
                        left -= size;
                    }
                }
            }
        }
        for (sql, args) in pending.tail {
            b.push(&renumber(&sql, b.args.len())).push(";\n");
            b.args.extend(args);
        }
        if !b.sql.is_empty() {
            self.execute_unflushed(&b.sql, &b.args).await?;
        }
        Ok(())
    }

    /// History (http.html#history): newest first, at most `count` entries with
    /// `seq < before` (keyset paging, stable while others write).
    pub async fn history(&mut self, q: &HistoryQuery) -> Result<Vec<Stored>> {
        let mut b = SqlBuilder::new(
            "SELECT v.res_type, v.res_id, v.version, v.last_updated, v.method, v.body, v.seq FROM resource_version v WHERE 1 = 1",
        );
        q.filter(&mut b);
        b.push(" ORDER BY v.seq DESC LIMIT ").int(q.count);
        let rows = self
            .fetch_all(
                &b.sql,
                &b.args,
                &[
                    Ty::Text,
                    Ty::Text,
                    Ty::Int,
                    Ty::Int,
                    Ty::Text,
                    Ty::OptText,
                    Ty::Int,
                ],
            )
            .await?;
        Ok(rows
            .into_iter()
            .map(|r| {
                let mut it = r.into_iter();
                let ty = it.next().and_then(Val::text).unwrap_or_default();
                let id = it.next().and_then(Val::text).unwrap_or_default();
                stored_from(&ty, &id, it.collect())
            })
            .collect())
    }

    /// The number of entries a history query matches (without paging).
    pub async fn history_total(&mut self, q: &HistoryQuery) -> Result<i64> {
        let mut b = SqlBuilder::new("SELECT COUNT(*) FROM resource_version v WHERE 1 = 1");
        let unpaged = HistoryQuery {
            before: None,
            ..q.clone()
        };
        unpaged.filter(&mut b);
        self.fetch_one_int(&b.sql, &b.args).await
    }
}

/// What a history interaction asks for.
#[derive(Debug, Clone, Default)]
pub struct HistoryQuery {
    pub res_type: Option<String>,
    pub id: Option<String>,
    pub since: Option<Micros>,
    /// `_at`: only versions that were current at this instant.
    pub at: Option<Micros>,
    pub before: Option<i64>,
    pub count: i64,
}

impl HistoryQuery {
    fn filter(&self, b: &mut SqlBuilder) {
        if let Some(t) = &self.res_type {
            b.push(" AND v.res_type = ").text(t.clone());
        }
        if let Some(id) = &self.id {
            b.push(" AND v.res_id = ").text(id.clone());
        }
        if let Some(s) = self.since {
            b.push(" AND v.last_updated >= ").int(s);
        }
        if let Some(at) = self.at {
            b.push(" AND v.last_updated <= ").int(at);
            b.push(" AND NOT EXISTS (SELECT 1 FROM resource_version w WHERE w.res_type = v.res_type AND w.res_id = v.res_id AND w.version > v.version AND w.last_updated <= ")
                .int(at)
                .push(")");
        }
        if let Some(before) = self.before {
            b.push(" AND v.seq < ").int(before);
        }
    }
}

fn stored_from(ty: &str, id: &str, row: Vec<Val>) -> Stored {
    let mut it = row.into_iter();
    let version = it.next().map_or(0, |v| v.int());
    let last_updated = it.next().map_or(0, |v| v.int());
    let method = it.next().and_then(Val::text).unwrap_or_default();
    let body = it.next().and_then(Val::text);
    let seq = it.next().map_or(0, |v| v.int());
    Stored {
        res_type: ty.to_string(),
        id: id.to_string(),
        version,
        last_updated,
        method,
        body,
        seq,
    }
}

#[cfg(test)]
mod tests {
    use super::{Reserved, param_key, param_range, renumber};

    #[test]
    fn param_keys_tell_every_r4_type_apart_and_stay_in_their_code_range() {
        let defs = crate::definitions::Definitions::get().expect("definitions");
        assert!(defs.resource_types.len() > 140);
        let mut seen = std::collections::HashMap::new();
        for ty in &defs.resource_types {
            let key = param_key(ty, "identifier");
            assert!(key > 0);
            let (lo, hi) = param_range("identifier");
            assert!((lo..=hi).contains(&key), "{ty}");
            if let Some(other) = seen.insert(key, ty) {
                panic!("{ty} and {other} share a param key");
            }
        }
        // Stored in every index row: the function must never change.
        assert_eq!(param_key("Observation", "code"), 421_803_208_581_952_205);
        assert_ne!(param_range("code"), param_range("code:of-type"));
    }

    #[test]
    fn renumber_shifts_every_placeholder() {
        assert_eq!(
            renumber(
                "INSERT INTO t VALUES ($1, $2, $10) ON CONFLICT DO NOTHING",
                7
            ),
            "INSERT INTO t VALUES ($8, $9, $17) ON CONFLICT DO NOTHING"
        );
        assert_eq!(renumber("SELECT '$' || $1", 0), "SELECT '$' || $1");
    }

    #[test]
    fn reserved_ids_never_go_behind_the_version_they_follow() {
        let mut r = Reserved {
            ids: [(5, 1), (6, 2), (9, 3)].into(),
            block: 4,
        };
        assert_eq!(r.take(0), Some((5, 1)));
        // Another process wrote seq 8 since this block was taken: 6 would sort before it.
        assert_eq!(r.take(8), Some((9, 3)));
        assert_eq!(r.take(0), None);
    }
}
