//! Application start-up and shutdown: opens the store, loads the definitions, binds the
//! listener (port 0 works: tests read [`Application::port`]) and serves until a signal.

use std::future::Future;
use std::sync::Arc;

use tokio::net::TcpListener;

use crate::config::Settings;
use crate::definitions::Definitions;
use crate::interaction::{Ctx, Limits, SharedCtx};
use crate::store::{Store, StoreConfig};

pub struct Application {
    listener: TcpListener,
    /// HTTPS (`--tls-cert`).
    tls: Option<tokio_rustls::TlsAcceptor>,
    ctx: SharedCtx,
    port: u16,
    mllp: Option<(TcpListener, crate::mllp::MllpConfig)>,
    mllp_port: Option<u16>,
    mqtt: Option<crate::mqtt::MqttConfig>,
}

/// Opens the store and builds the shared context (also used by `import`).
pub async fn context(settings: &Settings, base: String) -> Result<SharedCtx, String> {
    let defs = Definitions::get()?;
    let store = Store::open(&StoreConfig {
        url: settings.database.clone(),
        durability: settings.durability,
        pool_size: settings.db_pool_size,
        group_commit_max: settings.group_commit_max,
        cache_bytes: settings.cache_mib << 20,
    })
    .await?;
    let templates = match &settings.device_mappings {
        Some(dir) => crate::devices::Templates::from_dir(dir),
        None => crate::devices::Templates::shipped(),
    }
    .map_err(|e| format!("device mapping templates: {e}"))?;
    let ctx = Arc::new(Ctx {
        devices: crate::interaction::device_data::DeviceFeeds::new(
            templates,
            settings.devices_auto_create,
            settings.device_queue,
        ),
        store,
        defs,
        base,
        limits: Limits {
            max_body_bytes: settings.max_body_bytes,
            max_bundle_entries: settings.max_bundle_entries,
            default_count: settings.default_count,
            max_count: settings.max_count,
        },
        conditional_delete: settings.conditional_delete,
        search_indexing: settings.search_indexing,
        registry: std::sync::RwLock::new(Arc::new(defs.registry.clone())),
        registry_generation: Default::default(),
        auth: crate::auth::Auth::new(
            settings.auth,
            settings.audit_reads,
            settings.audit_read_window,
            settings.oidc.clone(),
        ),
        audit: Default::default(),
    });
    let custom = crate::interaction::reindex::load_active(&ctx)
        .await
        .map_err(|e| format!("loading the active SearchParameters: {e}"))?;
    if custom > 0 {
        tracing::info!(custom, "custom SearchParameters in force");
    }
    crate::interaction::reindex::rebuild_if_flagged(&ctx)
        .await
        .map_err(|e| format!("rebuilding the search index: {e}"))?;
    Ok(ctx)
}

impl Application {
    pub async fn build(settings: Settings) -> Result<Application, String> {
        settings.check_exposure()?;
        let tls = match &settings.tls {
            Some(files) => Some(crate::tls::acceptor(files)?),
            None => None,
        };
        let listener = TcpListener::bind(settings.listen)
            .await
            .map_err(|e| format!("cannot listen on {}: {e}", settings.listen))?;
        let addr = listener.local_addr().map_err(|e| e.to_string())?;
        let scheme = if tls.is_some() { "https" } else { "http" };
        let base = settings
            .base_url
            .clone()
            .unwrap_or_else(|| format!("{scheme}://{addr}/fhir"));
        let ctx = context(&settings, base).await?;
        if ctx.auth.enabled() {
            ctx.auth
                .init(&ctx.store)
                .await
                .map_err(|e| format!("authorization keys: {}", e.diagnostics()))?;
        }
        // Planner statistics may be missing or stale (e.g. autovacuum off): refresh them in
        // the background rather than delay the start.
        let for_stats = ctx.clone();
        tokio::spawn(async move {
            if let Err(e) = for_stats.store.analyze_if_stale().await {
                tracing::warn!(error = %e, "refreshing planner statistics failed");
            }
        });
        crate::interaction::hl7v2::terminology()?;
        crate::interaction::hl7v2::publish_concept_maps(&ctx).await?;
        let mllp = match settings.mllp_listen {
            Some(addr) => {
                let l = TcpListener::bind(addr)
                    .await
                    .map_err(|e| format!("cannot listen for MLLP on {addr}: {e}"))?;
                let tls = match &settings.mllp_tls {
                    Some(files) => Some(crate::tls::acceptor(files)?),
                    None => None,
                };
                let config = crate::mllp::MllpConfig {
                    max_message_bytes: settings.mllp_max_bytes,
                    idle: std::time::Duration::from_secs(settings.mllp_idle_secs),
                    tls,
                };
                Some((l, config))
            }
            None => None,
        };
        let mllp_port = mllp
            .as_ref()
            .and_then(|(l, _)| l.local_addr().ok())
            .map(|a| a.port());
        let report = &ctx.defs.search_report;
        tracing::info!(auth = ?settings.auth, tls = settings.tls.is_some(), "access");
        tracing::info!(
            resource_types = ctx.defs.resource_types.len(),
            search_parameters = report.total,
            evaluable = report.evaluable,
            backend = ctx.store.backend_name(),
            "definitions loaded"
        );
        Ok(Application {
            listener,
            tls,
            port: addr.port(),
            ctx,
            mllp,
            mllp_port,
            mqtt: settings.mqtt.clone(),
        })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The MLLP listener's port, when `--mllp-listen` was given.
    pub fn mllp_port(&self) -> Option<u16> {
        self.mllp_port
    }

    /// The shared context (tests register OAuth clients through it).
    pub fn context(&self) -> SharedCtx {
        self.ctx.clone()
    }

    pub fn base_url(&self) -> &str {
        &self.ctx.base
    }

    /// Serves until `shutdown` completes; in-flight requests finish, then the store closes.
    pub async fn run_until(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), String> {
        tracing::info!(base = %self.ctx.base, "serving FHIR R4");
        let app = crate::rest::service(self.ctx.clone());
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let mllp = self.mllp.map(|(listener, config)| {
            tracing::info!(addr = ?listener.local_addr().ok(), "accepting HL7 v2 over MLLP");
            tokio::spawn(crate::mllp::serve(
                listener,
                self.ctx.clone(),
                config,
                stop_rx.clone(),
            ))
        });
        let mqtt = match &self.mqtt {
            Some(c) => {
                let options = crate::mqtt::options(c)?;
                tracing::info!(url = %c.url, topics = ?c.topics, "subscribing to device data over MQTT");
                Some(tokio::spawn(crate::mqtt::run(
                    self.ctx.clone(),
                    c.clone(),
                    options,
                    stop_rx.clone(),
                )))
            }
            None => None,
        };
        // The audit writer stops after the HTTP server, so in-flight requests' events land.
        let (audit_stop, audit_stop_rx) = tokio::sync::watch::channel(false);
        let audit = if self.ctx.auth.enabled() {
            self.ctx.audit.take_receiver().map(|rx| {
                tokio::spawn(crate::interaction::audit::run(
                    self.ctx.clone(),
                    rx,
                    audit_stop_rx,
                ))
            })
        } else {
            None
        };
        let stop = async move {
            shutdown.await;
            let _ = stop_tx.send(true);
        };
        let app = axum::ServiceExt::<axum::extract::Request>::into_make_service_with_connect_info::<
            crate::tls::PeerAddr,
        >(app);
        let result = match self.tls {
            Some(acceptor) => {
                let listener = crate::tls::HttpsListener::new(self.listener, acceptor)
                    .map_err(|e| format!("HTTPS listener: {e}"))?;
                axum::serve(listener, app)
                    .with_graceful_shutdown(stop)
                    .await
            }
            None => {
                axum::serve(self.listener, app)
                    .with_graceful_shutdown(stop)
                    .await
            }
        }
        .map_err(|e| format!("server error: {e}"));
        if let Some(m) = mllp {
            let _ = m.await;
        }
        if let Some(m) = mqtt {
            let _ = m.await;
        }
        let _ = audit_stop.send(true);
        if let Some(a) = audit {
            let _ = a.await;
        }
        result?;
        self.ctx.store.close().await;
        tracing::info!("stopped; database closed");
        Ok(())
    }
}

/// Completes on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    tracing::info!("shutdown requested; finishing in-flight requests");
}
