//! The MLLP transport (HL7 v2 Transport Specification, MLLP release 2 framing): a TCP
//! listener, many connections, many messages per connection, each answered with its
//! acknowledgement only after `crate::interaction::hl7v2::ingest` has committed it.
//! A malformed frame gets a NAK; an idle or oversize connection is closed; nothing here can
//! hang the server or crash it. With a TLS acceptor every connection is TLS (a handshake
//! that fails or stalls for the idle time closes the connection).

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::hl7v2::ack::{self, AckCode, AckError};
use crate::hl7v2::mllp::{Frame, MllpDecoder, frame};
use crate::interaction::SharedCtx;
use crate::interaction::hl7v2::ingest;

/// Listener settings.
#[derive(Clone)]
pub struct MllpConfig {
    /// Largest message accepted, in bytes.
    pub max_message_bytes: usize,
    /// A connection silent for this long is closed.
    pub idle: Duration,
    /// MLLP over TLS when set.
    pub tls: Option<tokio_rustls::TlsAcceptor>,
}

/// Accepts connections until `shutdown` turns true.
pub async fn serve(
    listener: TcpListener,
    ctx: SharedCtx,
    config: MllpConfig,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let (ctx, shutdown, config) = (ctx.clone(), shutdown.clone(), config.clone());
                    tokio::spawn(async move {
                        let peer = peer.to_string();
                        let ended = match config.tls.clone() {
                            None => connection(stream, &peer, ctx, &config, shutdown).await,
                            Some(tls) => match tokio::time::timeout(config.idle, tls.accept(stream)).await {
                                Ok(Ok(s)) => connection(s, &peer, ctx, &config, shutdown).await,
                                Ok(Err(e)) => Err(e),
                                Err(_) => Ok(()),
                            },
                        };
                        if let Err(e) = ended {
                            tracing::debug!(%peer, error = %e, "MLLP connection ended");
                        }
                    });
                }
                Err(e) => {
                    // Out of file descriptors and the like: wait instead of spinning.
                    tracing::warn!(error = %e, "MLLP accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            _ = shutdown.changed() => break,
        }
    }
    tracing::info!("MLLP listener stopped");
}

async fn connection<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    peer: &str,
    ctx: SharedCtx,
    config: &MllpConfig,
    mut shutdown: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let mut decoder = MllpDecoder::new(config.max_message_bytes);
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = tokio::select! {
            r = tokio::time::timeout(config.idle, stream.read(&mut buf)) => match r {
                Ok(r) => r?,
                Err(_) => return Ok(()), // idle
            },
            // Between messages, a shutdown closes the connection; a message being
            // processed is finished first (it is not inside this select).
            _ = shutdown.changed() => return Ok(()),
        };
        if n == 0 {
            return Ok(());
        }
        for f in decoder.push(&buf[..n]) {
            let reply = match f {
                Frame::Message(bytes) => ingest(&ctx, &bytes, peer).await.wire,
                Frame::Malformed(reason) => {
                    tracing::debug!(%peer, %reason, "malformed MLLP frame");
                    let err = AckError::new(
                        ack::APPLICATION_INTERNAL_ERROR,
                        format!("malformed MLLP frame: {reason}"),
                    );
                    ack::ack(None, AckCode::AR, Some(&err)).into_bytes()
                }
            };
            stream.write_all(&frame(&reply)).await?;
            stream.flush().await?;
        }
    }
}
