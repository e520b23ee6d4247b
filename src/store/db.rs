//! One database handle over SQLite or PostgreSQL. Only the store knows sqlx; every query in
//! the server is written once, with `$1`-style placeholders that both dialects accept
//! (SQLite reads `$N` as a named parameter numbered by first use, so the builders below
//! always number arguments in the order they first appear).

use sqlx::pool::PoolConnection;
// `AssertSqlSafe`: every SQL text is built in this crate from constants and `SqlBuilder`
// placeholders; client values are only ever bound as arguments.
use sqlx::{AssertSqlSafe, Postgres, Row, Sqlite};

use crate::error::Result;

/// A pooled connection of either backend.
pub enum Conn {
    Sqlite(PoolConnection<Sqlite>),
    Pg(PoolConnection<Postgres>),
}

/// A database handle: a connection plus the search-index rows written by the current job
/// but not yet sent (see [`Db::flush`]). Owned, so that a write job can borrow it for
/// the duration of one transaction without lifetime parameters leaking into the job type.
pub struct Db {
    pub conn: Conn,
    pub(crate) pending_index: Vec<crate::store::resource::PendingIndex>,
    /// Versions written in the current transaction, for the read cache once committed.
    pub(crate) written: Vec<(String, String, crate::store::cache::Cached)>,
    /// Rows waiting for [`Db::flush`]; the SQLite writer's id allocator.
    pub(crate) pending: crate::store::resource::Pending,
    pub(crate) alloc: Option<crate::store::resource::IdAlloc>,
    /// PostgreSQL: ids this job has taken from the shared sequences and not used yet.
    pub(crate) reserved: crate::store::resource::Reserved,
    /// PostgreSQL: how this job holds the write gate.
    pub(crate) gate: crate::store::resource::Gate,
    pub(crate) savepoint: crate::store::resource::Savepoint,
    /// The previous job's savepoint is still open and is released by the next flush.
    pub(crate) release_pending: bool,
    /// A write failed outside any savepoint: the writer must roll back the whole group.
    pub(crate) group_failed: bool,
    /// SQLite writer only: current rows (and bodies) a job read ahead in one query with
    /// [`Db::prefetch`]; `None` records a resource that does not exist. An entry leaves when
    /// the job writes that resource; the whole map is cleared when the job ends.
    pub(crate) prefetched: std::collections::HashMap<(String, String), Option<Prefetched>>,
}

/// A current row read ahead: the row, the version's method and body.
pub(crate) type Prefetched = (crate::store::resource::Current, String, Option<String>);

/// A bound argument.
#[derive(Debug, Clone, PartialEq)]
pub enum Arg {
    Text(String),
    OptText(Option<String>),
    Int(i64),
    Real(f64),
}

impl Arg {
    /// The argument as a JSON value (for rows sent to PostgreSQL as one JSON array), its
    /// text moved, not copied. JSON has no NaN or infinity: such a number becomes `null`.
    pub fn into_json(self) -> serde_json::Value {
        use serde_json::Value;
        match self {
            Arg::Text(s) => Value::String(s),
            Arg::OptText(s) => s.map_or(Value::Null, Value::String),
            Arg::Int(i) => Value::from(i),
            Arg::Real(f) => serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number),
        }
    }
}

impl From<i64> for Arg {
    fn from(i: i64) -> Arg {
        Arg::Int(i)
    }
}

impl From<&String> for Arg {
    fn from(s: &String) -> Arg {
        Arg::Text(s.clone())
    }
}

/// The declared type of a result column, so rows decode without guessing.
#[derive(Debug, Clone, Copy)]
pub enum Ty {
    Int,
    Text,
    OptText,
    Real,
}

/// A decoded column value.
#[derive(Debug, Clone, PartialEq)]
pub enum Val {
    Int(i64),
    Text(String),
    Null,
    Real(f64),
}

impl Val {
    pub fn int(&self) -> i64 {
        match self {
            Val::Int(i) => *i,
            Val::Real(f) => *f as i64,
            _ => 0,
        }
    }
    pub fn text(self) -> Option<String> {
        match self {
            Val::Text(s) => Some(s),
            _ => None,
        }
    }
}

macro_rules! bind_args {
    ($q:expr, $args:expr) => {{
        let mut q = $q;
        for a in $args {
            q = match a {
                Arg::Text(s) => q.bind(s.as_str()),
                Arg::OptText(s) => q.bind(s.as_deref()),
                Arg::Int(i) => q.bind(*i),
                Arg::Real(f) => q.bind(*f),
            };
        }
        q
    }};
}

macro_rules! decode_row {
    ($row:expr, $shape:expr) => {{
        let row = $row;
        let mut out = Vec::with_capacity($shape.len());
        for (i, ty) in $shape.iter().enumerate() {
            out.push(match ty {
                Ty::Int => row
                    .try_get::<Option<i64>, _>(i)?
                    .map_or(Val::Null, Val::Int),
                Ty::Text | Ty::OptText => row
                    .try_get::<Option<String>, _>(i)?
                    .map_or(Val::Null, Val::Text),
                Ty::Real => row
                    .try_get::<Option<f64>, _>(i)?
                    .map_or(Val::Null, Val::Real),
            });
        }
        out
    }};
}

impl Db {
    fn new(conn: Conn) -> Db {
        Db {
            conn,
            pending_index: Vec::new(),
            written: Vec::new(),
            pending: Default::default(),
            alloc: None,
            reserved: Default::default(),
            gate: Default::default(),
            savepoint: Default::default(),
            release_pending: false,
            group_failed: false,
            prefetched: Default::default(),
        }
    }

    pub fn sqlite(c: PoolConnection<Sqlite>) -> Db {
        Db::new(Conn::Sqlite(c))
    }

    pub fn pg(c: PoolConnection<Postgres>) -> Db {
        Db::new(Conn::Pg(c))
    }

    pub fn is_postgres(&self) -> bool {
        matches!(self.conn, Conn::Pg(_))
    }

    /// Runs a statement, returning the number of rows affected.
    pub async fn execute(&mut self, sql: &str, args: &[Arg]) -> Result<u64> {
        self.flush().await?;
        // A job's first write may be this statement: its savepoint must hold it. Opened by
        // a statement of its own: sent together, SQLite would count for the SAVEPOINT the
        // rows changed by the connection's previous statement (another job's, in a group
        // commit), and the sum would no longer be what this statement changed.
        let savepoint = self.savepoint_sql();
        if !savepoint.is_empty() {
            self.execute_unflushed(&savepoint, &[]).await?;
        }
        self.execute_unflushed(sql, args).await
    }

    /// Runs SQL (on SQLite possibly several statements) without flushing buffered writes.
    pub(crate) async fn execute_unflushed(&mut self, sql: &str, args: &[Arg]) -> Result<u64> {
        Ok(match &mut self.conn {
            Conn::Sqlite(c) => bind_args!(sqlx::query(AssertSqlSafe(sql)), args)
                .execute(&mut **c)
                .await?
                .rows_affected(),
            Conn::Pg(c) => bind_args!(sqlx::query(AssertSqlSafe(sql)), args)
                .execute(&mut **c)
                .await?
                .rows_affected(),
        })
    }

    /// [`Db::execute_unflushed`] taking its arguments by value: SQLite binds each `String`
    /// as it is instead of copying it (for the many index rows of a write).
    pub(crate) async fn execute_owned(&mut self, sql: &str, args: Vec<Arg>) -> Result<u64> {
        let Conn::Sqlite(c) = &mut self.conn else {
            return self.execute_unflushed(sql, &args).await;
        };
        let mut q = sqlx::query(AssertSqlSafe(sql));
        for a in args {
            q = match a {
                Arg::Text(s) => q.bind(s),
                Arg::OptText(s) => q.bind(s),
                Arg::Int(i) => q.bind(i),
                Arg::Real(f) => q.bind(f),
            };
        }
        Ok(q.execute(&mut **c).await?.rows_affected())
    }

    /// Runs SQL without arguments, possibly several statements (migrations, BEGIN, ...).
    pub async fn raw(&mut self, sql: &str) -> Result<()> {
        match &mut self.conn {
            Conn::Sqlite(c) => {
                sqlx::raw_sql(AssertSqlSafe(sql)).execute(&mut **c).await?;
            }
            Conn::Pg(c) => {
                sqlx::raw_sql(AssertSqlSafe(sql)).execute(&mut **c).await?;
            }
        }
        Ok(())
    }

    pub async fn fetch_all(
        &mut self,
        sql: &str,
        args: &[Arg],
        shape: &[Ty],
    ) -> Result<Vec<Vec<Val>>> {
        self.flush().await?;
        self.fetch_all_unflushed(sql, args, shape).await
    }

    /// Rows of a search query. On PostgreSQL the statement is not kept prepared, so it is
    /// planned with the values bound this time: a cached generic plan cannot see that one
    /// reference matches 100 rows and one code 15,000, and drove searches through the large
    /// side (measured: 571 ms against 2 ms).
    pub async fn search_rows(
        &mut self,
        sql: &str,
        args: &[Arg],
        shape: &[Ty],
    ) -> Result<Vec<Vec<Val>>> {
        self.flush().await?;
        let Conn::Pg(c) = &mut self.conn else {
            return self.fetch_all_unflushed(sql, args, shape).await;
        };
        let mut out = Vec::new();
        for row in bind_args!(sqlx::query(AssertSqlSafe(sql)).persistent(false), args)
            .fetch_all(&mut **c)
            .await?
        {
            out.push(decode_row!(row, shape));
        }
        Ok(out)
    }

    /// The first column of a search query's first row (see [`Db::search_rows`]).
    pub async fn search_int(&mut self, sql: &str, args: &[Arg]) -> Result<i64> {
        Ok(self
            .search_rows(sql, args, &[Ty::Int])
            .await?
            .into_iter()
            .next()
            .and_then(|r| r.into_iter().next())
            .map_or(0, |v| v.int()))
    }

    /// Reads rows of resource `ty/id` only: the job's buffered writes are flushed first only
    /// if they touch that resource (other buffered rows cannot change the answer). This keeps
    /// a transaction of many conditional updates from flushing before every entry.
    pub async fn fetch_resource_rows(
        &mut self,
        ty: &str,
        id: &str,
        sql: &str,
        args: &[Arg],
        shape: &[Ty],
    ) -> Result<Vec<Vec<Val>>> {
        if self.pending.touches(ty, id) {
            self.flush().await?;
        }
        self.fetch_all_unflushed(sql, args, shape).await
    }

    pub(crate) async fn fetch_all_unflushed(
        &mut self,
        sql: &str,
        args: &[Arg],
        shape: &[Ty],
    ) -> Result<Vec<Vec<Val>>> {
        let mut out = Vec::new();
        match &mut self.conn {
            Conn::Sqlite(c) => {
                for row in bind_args!(sqlx::query(AssertSqlSafe(sql)), args)
                    .fetch_all(&mut **c)
                    .await?
                {
                    out.push(decode_row!(row, shape));
                }
            }
            Conn::Pg(c) => {
                for row in bind_args!(sqlx::query(AssertSqlSafe(sql)), args)
                    .fetch_all(&mut **c)
                    .await?
                {
                    out.push(decode_row!(row, shape));
                }
            }
        }
        Ok(out)
    }

    /// The first row, if any. Implemented with `fetch_all` on purpose: stepping a SQLite
    /// statement to completion ends its statement transaction. A statement left active
    /// (as `fetch_optional` leaves it in sqlx's statement cache) keeps a statement journal
    /// open, and every later write then opens its own at a deeper savepoint level; that cost
    /// 40% of the server's CPU in the ingest benchmark.
    pub async fn fetch_optional(
        &mut self,
        sql: &str,
        args: &[Arg],
        shape: &[Ty],
    ) -> Result<Option<Vec<Val>>> {
        Ok(self.fetch_all(sql, args, shape).await?.into_iter().next())
    }

    pub async fn fetch_one_int(&mut self, sql: &str, args: &[Arg]) -> Result<i64> {
        Ok(self
            .fetch_optional(sql, args, &[Ty::Int])
            .await?
            .and_then(|r| r.into_iter().next())
            .map_or(0, |v| v.int()))
    }
}

/// Builds SQL with numbered placeholders in first-use order.
#[derive(Default, Debug)]
pub struct SqlBuilder {
    pub sql: String,
    pub args: Vec<Arg>,
    /// The database plans from statistics (PostgreSQL): the SQL leaves the plan to it.
    /// Otherwise (SQLite, which plans without statistics) search SQL is shaped to steer
    /// the plan (see `search::query`). Either way the SQL means the same.
    pub statistics: bool,
}

impl SqlBuilder {
    pub fn new(sql: &str) -> Self {
        SqlBuilder {
            sql: sql.to_string(),
            args: Vec::new(),
            statistics: false,
        }
    }
    pub fn push(&mut self, sql: &str) -> &mut Self {
        self.sql.push_str(sql);
        self
    }
    /// Appends a placeholder for `arg`.
    pub fn bind(&mut self, arg: Arg) -> &mut Self {
        self.args.push(arg);
        self.sql.push('$');
        self.sql.push_str(&self.args.len().to_string());
        self
    }
    pub fn text(&mut self, s: impl Into<String>) -> &mut Self {
        self.bind(Arg::Text(s.into()))
    }
    pub fn int(&mut self, i: i64) -> &mut Self {
        self.bind(Arg::Int(i))
    }
    /// Appends `(a, b, ...)`, one placeholder per item, for `IN`.
    pub fn list<I, A>(&mut self, items: I) -> &mut Self
    where
        I: IntoIterator<Item = A>,
        A: Into<Arg>,
    {
        self.sql.push('(');
        for (i, item) in items.into_iter().enumerate() {
            if i > 0 {
                self.sql.push_str(", ");
            }
            self.bind(item.into());
        }
        self.sql.push(')');
        self
    }
}
