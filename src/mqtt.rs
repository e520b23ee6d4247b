//! The MQTT subscriber for device feeds (MQTT 3.1.1, QoS 1): connects to an existing broker
//! with a persistent session (`clean_session = false`, a fixed client id), so the broker
//! keeps what arrives while the server is down; acknowledges each PUBLISH only after its
//! readings are committed (manual acks), so a crash before the commit means a redelivery,
//! and redeliveries write nothing new (deterministic Observation ids). Reconnects with
//! back-off. Back-pressure: a bounded channel between the network task and the writer, plus
//! the shared device queue; when they are full the network task stops reading.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use rumqttc::{AsyncClient, Event, EventLoop, Incoming, MqttOptions, Publish, QoS, Transport};
use tokio::sync::{mpsc, watch};

use crate::error::ErrorKind;
use crate::interaction::SharedCtx;
use crate::interaction::device_data::{Message, ingest, split_body};

/// Subscriber settings.
#[derive(Debug, Clone)]
pub struct MqttConfig {
    /// `mqtt://host:port` or `mqtts://host:port`.
    pub url: String,
    pub topics: Vec<String>,
    pub client_id: String,
    pub username: Option<String>,
    pub password: Option<String>,
    /// PEM CA certificates for `mqtts://` (the platform's roots are not used).
    pub tls_ca: Option<std::path::PathBuf>,
    /// Most PUBLISH packets committed together.
    pub batch: usize,
}

/// Checks the settings and builds the client options; errors stop the start.
pub fn options(c: &MqttConfig) -> Result<MqttOptions, String> {
    let (tls, rest) = if let Some(r) = c.url.strip_prefix("mqtts://") {
        (true, r)
    } else if let Some(r) = c.url.strip_prefix("mqtt://") {
        (false, r)
    } else {
        return Err(format!(
            "--mqtt-url {:?}: use mqtt://host:port or mqtts://host:port",
            c.url
        ));
    };
    let rest = rest.trim_end_matches('/');
    let (host, port) = match rest.rsplit_once(':') {
        Some((h, p)) => (
            h.to_string(),
            p.parse::<u16>()
                .map_err(|_| format!("--mqtt-url {:?}: bad port {p:?}", c.url))?,
        ),
        None => (rest.to_string(), if tls { 8883 } else { 1883 }),
    };
    if host.is_empty() {
        return Err(format!("--mqtt-url {:?}: no host", c.url));
    }
    if c.topics.is_empty() {
        return Err("--mqtt-url needs at least one --mqtt-topic".into());
    }
    for t in &c.topics {
        if t.is_empty() || t.contains('\0') {
            return Err(format!("--mqtt-topic {t:?} is not a topic filter"));
        }
    }
    let mut o = MqttOptions::new(c.client_id.clone(), host, port);
    o.set_keep_alive(Duration::from_secs(30))
        .set_clean_session(false)
        .set_manual_acks(true)
        .set_max_packet_size(1 << 20, 1 << 20);
    if let Some(u) = &c.username {
        o.set_credentials(u.clone(), c.password.clone().unwrap_or_default());
    }
    if tls {
        use rustls_pki_types::CertificateDer;
        use rustls_pki_types::pem::PemObject;
        use tokio_rustls::rustls;
        let ca = c
            .tls_ca
            .as_ref()
            .ok_or("mqtts:// needs --mqtt-tls-ca (the CA that signed the broker's certificate)")?;
        let mut roots = rustls::RootCertStore::empty();
        for cert in
            CertificateDer::pem_file_iter(ca).map_err(|e| format!("{}: {e}", ca.display()))?
        {
            roots
                .add(cert.map_err(|e| format!("{}: {e}", ca.display()))?)
                .map_err(|e| format!("{}: {e}", ca.display()))?;
        }
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS: {e}"))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        o.set_transport(Transport::tls_with_config(config.into()));
    }
    Ok(o)
}

/// Runs until `shutdown` turns true.
pub async fn run(
    ctx: SharedCtx,
    config: MqttConfig,
    options: MqttOptions,
    mut shutdown: watch::Receiver<bool>,
) {
    let batch = config.batch.max(1);
    // The request channel holds every ack of a batch: acking must never wait for the
    // network task, which may itself be waiting to hand over the next PUBLISH.
    let (client, eventloop) = AsyncClient::new(options, 2 * batch + 64);
    let (tx, mut rx) = mpsc::channel::<(u64, Publish)>(batch);
    // Which connection is current: a packet id only means something on the connection
    // that delivered it, so packets from an earlier one are not acknowledged (the broker
    // redelivers them on the new connection; the redelivery writes nothing new).
    let connection = Arc::new(AtomicU64::new(0));
    let network = tokio::spawn(network(
        client.clone(),
        eventloop,
        config.topics.clone(),
        tx,
        connection.clone(),
        shutdown.clone(),
    ));
    // Up to PIPELINE batches are mapped and committed at once, so the next batch is being
    // prepared while the writer commits the last; acknowledgements still go out in the
    // order the PUBLISH packets came (MQTT 3.1.1 4.6), each batch's after its commit.
    let mut inflight: VecDeque<Batch> = VecDeque::with_capacity(PIPELINE);
    loop {
        tokio::select! {
            // The oldest batch first: its acknowledgements may not wait behind newer ones.
            biased;
            committed = async {
                match inflight.front_mut() {
                    Some(b) => (&mut b.commit).await.unwrap_or(false),
                    None => std::future::pending().await,
                }
            }, if !inflight.is_empty() => {
                if let Some(done) = inflight.pop_front() {
                    acknowledge(&client, &connection, committed, done.publishes).await;
                }
            }
            p = rx.recv(), if inflight.len() < PIPELINE => {
                let Some(first) = p else { break };
                let mut publishes = vec![first];
                while publishes.len() < batch {
                    match rx.try_recv() {
                        Ok(p) => publishes.push(p),
                        Err(_) => break,
                    }
                }
                let packets: Vec<Publish> = publishes.iter().map(|(_, p)| p.clone()).collect();
                let (ctx, mut shutdown) = (ctx.clone(), shutdown.clone());
                let commit =
                    tokio::spawn(async move { commit(&ctx, &packets, &mut shutdown).await });
                inflight.push_back(Batch { commit, publishes });
            }
            _ = shutdown.changed() => break,
        }
    }
    // Batches already being committed finish (a failing one stops retrying at shutdown)
    // and are acknowledged if they committed on this connection.
    while let Some(done) = inflight.pop_front() {
        let committed = done.commit.await.unwrap_or(false);
        acknowledge(&client, &connection, committed, done.publishes).await;
    }
    // Unacknowledged messages stay with the broker's session and come back on the next
    // connection. Nothing here may wait on the network task.
    let _ = client.try_disconnect();
    drop(rx);
    network.abort();
    let _ = network.await;
    tracing::info!("MQTT subscriber stopped");
}

/// How many batches are mapped and committed at once (see [`run`]).
const PIPELINE: usize = 3;

/// A batch being committed, with the packets to acknowledge after.
struct Batch {
    /// Answers whether the batch committed.
    commit: tokio::task::JoinHandle<bool>,
    publishes: Vec<(u64, Publish)>,
}

/// Acknowledges a committed batch's packets that came on the current connection (packet ids
/// of an earlier one mean nothing now; the broker redelivers those). A batch that did not
/// commit (the server is stopping) is not acknowledged: the broker keeps it.
async fn acknowledge(
    client: &AsyncClient,
    connection: &AtomicU64,
    committed: bool,
    publishes: Vec<(u64, Publish)>,
) {
    if !committed {
        return;
    }
    let current = connection.load(Ordering::SeqCst);
    for (_, p) in publishes.iter().filter(|(c, _)| *c == current) {
        if let Err(e) = client.ack(p).await {
            tracing::warn!(error = %e, "MQTT ack not sent; the broker will redeliver");
        }
    }
}

/// Writes one batch, retrying while the database fails (nothing received is dropped:
/// unacknowledged messages would only come back after a reconnect). Answers whether it
/// committed: only a stop of the server ends the retries without. A batch that fails
/// [`ISOLATE_AFTER`] times for a reason other than an unavailable database is written
/// message by message, and a message that still fails becomes a dead letter.
async fn commit(
    ctx: &SharedCtx,
    publishes: &[Publish],
    shutdown: &mut watch::Receiver<bool>,
) -> bool {
    let mut messages = Vec::new();
    for p in publishes {
        let source = format!("mqtt:{}", p.topic);
        match split_body(&p.payload) {
            Ok(ms) => messages.extend(ms.into_iter().map(|m| Message {
                source: Some(source.clone()),
                ..m
            })),
            Err(e) => messages.push(Message {
                text: String::from_utf8_lossy(&p.payload).into_owned(),
                json: Err(e.diagnostics()),
                source: Some(source),
            }),
        }
    }
    let n = u32::try_from(messages.len()).unwrap_or(u32::MAX);
    let queue = ctx.devices.queue.clone();
    // Held until this function returns: the batch counts against the device queue.
    let _permit = queue
        .acquire_many_owned(n.min(ctx.devices.queue_capacity as u32))
        .await;
    match write(ctx, &messages, shutdown, Some(ISOLATE_AFTER)).await {
        Attempt::Committed => return true,
        Attempt::Stopped => return false,
        Attempt::Poisoned(_) => {}
    }
    // A batch that keeps failing for a reason other than an unavailable database: write its
    // messages one by one, so that one poisoned message cannot stall the feed. A message that
    // still fails is kept as a dead letter with the reason (listable and replayable), and the
    // batch is acknowledged; nothing is dropped.
    for m in messages {
        let one = std::slice::from_ref(&m);
        let reason = match write(ctx, one, shutdown, Some(ISOLATE_AFTER)).await {
            Attempt::Committed => continue,
            Attempt::Stopped => return false,
            Attempt::Poisoned(reason) => reason,
        };
        tracing::error!(error = %reason, "MQTT message could not be committed; kept as a dead letter");
        let dead = Message {
            json: Err(format!("could not be committed: {reason}")),
            ..m
        };
        if let Attempt::Stopped = write(ctx, &[dead], shutdown, None).await {
            return false;
        }
    }
    true
}

/// Failed attempts before a batch is split up (see [`commit`]).
const ISOLATE_AFTER: u32 = 3;

enum Attempt {
    Committed,
    /// The server is stopping and the messages are not committed.
    Stopped,
    /// Failed `give_up` times for a reason other than an unavailable database.
    Poisoned(String),
}

/// Ingests `messages` in one transaction, retrying with back-off; an unavailable database is
/// waited out however long it takes, other errors `give_up` times at most.
async fn write(
    ctx: &SharedCtx,
    messages: &[Message],
    shutdown: &mut watch::Receiver<bool>,
    give_up: Option<u32>,
) -> Attempt {
    let mut wait = Duration::from_millis(200);
    let mut failures = 0;
    loop {
        match ingest(ctx, messages.to_vec(), "mqtt").await {
            Ok(o) => {
                tracing::debug!(
                    messages = o.accepted,
                    rejected = o.rejected.len(),
                    "MQTT batch committed"
                );
                return Attempt::Committed;
            }
            Err(e) => {
                tracing::warn!(error = %e.diagnostics(), "MQTT batch not committed; retrying");
                if *shutdown.borrow() {
                    return Attempt::Stopped;
                }
                if e.kind != ErrorKind::Unavailable {
                    failures += 1;
                    if give_up.is_some_and(|n| failures >= n) {
                        return Attempt::Poisoned(e.diagnostics());
                    }
                }
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(10));
            }
        }
    }
}

/// Polls the connection: subscribes after every CONNACK, hands PUBLISH packets to the
/// writer, reconnects with back-off after errors. It never stops polling, because the
/// acknowledgements the writer queues only go out while the event loop is polled; when the
/// writer is behind, packets wait here instead. Their number is bounded by the broker's
/// window of unacknowledged messages (Mosquitto: `max_inflight_messages`): nothing is
/// acknowledged before it is committed, so the broker cannot send beyond it.
async fn network(
    client: AsyncClient,
    mut eventloop: EventLoop,
    topics: Vec<String>,
    tx: mpsc::Sender<(u64, Publish)>,
    connection: Arc<AtomicU64>,
    shutdown: watch::Receiver<bool>,
) {
    let mut backoff = Duration::from_millis(250);
    let mut waiting: std::collections::VecDeque<(u64, Publish)> = std::collections::VecDeque::new();
    loop {
        if *shutdown.borrow() {
            return;
        }
        while let Some(p) = waiting.pop_front() {
            match tx.try_send(p) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(p)) => {
                    waiting.push_front(p);
                    break;
                }
                Err(mpsc::error::TrySendError::Closed(_)) => return,
            }
        }
        match eventloop.poll().await {
            Ok(Event::Incoming(Incoming::ConnAck(ack))) => {
                connection.fetch_add(1, Ordering::SeqCst);
                backoff = Duration::from_millis(250);
                tracing::info!(session_present = ack.session_present, "MQTT connected");
                for t in &topics {
                    if let Err(e) = client.try_subscribe(t.clone(), QoS::AtLeastOnce) {
                        tracing::warn!(topic = %t, error = %e, "MQTT subscribe failed");
                    }
                }
            }
            Ok(Event::Incoming(Incoming::Publish(p))) => {
                waiting.push_back((connection.load(Ordering::SeqCst), p))
            }
            Ok(_) => {}
            Err(e) => {
                // Packets received on the lost connection are redelivered on the next one.
                waiting.clear();
                tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "MQTT connection lost");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(30));
            }
        }
    }
}
