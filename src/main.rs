//! The `iomt-fhir` binary: parses the command line and runs a command.

use std::process::ExitCode;
use std::sync::atomic::Ordering;

use clap::Parser;
use iomt_fhir::app::{Application, context, shutdown_signal};
use iomt_fhir::config::{
    Cli, ClientsCommand, Command, DevicesCommand, Hl7Command, KeysCommand, ServerArgs, Settings,
    UsersCommand,
};
use iomt_fhir::error::FhirError;
use iomt_fhir::interaction::SharedCtx;

/// mimalloc instead of the system allocator: on the device-feed path (many short-lived JSON
/// values and strings per reading) glibc's malloc/free took ~45 % of the request threads'
/// CPU, much of it consolidating and unlinking free chunks (BENCHMARKS.md, Device feeds).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The context of a command that works on the database without serving (`import`, `hl7`,
/// `devices`, `reindex`): the settings a server with these options would use.
async fn offline_context(
    server: &ServerArgs,
    config: Option<&std::path::PathBuf>,
) -> Result<SharedCtx, String> {
    let settings = Settings::resolve(server, config)?;
    let base = settings
        .base_url
        .clone()
        .unwrap_or_else(|| format!("http://{}/fhir", settings.listen));
    context(&settings, base).await
}

/// What a command prints when it fails: the first issue's diagnostics.
fn first_diagnostic(e: FhirError) -> String {
    e.issues
        .first()
        .map(|i| i.diagnostics.clone())
        .unwrap_or_default()
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,sqlx=warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("iomt-fhir: cannot start the runtime: {e}");
            return ExitCode::from(2);
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("iomt-fhir: {e}");
            ExitCode::from(2)
        }
    }
}

async fn run(cli: Cli) -> Result<ExitCode, String> {
    match cli.command {
        Command::Serve(args) => {
            let settings = Settings::resolve(&args, cli.config.as_ref())?;
            let app = Application::build(settings).await?;
            app.run_until(shutdown_signal()).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Import {
            server,
            paths,
            jobs,
        } => {
            let ctx = offline_context(&server, cli.config.as_ref()).await?;
            let started = std::time::Instant::now();
            let summary = iomt_fhir::import::run(ctx.clone(), &paths, jobs).await?;
            if let Err(e) = ctx.store.vacuum_analyze().await {
                eprintln!("iomt-fhir: refreshing planner statistics: {e}");
            }
            ctx.store.close().await;
            let written = summary.written.load(Ordering::Relaxed);
            let secs = started.elapsed().as_secs_f64();
            let failures = summary
                .failures
                .lock()
                .map(|f| f.clone())
                .unwrap_or_default();
            println!(
                "imported {written} resources from {} files in {secs:.1} s ({:.0} resources/s); {} failures",
                summary.files,
                written as f64 / secs.max(1e-9),
                failures.len()
            );
            for f in &failures {
                println!("  failed: {f}");
            }
            Ok(if failures.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        Command::Hl7(hl7) => {
            let server = match &hl7 {
                Hl7Command::List { server, .. } | Hl7Command::Replay { server, .. } => server,
            };
            let ctx = offline_context(server, cli.config.as_ref()).await?;
            let result = match hl7 {
                Hl7Command::List {
                    outcome,
                    after,
                    limit,
                    ..
                } => iomt_fhir::interaction::hl7v2::list(
                    &ctx,
                    outcome.as_deref(),
                    after,
                    limit.max(1),
                )
                .await
                .map(|messages| {
                    for m in messages {
                        println!("{m}");
                    }
                }),
                Hl7Command::Replay { id, outcome, .. } => {
                    iomt_fhir::interaction::hl7v2::replay(&ctx, id, outcome.as_deref())
                        .await
                        .map(|results| {
                            for (id, r) in &results {
                                println!(
                                    "message {id}: {:?}{}{}",
                                    r.code,
                                    if r.duplicate {
                                        " (duplicate, nothing written)"
                                    } else {
                                        ""
                                    },
                                    r.error
                                        .as_deref()
                                        .map(|e| format!(": {e}"))
                                        .unwrap_or_default()
                                );
                            }
                            println!("replayed {} messages", results.len());
                        })
                }
            };
            ctx.store.close().await;
            result.map_err(first_diagnostic)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Devices(cmd) => {
            let server = match &cmd {
                DevicesCommand::Errors { server, .. } | DevicesCommand::Replay { server, .. } => {
                    server
                }
            };
            let ctx = offline_context(server, cli.config.as_ref()).await?;
            let result = match cmd {
                DevicesCommand::Errors { limit, .. } => {
                    iomt_fhir::interaction::device_data::dead_letters(&ctx, false, 0, limit.max(1))
                        .await
                        .map(|messages| {
                            for m in messages {
                                println!("{m}");
                            }
                        })
                }
                DevicesCommand::Replay { id, .. } => {
                    iomt_fhir::interaction::device_data::replay(&ctx, id)
                        .await
                        .map(|(n, o)| {
                            for (i, why) in &o.rejected {
                                println!("message {i}: still not mapped: {why}");
                            }
                            println!(
                                "replayed {n} messages: {} mapped, {} still failing",
                                o.mapped,
                                o.rejected.len()
                            );
                        })
                }
            };
            ctx.store.close().await;
            result.map_err(first_diagnostic)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Clients(cmd) => {
            let server = match &cmd {
                ClientsCommand::Add { server, .. }
                | ClientsCommand::List { server }
                | ClientsCommand::Remove { server, .. } => server,
            };
            let ctx = offline_context(server, cli.config.as_ref()).await?;
            let result = clients(&ctx, cmd).await;
            ctx.store.close().await;
            result?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Users(UsersCommand::Add {
            server,
            username,
            password,
            fhir_user,
        }) => {
            let ctx = offline_context(&server, cli.config.as_ref()).await?;
            let result =
                iomt_fhir::auth::users::add(&ctx.store, &username, &password, &fhir_user).await;
            ctx.store.close().await;
            result.map_err(first_diagnostic)?;
            println!("user {username} ({fhir_user}) can sign in");
            Ok(ExitCode::SUCCESS)
        }
        Command::Keys(KeysCommand::Rotate { server }) => {
            let ctx = offline_context(&server, cli.config.as_ref()).await?;
            let result = iomt_fhir::auth::keys::add(&ctx.store).await;
            ctx.store.close().await;
            println!("new signing key {}", result.map_err(first_diagnostic)?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Launch {
            server,
            patient,
            encounter,
        } => {
            let ctx = offline_context(&server, cli.config.as_ref()).await?;
            let result = iomt_fhir::auth::authorize::mint_launch(
                &ctx,
                patient.as_deref(),
                encounter.as_deref(),
            )
            .await;
            ctx.store.close().await;
            println!("{}", result.map_err(first_diagnostic)?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Reindex { server, types } => {
            let ctx = offline_context(&server, cli.config.as_ref()).await?;
            let bar = indicatif::ProgressBar::new(0);
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "{bar:40} {pos}/{len} resources  {per_sec}",
                )
                .map_err(|e| e.to_string())?,
            );
            let types = (!types.is_empty()).then_some(types);
            let started = std::time::Instant::now();
            let result =
                iomt_fhir::interaction::reindex::run(&ctx, types.as_deref(), &|done, total| {
                    bar.set_length(total);
                    bar.set_position(done);
                })
                .await;
            bar.finish_and_clear();
            ctx.store.close().await;
            let report = result.map_err(first_diagnostic)?;
            for a in &report.activated {
                println!("activated {a}");
            }
            for (id, reason) in &report.refused {
                println!("refused {id}: {reason}");
            }
            println!(
                "reindexed {} resources in {:.1} s",
                report.resources,
                started.elapsed().as_secs_f64()
            );
            Ok(if report.refused.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
    }
}

/// `iomt-fhir clients add|list|remove`.
async fn clients(ctx: &SharedCtx, cmd: ClientsCommand) -> Result<(), String> {
    use iomt_fhir::auth::{clients, scope};
    match cmd {
        ClientsCommand::Add {
            client_id,
            kind,
            jwks,
            jwks_url,
            secret,
            scopes,
            redirect_uris,
            origins,
            ..
        } => {
            let jwks = match jwks {
                Some(path) => {
                    let text = std::fs::read_to_string(&path)
                        .map_err(|e| format!("{}: {e}", path.display()))?;
                    Some(
                        serde_json::from_str(&text)
                            .map_err(|e| format!("{}: not JSON: {e}", path.display()))?,
                    )
                }
                None => None,
            };
            let scopes = scope::parse_list(&scopes.join(" "))?;
            let client = clients::Client {
                id: client_id.clone(),
                kind,
                secret_hash: secret.as_deref().map(iomt_fhir::auth::token_hash),
                jwks,
                jwks_url,
                scopes,
                redirect_uris,
                origins,
            };
            clients::add(&ctx.store, client)
                .await
                .map_err(first_diagnostic)?;
            println!("registered client {client_id}");
        }
        ClientsCommand::List { .. } => {
            for c in clients::list(&ctx.store).await.map_err(first_diagnostic)? {
                println!("{}", c.to_json());
            }
        }
        ClientsCommand::Remove { client_id, .. } => {
            if clients::remove(&ctx.store, &client_id)
                .await
                .map_err(first_diagnostic)?
            {
                println!("removed client {client_id}; its tokens are revoked");
            } else {
                return Err(format!("no client {client_id:?}"));
            }
        }
    }
    Ok(())
}
