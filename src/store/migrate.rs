//! Schema migrations, embedded in the binary (one folder per dialect under `migrations/`)
//! and applied at start-up, in order, each in its own transaction.

use super::Db;
use crate::error::Result;

/// (version, name, SQLite text, PostgreSQL text). Add new migrations at the end.
const MIGRATIONS: &[(i64, &str, &str, &str)] = &[
    (
        1,
        "resources",
        include_str!("../../migrations/sqlite/0001_resources.sql"),
        include_str!("../../migrations/postgres/0001_resources.sql"),
    ),
    (
        2,
        "hl7_message",
        include_str!("../../migrations/sqlite/0002_hl7_message.sql"),
        include_str!("../../migrations/postgres/0002_hl7_message.sql"),
    ),
    (
        3,
        "search_scan",
        include_str!("../../migrations/sqlite/0003_search_scan.sql"),
        include_str!("../../migrations/postgres/0003_search_scan.sql"),
    ),
    (
        4,
        "search_parameter_active",
        include_str!("../../migrations/sqlite/0004_search_parameter_active.sql"),
        include_str!("../../migrations/postgres/0004_search_parameter_active.sql"),
    ),
    (
        5,
        "device_message",
        include_str!("../../migrations/sqlite/0005_device_message.sql"),
        include_str!("../../migrations/postgres/0005_device_message.sql"),
    ),
    (
        6,
        "auth",
        include_str!("../../migrations/sqlite/0006_auth.sql"),
        include_str!("../../migrations/postgres/0006_auth.sql"),
    ),
    (
        7,
        "index_param",
        include_str!("../../migrations/sqlite/0007_index_param.sql"),
        include_str!("../../migrations/postgres/0007_index_param.sql"),
    ),
    (
        8,
        "covering_ranges",
        include_str!("../../migrations/sqlite/0008_covering_ranges.sql"),
        include_str!("../../migrations/postgres/0008_covering_ranges.sql"),
    ),
    (
        9,
        "reference_rows_once",
        include_str!("../../migrations/sqlite/0009_reference_rows_once.sql"),
        include_str!("../../migrations/postgres/0009_reference_rows_once.sql"),
    ),
];

pub async fn run(db: &mut Db) -> Result<()> {
    let pg = db.is_postgres();
    if pg {
        // Several server processes may start together against one PostgreSQL: serialise
        // them so each migration runs exactly once.
        db.raw("SELECT pg_advisory_lock(7240133)").await?;
    }
    let result = apply(db, pg).await;
    if pg {
        db.raw("SELECT pg_advisory_unlock(7240133)").await?;
    }
    result
}

async fn apply(db: &mut Db, pg: bool) -> Result<()> {
    db.raw(
        "CREATE TABLE IF NOT EXISTS schema_migration (version BIGINT PRIMARY KEY, name TEXT NOT NULL, applied_at BIGINT NOT NULL)",
    )
    .await?;
    let current = db
        .fetch_one_int(
            "SELECT COALESCE(MAX(version), 0) FROM schema_migration",
            &[],
        )
        .await?;
    for (version, name, sqlite, postgres) in MIGRATIONS {
        if *version <= current {
            continue;
        }
        tracing::info!(version, name, "applying migration");
        db.raw("BEGIN").await?;
        let step = async {
            db.raw(if pg { postgres } else { sqlite }).await?;
            db.execute(
                "INSERT INTO schema_migration (version, name, applied_at) VALUES ($1, $2, $3)",
                &[
                    super::Arg::Int(*version),
                    super::Arg::Text((*name).into()),
                    super::Arg::Int(crate::time::now_micros()),
                ],
            )
            .await
        }
        .await;
        match step {
            Ok(_) => db.raw("COMMIT").await?,
            Err(e) => {
                let _ = db.raw("ROLLBACK").await;
                return Err(e);
            }
        }
    }
    Ok(())
}
