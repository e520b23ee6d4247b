//! `iomt-fhir import`: loads transaction/batch Bundles (JSON) and bulk-data NDJSON files
//! (FHIR R4 bundle.html, Bulk Data Access NDJSON) through the same write path as the REST
//! API: each file becomes Bundle requests handled by `crate::interaction::handle`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use futures_util::StreamExt;
use serde_json::{Map, Value, json};

use crate::interaction::{Body, FhirRequest, Method, RequestBody, SharedCtx, handle};

/// NDJSON lines per transaction. Larger transactions write each B-tree page they touch
/// once for more resources (1M Observations, SQLite: 2,000 imported 12,442 and 11,735
/// resources/s against 10,300 with 500; BENCHMARKS.md).
const NDJSON_CHUNK: usize = 2000;

#[derive(Default)]
pub struct Summary {
    pub files: u64,
    pub written: AtomicU64,
    pub failures: std::sync::Mutex<Vec<String>>,
}

fn collect(paths: &[PathBuf]) -> Result<Vec<PathBuf>, String> {
    let mut out = Vec::new();
    for p in paths {
        if p.is_dir() {
            let mut entries: Vec<PathBuf> = std::fs::read_dir(p)
                .map_err(|e| format!("cannot read {}: {e}", p.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .collect();
            entries.sort();
            out.extend(collect(&entries)?);
        } else if p.is_file() {
            out.push(p.clone());
        } else if !p.exists() {
            return Err(format!("{} does not exist", p.display()));
        }
    }
    Ok(out
        .into_iter()
        .filter(|p| {
            matches!(
                p.extension().and_then(|e| e.to_str()),
                Some("json" | "ndjson")
            )
        })
        .collect())
}

/// Imports every file; returns the summary (the caller prints it).
pub async fn run(ctx: SharedCtx, paths: &[PathBuf], jobs: usize) -> Result<Summary, String> {
    let files = collect(paths)?;
    let bar = indicatif::ProgressBar::new(files.len() as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} files  {msg}")
            .map_err(|e| e.to_string())?,
    );
    let summary = Arc::new(Summary {
        files: files.len() as u64,
        ..Summary::default()
    });
    futures_util::stream::iter(files)
        .map(|file| {
            let (ctx, summary, bar) = (ctx.clone(), summary.clone(), bar.clone());
            async move {
                if let Err(e) = import_file(&ctx, &file, &summary).await
                    && let Ok(mut f) = summary.failures.lock()
                {
                    f.push(format!("{}: {e}", file.display()));
                }
                bar.inc(1);
                bar.set_message(format!(
                    "{} resources",
                    summary.written.load(Ordering::Relaxed)
                ));
            }
        })
        .buffer_unordered(jobs.max(1))
        .collect::<Vec<()>>()
        .await;
    bar.finish();
    Arc::try_unwrap(summary).map_err(|_| "import still running".to_string())
}

async fn import_file(ctx: &SharedCtx, file: &Path, summary: &Arc<Summary>) -> Result<(), String> {
    let text = tokio::fs::read_to_string(file)
        .await
        .map_err(|e| format!("cannot read: {e}"))?;
    if file.extension().and_then(|e| e.to_str()) == Some("ndjson") {
        let mut pipeline = Pipeline::default();
        let mut chunk = Vec::new();
        for (n, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let v: Value =
                serde_json::from_str(line).map_err(|e| format!("line {}: not JSON: {e}", n + 1))?;
            chunk.push(v);
            if chunk.len() == NDJSON_CHUNK {
                pipeline
                    .push(ctx, std::mem::take(&mut chunk), summary)
                    .await?;
            }
        }
        if !chunk.is_empty() {
            pipeline.push(ctx, chunk, summary).await?;
        }
        return pipeline.finish().await;
    }
    let v: Value = serde_json::from_str(&text).map_err(|e| format!("not JSON: {e}"))?;
    let bundle = match (
        v.get("resourceType").and_then(Value::as_str),
        v.get("type").and_then(Value::as_str),
    ) {
        (Some("Bundle"), Some("transaction" | "batch")) => v,
        (Some("Bundle"), _) => as_transaction(
            v.get("entry")
                .and_then(Value::as_array)
                .map(|es| {
                    es.iter()
                        .filter_map(|e| e.get("resource").cloned())
                        .collect()
                })
                .unwrap_or_default(),
        ),
        (Some(_), _) => as_transaction(vec![v]),
        (None, _) => return Err("not a FHIR resource (no resourceType)".into()),
    };
    submit(ctx, bundle, summary).await
}

/// NDJSON chunks of one file, [`IN_FLIGHT`] at a time: while the store writes one chunk,
/// the next ones are validated and prepared (the CPU work happens before a job is queued).
/// A chunk that names a resource of a chunk still in flight waits for it, so a later line
/// always wins over an earlier one.
#[derive(Default)]
struct Pipeline {
    in_flight: std::collections::VecDeque<(ChunkTask, std::collections::HashSet<String>)>,
}

type ChunkTask = tokio::task::JoinHandle<Result<(), String>>;

const IN_FLIGHT: usize = 3;

impl Pipeline {
    async fn push(
        &mut self,
        ctx: &SharedCtx,
        chunk: Vec<Value>,
        summary: &Arc<Summary>,
    ) -> Result<(), String> {
        let keys: std::collections::HashSet<String> = chunk
            .iter()
            .filter_map(|r| {
                Some(format!(
                    "{}/{}",
                    r.get("resourceType")?.as_str()?,
                    r.get("id")?.as_str()?
                ))
            })
            .collect();
        if self.in_flight.iter().any(|(_, k)| !k.is_disjoint(&keys)) {
            self.finish().await?;
        }
        while self.in_flight.len() >= IN_FLIGHT {
            if let Some((oldest, _)) = self.in_flight.pop_front() {
                join(oldest).await?;
            }
        }
        let (c, s) = (ctx.clone(), summary.clone());
        let task = tokio::spawn(async move { submit(&c, as_transaction(chunk), &s).await });
        self.in_flight.push_back((task, keys));
        Ok(())
    }

    async fn finish(&mut self) -> Result<(), String> {
        while let Some((task, _)) = self.in_flight.pop_front() {
            join(task).await?;
        }
        Ok(())
    }
}

async fn join(task: ChunkTask) -> Result<(), String> {
    task.await.map_err(|e| format!("import task failed: {e}"))?
}

/// Wraps resources in a transaction: `PUT Type/id` when they have an id, else `POST Type`.
/// Built from owned values: `json!` with a `Value` inside serialises it into a copy.
fn as_transaction(resources: Vec<Value>) -> Value {
    let entries: Vec<Value> = resources
        .into_iter()
        .map(|r| {
            let ty = r
                .get("resourceType")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string();
            let request = match r.get("id").and_then(Value::as_str) {
                Some(id) => json!({"method": "PUT", "url": format!("{ty}/{id}")}),
                None => json!({"method": "POST", "url": ty}),
            };
            let mut entry = Map::with_capacity(2);
            entry.insert("resource".into(), r);
            entry.insert("request".into(), request);
            Value::Object(entry)
        })
        .collect();
    let mut bundle = Map::with_capacity(3);
    bundle.insert("resourceType".into(), Value::from("Bundle"));
    bundle.insert("type".into(), Value::from("transaction"));
    bundle.insert("entry".into(), Value::Array(entries));
    Value::Object(bundle)
}

async fn submit(ctx: &SharedCtx, bundle: Value, summary: &Summary) -> Result<(), String> {
    let mut req = FhirRequest::new(Method::Post, Vec::new(), Vec::new());
    req.body = RequestBody::Resource(bundle);
    let response = handle(ctx, req).await.map_err(|e| e.diagnostics())?;
    let Body::Raw(text) = response.body else {
        return Ok(());
    };
    let v: Value = serde_json::from_str(&text).map_err(|e| e.to_string())?;
    for (i, e) in v
        .get("entry")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .enumerate()
    {
        let status = e
            .pointer("/response/status")
            .and_then(Value::as_str)
            .unwrap_or_default();
        if status.starts_with('2') {
            summary.written.fetch_add(1, Ordering::Relaxed);
        } else if let Ok(mut f) = summary.failures.lock() {
            let why = e
                .pointer("/response/outcome/issue/0/diagnostics")
                .and_then(Value::as_str)
                .unwrap_or(status);
            f.push(format!("entry {i}: {why}"));
        }
    }
    Ok(())
}
