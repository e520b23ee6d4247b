//! Resource storage (FHIR R4 http.html "versioning", "history"): the one write path.
//!
//! Every write is a *job* run inside one database transaction. On SQLite a single writer
//! task owns the write connection and commits jobs in groups: it drains whatever jobs are
//! queued, runs each inside its own SAVEPOINT (a failing job rolls back alone), commits
//! once, and only then answers every job. One fsync is shared by the whole group, so
//! throughput comes from group commit while each acknowledgement still follows a durable
//! commit. On PostgreSQL each job runs in its own transaction on a pooled connection; the
//! server's WAL writer groups concurrent commits itself.
//!
//! Architecture invariant: nothing outside this module opens a transaction, and no caller
//! learns the outcome of a write before its COMMIT has returned.

pub mod cache;
pub mod db;
mod migrate;
pub mod resource;

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{PgPool, SqlitePool};
use tokio::sync::{mpsc, oneshot};

use crate::error::{ErrorKind, FhirError, Result};
pub use db::{Arg, Db, SqlBuilder, Ty, Val};

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Called with the commit result once the group holding the job has committed or failed.
type Finish = Box<dyn FnOnce(Result<()>) + Send>;
/// A write job: runs inside a transaction; says whether it succeeded and how to answer.
type Job = Box<dyn for<'a> FnOnce(&'a mut Db) -> BoxFuture<'a, (bool, Finish)> + Send>;

/// What the SQLite writer receives, in order: jobs, then at most one `Close`.
enum WriterMsg {
    Job(Job),
    /// Checkpoint the WAL, drop the write connection and answer.
    Close(oneshot::Sender<()>),
}

/// Durability of commits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Durability {
    /// Acknowledged writes survive power loss (SQLite `synchronous=FULL`, PostgreSQL fsync).
    Full,
    /// Faster: SQLite `synchronous=NORMAL` (a power loss may drop the last commits, never
    /// corrupt), PostgreSQL `synchronous_commit=off` for this server's sessions.
    Relaxed,
}

/// Store settings.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    pub url: String,
    pub durability: Durability,
    /// Connections for reads (SQLite) or for everything (PostgreSQL).
    pub pool_size: u32,
    /// Most jobs committed together by the SQLite writer.
    pub group_commit_max: usize,
    /// Bytes of current versions cached for reads by id (SQLite only).
    pub cache_bytes: usize,
}

/// The store: cheap to clone, shared by every request.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

enum Inner {
    Sqlite {
        read: SqlitePool,
        writer: mpsc::Sender<WriterMsg>,
        write_pool: SqlitePool,
        cache: Arc<cache::ResourceCache>,
        /// Held (locked) for as long as the store is open.
        _lock: Option<std::fs::File>,
    },
    Postgres {
        pool: PgPool,
    },
}

impl Store {
    /// Opens (creating and migrating if needed) the database named by `config.url`.
    pub async fn open(config: &StoreConfig) -> Result<Store, String> {
        if let Some(path) = config
            .url
            .strip_prefix("sqlite://")
            .or_else(|| config.url.strip_prefix("sqlite:"))
        {
            Self::open_sqlite(path, config).await
        } else if config.url.starts_with("postgres://") || config.url.starts_with("postgresql://") {
            Self::open_postgres(config).await
        } else {
            Err(format!(
                "unsupported database URL {:?}: use sqlite://PATH or postgres://USER@HOST/DB",
                config.url
            ))
        }
    }

    async fn open_sqlite(path: &str, config: &StoreConfig) -> Result<Store, String> {
        let path = if path.is_empty() {
            "./data/iomt-fhir.db"
        } else {
            path
        };
        if path != ":memory:"
            && let Some(dir) = std::path::Path::new(path).parent()
            && !dir.as_os_str().is_empty()
        {
            std::fs::create_dir_all(dir)
                .map_err(|e| format!("cannot create database directory {}: {e}", dir.display()))?;
        }
        // One process writes a SQLite database: the writer allocates row ids itself and the
        // read cache trusts that no one else writes. A second server or `import` on the same
        // file is refused at start instead of failing its writes later.
        let lock = if path == ":memory:" {
            None
        } else {
            let lock_path = format!("{path}.lock");
            let file = std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&lock_path)
                .map_err(|e| format!("cannot open {lock_path}: {e}"))?;
            file.try_lock().map_err(|_| {
                format!("{path} is in use by another iomt-fhir process (one process writes a SQLite database; stop it first or send it the data over HTTP)")
            })?;
            Some(file)
        };
        let sync = match config.durability {
            Durability::Full => SqliteSynchronous::Full,
            Durability::Relaxed => SqliteSynchronous::Normal,
        };
        let opts = SqliteConnectOptions::from_str(&format!("sqlite://{path}"))
            .map_err(|e| format!("bad SQLite path {path:?}: {e}"))?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(sync)
            .busy_timeout(Duration::from_secs(10))
            .pragma("cache_size", "-65536")
            // Readers map the database file instead of copying pages into a private cache
            // each: 16 readers then share the OS page cache, and concurrent searches do not
            // serialise on SQLite's allocator mutex (measured: 2x the search throughput).
            .pragma("mmap_size", "274877906944")
            // temp_store stays at its default (file) on purpose: each write job runs in a
            // SAVEPOINT, and SQLite (3.51) releases every statement savepoint by walking an
            // in-memory sub-journal from its start, which made large jobs quadratic (40% of
            // CPU in the Synthea ingest). A file-backed sub-journal, spilled past 64 KiB, is
            // not walked.
            .foreign_keys(false);
        let write_pool = SqlitePoolOptions::new()
            .max_connections(1)
            .min_connections(1)
            .acquire_timeout(Duration::from_secs(30))
            // Checkpoints run on a connection of their own (see `checkpointer`), so the
            // writer only falls back to checkpointing itself if the WAL reaches 1 GiB.
            // Room for the writer's fixed statements: the index inserts alone are 7 tables
            // times 5 chunk sizes (see `resource::SQLITE_INDEX_CHUNKS`).
            .connect_with(
                opts.clone()
                    .pragma("wal_autocheckpoint", "262144")
                    .statement_cache_capacity(400),
            )
            .await
            .map_err(|e| format!("cannot open SQLite database {path}: {e}"))?;
        let conn = write_pool
            .acquire()
            .await
            .map_err(|e| format!("cannot open SQLite database {path}: {e}"))?;
        let mut db = Db::sqlite(conn);
        migrate::run(&mut db)
            .await
            .map_err(|e| format!("migrating {path}: {e}"))?;
        // This task is the database's only writer: it allocates row ids itself.
        let next_seq = db
            .fetch_one_int(
                "SELECT COALESCE(MAX(seq), 0) + 1 FROM resource_version",
                &[],
            )
            .await
            .map_err(|e| format!("reading {path}: {e}"))?;
        let next_rid = db
            .fetch_one_int("SELECT COALESCE(MAX(rid), 0) + 1 FROM resource", &[])
            .await
            .map_err(|e| format!("reading {path}: {e}"))?;
        db.alloc = Some(resource::IdAlloc { next_seq, next_rid });
        let checkpoint_pool = SqlitePoolOptions::new()
            .max_connections(1)
            .min_connections(1)
            .acquire_timeout(Duration::from_secs(30))
            .connect_with(opts.clone())
            .await
            .map_err(|e| format!("cannot open SQLite database {path}: {e}"))?;
        let read = SqlitePoolOptions::new()
            .max_connections(config.pool_size.max(1))
            .acquire_timeout(Duration::from_secs(30))
            // A page of 1,000 search results fits the row channel, so the connection's
            // thread hands the rows over without waiting for each one to be taken.
            .connect_with(
                opts.read_only(true)
                    .pragma("cache_size", "-8192")
                    .row_buffer_size(1024),
            )
            .await
            .map_err(|e| format!("cannot open SQLite database {path}: {e}"))?;
        let (wake, woken) = mpsc::channel::<()>(1);
        let checkpoints = tokio::spawn(checkpointer(checkpoint_pool, woken));
        let (tx, rx) = mpsc::channel::<WriterMsg>(4096);
        let cache = Arc::new(cache::ResourceCache::new(config.cache_bytes));
        tokio::spawn(sqlite_writer(
            db,
            rx,
            config.group_commit_max.max(1),
            cache.clone(),
            (wake, checkpoints),
        ));
        Ok(Store {
            inner: Arc::new(Inner::Sqlite {
                read,
                writer: tx,
                write_pool,
                cache,
                _lock: lock,
            }),
        })
    }

    async fn open_postgres(config: &StoreConfig) -> Result<Store, String> {
        let mut opts = PgConnectOptions::from_str(&config.url)
            .map_err(|e| format!("bad PostgreSQL URL: {e}"))?
            .application_name("iomt-fhir");
        // Searches are short statements: compiling one to machine code (JIT, chosen by cost
        // for the larger counts) takes longer than running it.
        opts = opts.options([("jit", "off")]);
        if config.durability == Durability::Relaxed {
            opts = opts.options([("synchronous_commit", "off")]);
        }
        let pool = PgPoolOptions::new()
            .max_connections(config.pool_size.max(2))
            .acquire_timeout(Duration::from_secs(30))
            .connect_with(opts)
            .await
            .map_err(|e| format!("cannot connect to PostgreSQL: {e}"))?;
        let conn = pool
            .acquire()
            .await
            .map_err(|e| format!("cannot connect to PostgreSQL: {e}"))?;
        let mut db = Db::pg(conn);
        migrate::run(&mut db)
            .await
            .map_err(|e| format!("migrating PostgreSQL: {e}"))?;
        Ok(Store {
            inner: Arc::new(Inner::Postgres { pool }),
        })
    }

    pub fn backend_name(&self) -> &'static str {
        match &*self.inner {
            Inner::Sqlite { .. } => "sqlite",
            Inner::Postgres { .. } => "postgres",
        }
    }

    /// At start-up, refreshes the query planner's statistics of the tables whose statistics
    /// are missing or stale (more than a tenth changed since), for instance after writes with
    /// autovacuum off. PostgreSQL plans search probes from them: without, a probe of a common
    /// code becomes a scan of all its rows (measured 10x slower). Fresh tables are left alone:
    /// an `ANALYZE` of all of them took 30 s at 1,000,000 resources, while searches ran
    /// hundreds of times slower beside it. SQLite plans without statistics: nothing to do.
    pub async fn analyze_if_stale(&self) -> Result<()> {
        if let Inner::Postgres { .. } = &*self.inner {
            let mut db = self.reader().await?;
            // Only this server's tables (resolved through its search_path).
            let relids: Vec<String> = searched_tables()
                .map(|t| format!("'{t}'::regclass"))
                .collect();
            let stale = db
                .fetch_all(
                    &format!(
                        "SELECT format('%I.%I', schemaname, relname) FROM pg_stat_user_tables \
                         WHERE relid IN ({}) \
                         AND ((COALESCE(last_analyze, last_autoanalyze) IS NULL AND n_live_tup > 0) \
                         OR n_mod_since_analyze > 1000 + n_live_tup / 10)",
                        relids.join(", ")
                    ),
                    &[],
                    &[Ty::Text],
                )
                .await?;
            let tables: Vec<String> = stale
                .into_iter()
                .filter_map(|r| r.into_iter().next()?.text())
                .collect();
            if !tables.is_empty() {
                tracing::info!(tables = %tables.join(" "), "refreshing planner statistics");
                db.raw(&format!("ANALYZE {}", tables.join(", "))).await?;
            }
        }
        Ok(())
    }

    /// After a bulk load (`import`, a reindex): on PostgreSQL, `VACUUM (ANALYZE)` of this
    /// server's tables. Besides the statistics, it sets the visibility map and the rows'
    /// hint bits: without, the first searches over freshly loaded rows visit the table for
    /// every index entry (no index-only scans) and dirty each page they read (measured at
    /// 1,000,000 resources: a first search 63 ms, 6 ms after). Nothing to do on SQLite.
    pub async fn vacuum_analyze(&self) -> Result<()> {
        if let Inner::Postgres { .. } = &*self.inner {
            let mut db = self.reader().await?;
            let tables: Vec<&str> = searched_tables().collect();
            db.raw(&format!("VACUUM (ANALYZE) {}", tables.join(", ")))
                .await?;
        }
        Ok(())
    }

    /// A connection for reads (no transaction).
    pub async fn reader(&self) -> Result<Db> {
        Ok(match &*self.inner {
            Inner::Sqlite { read, .. } => Db::sqlite(read.acquire().await?),
            Inner::Postgres { pool } => Db::pg(pool.acquire().await?),
        })
    }

    /// The current version of `ty/id` (deleted ones with `body: None`): from the read cache
    /// on SQLite when it has it, else from the database.
    pub async fn read(&self, ty: &str, id: &str) -> Result<Option<resource::Stored>> {
        if let Inner::Sqlite { cache, .. } = &*self.inner {
            if let Some(s) = cache.get(ty, id) {
                return Ok(Some(s));
            }
            let stored = Box::pin(self.read_database(ty, id)).await?;
            if let Some(s) = &stored {
                cache.observed(s);
            }
            return Ok(stored);
        }
        Box::pin(self.read_database(ty, id)).await
    }

    /// [`Store::read`] from the database. Boxed by the caller: the pool's and the query's
    /// futures are kilobytes, which every future awaiting a read would otherwise carry (and
    /// copy) even when the read cache answers.
    async fn read_database(&self, ty: &str, id: &str) -> Result<Option<resource::Stored>> {
        self.reader().await?.read(ty, id).await
    }

    /// Runs `f` inside one database transaction and returns its result only after COMMIT.
    /// If `f` fails, everything it wrote is rolled back.
    pub async fn write<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: for<'a> FnOnce(&'a mut Db) -> BoxFuture<'a, Result<T>> + Send + 'static,
    {
        let (answer, answered) = oneshot::channel::<Result<T>>();
        // Shared so that the PostgreSQL path can answer a failure to start the transaction.
        let answer = Arc::new(std::sync::Mutex::new(Some(answer)));
        let reply = answer.clone();
        let job: Job = Box::new(move |db: &mut Db| {
            Box::pin(async move {
                let mut outcome = f(db).await;
                db.prefetched.clear();
                if outcome.is_ok()
                    && let Err(e) = db.flush_final().await
                {
                    outcome = Err(e);
                }
                if outcome.is_err() {
                    // Nothing of a failed job may reach a later flush.
                    db.pending_index.clear();
                    db.pending = Default::default();
                }
                let ok = outcome.is_ok();
                let finish: Finish = Box::new(move |commit: Result<()>| {
                    send(&reply, commit.and(outcome));
                });
                (ok, finish)
            })
        });
        match &*self.inner {
            Inner::Sqlite { writer, .. } => {
                writer.send(WriterMsg::Job(job)).await.map_err(|_| {
                    FhirError::new(ErrorKind::Unavailable, "the store is shutting down")
                })?;
            }
            Inner::Postgres { pool } => {
                // Everything from acquiring the connection to COMMIT runs on a task of its own:
                // if the client goes away, the request's future is dropped, but no transaction
                // is ever left open on a pooled connection, and an accepted write completes.
                let pool = pool.clone();
                tokio::spawn(async move {
                    let mut db = match pool.acquire().await {
                        Ok(c) => Db::pg(c),
                        Err(e) => return send(&answer, Err(e.into())),
                    };
                    if let Err(e) = db.raw("BEGIN").await {
                        return send(&answer, Err(e));
                    }
                    run_postgres_job(&mut db, job).await;
                });
            }
        }
        answered.await.map_err(|_| {
            tracing::error!("a write job ended without an answer (panic inside the job)");
            FhirError::internal("write job aborted")
        })?
    }

    /// Closes the database cleanly (waits for the writer to finish queued jobs).
    pub async fn close(&self) {
        match &*self.inner {
            Inner::Sqlite {
                read,
                write_pool,
                writer,
                ..
            } => {
                // The writer handles messages in order: every job queued before this one is
                // committed and answered first.
                let (done, closed) = oneshot::channel();
                if writer.send(WriterMsg::Close(done)).await.is_ok() {
                    let _ = closed.await;
                }
                read.close().await;
                write_pool.close().await;
            }
            Inner::Postgres { pool } => pool.close().await,
        }
    }
}

/// The tables searches read, whose planner statistics matter (PostgreSQL): the resources
/// and the search index.
fn searched_tables() -> impl Iterator<Item = &'static str> {
    ["resource", "resource_version"]
        .into_iter()
        .chain(resource::INDEX_TABLES)
}

/// Answers a write once (the first answer wins).
fn send<T>(slot: &std::sync::Mutex<Option<oneshot::Sender<Result<T>>>>, r: Result<T>) {
    if let Ok(mut slot) = slot.lock()
        && let Some(tx) = slot.take()
    {
        let _ = tx.send(r);
    }
}

/// Runs one job inside the transaction its caller began.
async fn run_postgres_job(db: &mut Db, job: Job) {
    match AssertUnwindSafe(job(db)).catch_unwind().await {
        Ok((true, finish)) => {
            let commit = db.raw("COMMIT").await;
            finish(commit);
        }
        Ok((false, finish)) => {
            let _ = db.raw("ROLLBACK").await;
            finish(Ok(()));
        }
        Err(_) => {
            tracing::error!("panic inside a write job; rolled back");
            let _ = db.raw("ROLLBACK").await;
        }
    }
}

/// The SQLite group-commit writer. See the module documentation.
async fn sqlite_writer(
    mut db: Db,
    mut inbox: mpsc::Receiver<WriterMsg>,
    max_group: usize,
    cache: Arc<cache::ResourceCache>,
    (wake_checkpointer, checkpoints): (mpsc::Sender<()>, tokio::task::JoinHandle<()>),
) {
    let mut group: Vec<Job> = Vec::with_capacity(max_group);
    let mut finishes: Vec<Finish> = Vec::with_capacity(max_group);
    let mut close: Option<oneshot::Sender<()>> = None;
    while close.is_none() {
        match inbox.recv().await {
            Some(WriterMsg::Job(job)) => group.push(job),
            Some(WriterMsg::Close(done)) => close = Some(done),
            None => break,
        }
        while close.is_none() && group.len() < max_group {
            match inbox.try_recv() {
                Ok(WriterMsg::Job(job)) => group.push(job),
                Ok(WriterMsg::Close(done)) => close = Some(done),
                Err(_) => break,
            }
        }
        if group.is_empty() {
            continue;
        }
        let size = group.len();
        let started = std::time::Instant::now();
        let result = run_group(&mut db, &mut group, &mut finishes).await;
        tracing::debug!(
            jobs = size,
            micros = started.elapsed().as_micros() as u64,
            ok = result.is_ok(),
            "group committed"
        );
        if result.is_err() {
            let _ = db.raw("ROLLBACK").await;
        } else {
            // Only committed versions reach the read cache.
            for (ty, id, c) in db.written.drain(..) {
                cache.committed(&ty, &id, c);
            }
            let _ = wake_checkpointer.try_send(());
        }
        db.written.clear();
        for finish in finishes.drain(..) {
            finish(result.clone());
        }
    }
    drop(wake_checkpointer);
    if checkpoints.await.is_err() {
        tracing::warn!("the checkpoint task failed");
    }
    // A clean close leaves no WAL behind; the connection returns to its pool when dropped.
    if let Err(e) = db.raw("PRAGMA wal_checkpoint(TRUNCATE)").await {
        tracing::warn!(error = %e, "WAL checkpoint at close failed");
    }
    drop(db);
    if let Some(done) = close {
        let _ = done.send(());
    }
    tracing::debug!("SQLite writer stopped");
}

/// Copies committed WAL frames into the database file on a connection of its own, so the
/// writer never stalls on a checkpoint (one that the writer ran itself took 1.8 s of a bulk
/// import). Woken after commits; checkpoints at most every 250 ms, `PASSIVE` so that neither
/// the writer nor readers wait for it. Ends when the writer drops its sender.
async fn checkpointer(pool: sqlx::SqlitePool, mut woken: mpsc::Receiver<()>) {
    while woken.recv().await.is_some() {
        tokio::time::sleep(Duration::from_millis(250)).await;
        while woken.try_recv().is_ok() {}
        if let Err(e) = sqlx::query("PRAGMA wal_checkpoint(PASSIVE)")
            .execute(&pool)
            .await
        {
            tracing::warn!(error = %e, "WAL checkpoint failed");
        }
    }
    pool.close().await;
}

async fn run_group(db: &mut Db, group: &mut Vec<Job>, finishes: &mut Vec<Finish>) -> Result<()> {
    if let Err(e) = db.raw("BEGIN IMMEDIATE").await {
        // Dropping the jobs unanswered makes each caller report the write as failed.
        tracing::error!(error = %e, "cannot begin a write transaction");
        group.clear();
        return Err(e);
    }
    // Until a job has succeeded, the transaction holds nothing but the running job's
    // writes: that job needs no savepoint (a savepoint copies every page the job touches
    // into the statement journal), since undoing it is undoing the transaction.
    let mut first = true;
    for job in group.drain(..) {
        // The job's SAVEPOINT opens with its first write (inside `Db::flush`), so a job
        // costs no round trips of its own for it; see `resource::Savepoint`.
        if db.savepoint == resource::Savepoint::Open {
            db.release_pending = true;
        }
        db.savepoint = if first {
            resource::Savepoint::Off
        } else {
            resource::Savepoint::Wanted
        };
        let mark = db.written.len();
        let (ok, finish) = match AssertUnwindSafe(job(db)).catch_unwind().await {
            Ok((ok, finish)) => (ok, Some(finish)),
            Err(_) => {
                tracing::error!("panic inside a write job; rolled back");
                db.pending_index.clear();
                db.pending = Default::default();
                (false, None)
            }
        };
        finishes.extend(finish);
        if std::mem::take(&mut db.group_failed) {
            db.savepoint = resource::Savepoint::Off;
            return Err(crate::error::FhirError::new(
                crate::error::ErrorKind::Unavailable,
                "the database failed to write; nothing was committed, retry",
            ));
        }
        if ok {
            first = false;
            continue;
        }
        db.written.truncate(mark);
        if first {
            // Whatever it wrote goes with the transaction; the next job starts a new one.
            let _ = db.raw("ROLLBACK").await;
            db.raw("BEGIN IMMEDIATE").await?;
        } else if db.savepoint == resource::Savepoint::Open {
            db.raw("ROLLBACK TO job; RELEASE job").await?;
        }
        db.savepoint = resource::Savepoint::Off;
    }
    db.savepoint = resource::Savepoint::Off;
    db.release_pending = false;
    let commit = std::time::Instant::now();
    let r = db.raw("COMMIT").await;
    tracing::trace!(micros = commit.elapsed().as_micros() as u64, "COMMIT");
    r
}

#[cfg(test)]
mod tests {
    use super::{Arg, Durability, Store, StoreConfig, Ty};
    use crate::error::FhirError;

    /// Three jobs committed as one group: the first fails after writing (it has no
    /// savepoint, so the transaction is rolled back and begun again), the second succeeds,
    /// the third fails after writing (its savepoint is rolled back). Only the second's row
    /// may be committed.
    #[tokio::test(flavor = "current_thread")]
    async fn a_failed_job_leaves_nothing_in_its_group() {
        let dir = tempfile::tempdir().expect("temporary directory");
        let store = Store::open(&StoreConfig {
            url: format!("sqlite://{}/group.db", dir.path().display()),
            durability: Durability::Relaxed,
            pool_size: 2,
            group_commit_max: 16,
            cache_bytes: 1 << 20,
        })
        .await
        .expect("store");
        let job = |name: &'static str, fail: bool| {
            let store = store.clone();
            async move {
                store
                    .write(move |db| {
                        Box::pin(async move {
                            db.execute(
                                "INSERT INTO store_task (name) VALUES ($1)",
                                &[Arg::Text(name.into())],
                            )
                            .await?;
                            if fail {
                                return Err(FhirError::invalid(format!("{name} fails")));
                            }
                            Ok(())
                        })
                    })
                    .await
            }
        };
        // On this single-threaded runtime all three are queued before the writer runs.
        let (a, b, c) = tokio::join!(job("a", true), job("b", false), job("c", true));
        assert!(a.is_err() && b.is_ok() && c.is_err(), "{a:?} {b:?} {c:?}");
        let mut db = store.reader().await.expect("reader");
        let rows = db
            .fetch_all(
                "SELECT name FROM store_task ORDER BY name",
                &[],
                &[Ty::Text],
            )
            .await
            .expect("rows");
        let names: Vec<String> = rows
            .into_iter()
            .filter_map(|r| r.into_iter().next()?.text())
            .collect();
        assert_eq!(names, ["b"]);
        drop(db);
        store.close().await;
    }
}
