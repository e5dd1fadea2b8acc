//! HL7 v2 over MLLP: the hospital ADT feed of the EMPI (docs/empi.md, "HL7 v2 feed").
//!
//! Two tokio listeners (`[mllp]` settings) start with the server when enabled: plain TCP
//! (`listen`), serving only addresses on `allow`, and TLS (`tls_listen`) with client
//! certificates bound to institutions ([`peer`]). A connection is authenticated before anything
//! is read from it, else closed and the refusal audited. One address holds at most
//! `max_connections_per_peer` connections (more are closed at once), all peers together
//! `max_connections` (more wait in the accept queue).
//!
//! Each connection is served by its own task, one message at a time (MLLP is request → ACK):
//! a block is `0x0B` data `0x1C 0x0D`. Bytes outside a block are discarded; a block larger
//! than `max_message_bytes` is answered AR as soon as the limit is passed (the rest of the
//! block is skipped up to its end character, after which the connection goes on); a connection
//! idle for `idle_timeout_secs` or cut mid-block is closed. Nothing a peer sends can stop the
//! listener: every failure ends at most that peer's connection.
//!
//! The content is checked against the structure limits ([`limits`]) and parsed by [`adt`],
//! which maps the PID segment to a FHIR Patient and takes the same registration path as
//! `POST /fhir/Patient` for the institution MSH-4 names — one the connection speaks for.

pub mod adt;
pub mod limits;
pub mod peer;
pub mod settings;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;

use self::peer::{AllowList, Peer, PeerSlots};
use self::settings::MllpSettings;
use crate::mtls::ClientCert;
use crate::state::AppState;

/// Start of block (VT).
pub const START_BLOCK: u8 = 0x0B;
/// End of block (FS), followed by [`CARRIAGE_RETURN`].
pub const END_BLOCK: u8 = 0x1C;
pub const CARRIAGE_RETURN: u8 = 0x0D;

/// Longest wait for a TLS handshake (or `idle_timeout_secs` when shorter).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The bound addresses of the listeners.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Bound {
    pub plain: Option<SocketAddr>,
    pub tls: Option<SocketAddr>,
}

/// How a listener authenticates its peers.
enum Authenticator {
    Address(AllowList),
    Certificate(TlsAcceptor),
}

/// What the listeners share: the connection limits.
struct Shared {
    permits: Arc<Semaphore>,
    slots: Arc<PeerSlots>,
    limits: Limits,
}

async fn bind(address: &str, key: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(address)
        .await
        .map_err(|e| anyhow::anyhow!("mllp: cannot listen on {address} ({key}): {e}"))
}

/// Bind the listeners and serve in the background. Returns the bound addresses.
pub async fn start(state: AppState, settings: &MllpSettings) -> anyhow::Result<Bound> {
    let shared = Arc::new(Shared {
        permits: Arc::new(Semaphore::new(settings.max_connections.max(1))),
        slots: PeerSlots::new(settings.max_connections_per_peer),
        limits: Limits {
            max_message_bytes: settings.max_message_bytes.max(64),
            idle: Duration::from_secs(settings.idle_timeout_secs.max(1)),
        },
    });
    let mut bound = Bound::default();
    if !settings.listen.is_empty() {
        let listener = bind(&settings.listen, "mllp.listen").await?;
        let addr = listener.local_addr()?;
        if settings.allow.is_empty() {
            tracing::warn!(%addr, "mllp.allow is empty: every connection to the plain MLLP listener is refused");
        }
        let auth = Authenticator::Address(AllowList::new(&settings.allow));
        tokio::spawn(accept_loop(listener, auth, state.clone(), shared.clone()));
        tracing::info!(%addr, "HL7 v2 MLLP listener started");
        bound.plain = Some(addr);
    }
    if !settings.tls_listen.is_empty() {
        let config = crate::mtls::server_config(&state.settings.mtls)?;
        let listener = bind(&settings.tls_listen, "mllp.tls_listen").await?;
        let addr = listener.local_addr()?;
        let auth = Authenticator::Certificate(TlsAcceptor::from(Arc::new(config)));
        tokio::spawn(accept_loop(listener, auth, state, shared));
        tracing::info!(%addr, "HL7 v2 MLLP over TLS listener started");
        bound.tls = Some(addr);
    }
    Ok(bound)
}

#[derive(Clone, Copy, Debug)]
struct Limits {
    max_message_bytes: usize,
    idle: Duration,
}

async fn accept_loop(
    listener: TcpListener,
    auth: Authenticator,
    state: AppState,
    shared: Arc<Shared>,
) {
    let auth = Arc::new(auth);
    let name = listener
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    loop {
        let Ok(permit) = shared.permits.clone().acquire_owned().await else {
            return;
        };
        let (stream, addr) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tracing::warn!(error = %e, "MLLP accept failed");
                drop(permit);
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let Some(slot) = shared.slots.claim(addr.ip()) else {
            drop(stream);
            let why = format!(
                "{} already has {} connections open (mllp.max_connections_per_peer)",
                addr.ip().to_canonical(),
                shared.slots.max()
            );
            peer::refuse(&state, addr, &name, &why);
            continue;
        };
        let (state, auth, limits, name) =
            (state.clone(), auth.clone(), shared.limits, name.clone());
        tokio::spawn(async move {
            let _held = (permit, slot);
            let result = match auth.as_ref() {
                Authenticator::Address(allow) => match allow.authenticate(addr) {
                    Some(peer) => serve_connection(stream, peer, &state, limits).await,
                    None => {
                        drop(stream);
                        let why = format!("{} is not on mllp.allow", addr.ip().to_canonical());
                        peer::refuse(&state, addr, &name, &why);
                        Ok(())
                    }
                },
                Authenticator::Certificate(acceptor) => {
                    match handshake(acceptor, stream, addr, &state, limits.idle).await {
                        Ok((tls, peer)) => serve_connection(tls, peer, &state, limits).await,
                        Err(why) => {
                            peer::refuse(&state, addr, &name, &why);
                            Ok(())
                        }
                    }
                }
            };
            if let Err(e) = result {
                tracing::info!(peer = %addr, error = %e, "MLLP connection ended");
            }
        });
    }
}

/// The TLS handshake (the client certificate is required and verified by rustls against
/// `mtls.client_ca_file`), then the institutions the certificate is bound to.
async fn handshake(
    acceptor: &TlsAcceptor,
    stream: TcpStream,
    addr: SocketAddr,
    state: &AppState,
    idle: Duration,
) -> Result<(tokio_rustls::server::TlsStream<TcpStream>, Peer), String> {
    let wait = idle.min(HANDSHAKE_TIMEOUT);
    let tls = match tokio::time::timeout(wait, acceptor.accept(stream)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => return Err(format!("TLS handshake failed: {e}")),
        Err(_) => return Err(format!("TLS handshake not finished within {wait:?}")),
    };
    let Some(leaf) = tls.get_ref().1.peer_certificates().and_then(|c| c.first()) else {
        return Err("no client certificate".into());
    };
    let sha256 = ClientCert(Sha256::digest(leaf.as_ref()).into()).hex();
    let fingerprint = sha256.clone();
    let institutions = state
        .db(move |conn| yiqiao_registry::mtls::institutions_bound_to(conn, &fingerprint))
        .await
        .map_err(|e| format!("the certificate bindings cannot be read: {}", e.message))?;
    if institutions.is_empty() {
        return Err(format!(
            "client certificate sha256 {sha256} is bound to no institution"
        ));
    }
    let peer = Peer {
        addr,
        institutions,
        by: format!("client certificate sha256 {sha256}"),
    };
    Ok((tls, peer))
}

/// What the framing layer read.
#[derive(Debug, PartialEq, Eq)]
pub enum Frame {
    /// A complete block (without the framing characters).
    Message(Vec<u8>),
    /// A block over the limit: its first bytes (to find MSH for the reject).
    Oversized(Vec<u8>),
    /// `0x1C` not followed by `0x0D`: the block is answered AR and dropped.
    BadTrailer(Vec<u8>),
    /// More than the limit of bytes outside any block.
    Garbage,
    /// The peer closed the connection (possibly mid-block).
    Closed { mid_block: bool },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Outside,
    Inside,
    SawEnd,
    /// The rest of an oversized block, up to its end.
    Skipping,
    SkippingSawEnd,
}

/// Incremental MLLP decoder (pure; the connection feeds it bytes).
#[derive(Debug)]
pub struct Decoder {
    max: usize,
    state: State,
    block: Vec<u8>,
    garbage: usize,
}

/// Bytes of an oversized block kept to answer it (enough for any MSH segment).
const KEEP_PREFIX: usize = 4096;

impl Decoder {
    pub fn new(max_message_bytes: usize) -> Decoder {
        Decoder {
            max: max_message_bytes,
            state: State::Outside,
            block: Vec::new(),
            garbage: 0,
        }
    }

    /// Feed bytes; returns how many were used and a frame if one ended (the rest of `input`
    /// is for the next call).
    pub fn feed(&mut self, input: &[u8]) -> (usize, Option<Frame>) {
        for (i, &b) in input.iter().enumerate() {
            match self.state {
                State::Outside => {
                    if b == START_BLOCK {
                        self.state = State::Inside;
                        self.block.clear();
                        self.garbage = 0;
                    } else {
                        self.garbage += 1;
                        if self.garbage > self.max {
                            self.garbage = 0;
                            return (i + 1, Some(Frame::Garbage));
                        }
                    }
                }
                State::Inside => match b {
                    END_BLOCK => self.state = State::SawEnd,
                    // A new start inside a block: the sender gave up on the previous one.
                    START_BLOCK => {
                        self.block.clear();
                    }
                    _ => {
                        if self.block.len() >= self.max {
                            self.block.truncate(KEEP_PREFIX);
                            self.state = State::Skipping;
                            let prefix = std::mem::take(&mut self.block);
                            return (i + 1, Some(Frame::Oversized(prefix)));
                        }
                        self.block.push(b);
                    }
                },
                State::Skipping => {
                    if b == END_BLOCK {
                        self.state = State::SkippingSawEnd;
                    }
                }
                State::SkippingSawEnd => {
                    self.state = match b {
                        CARRIAGE_RETURN => State::Outside,
                        END_BLOCK => State::SkippingSawEnd,
                        _ => State::Skipping,
                    };
                }
                State::SawEnd => {
                    self.state = State::Outside;
                    let block = std::mem::take(&mut self.block);
                    return if b == CARRIAGE_RETURN {
                        (i + 1, Some(Frame::Message(block)))
                    } else {
                        (i + 1, Some(Frame::BadTrailer(block)))
                    };
                }
            }
        }
        (input.len(), None)
    }

    /// Is a block being read?
    pub fn mid_block(&self) -> bool {
        self.state != State::Outside
    }
}

/// Wrap `payload` in an MLLP block.
pub fn frame(payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + 3);
    out.push(START_BLOCK);
    out.extend_from_slice(payload);
    out.push(END_BLOCK);
    out.push(CARRIAGE_RETURN);
    out
}

async fn read_frame<R: AsyncRead + Unpin>(
    reader: &mut BufReader<R>,
    decoder: &mut Decoder,
    idle: Duration,
) -> std::io::Result<Frame> {
    loop {
        let chunk = match tokio::time::timeout(idle, reader.fill_buf()).await {
            Ok(r) => r?,
            Err(_) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("idle for {idle:?}"),
                ));
            }
        };
        if chunk.is_empty() {
            return Ok(Frame::Closed {
                mid_block: decoder.mid_block(),
            });
        }
        let (used, frame) = decoder.feed(chunk);
        reader.consume(used);
        if let Some(f) = frame {
            return Ok(f);
        }
    }
}

async fn serve_connection<S: AsyncRead + AsyncWrite + Unpin>(
    stream: S,
    peer: Peer,
    state: &AppState,
    limits: Limits,
) -> std::io::Result<()> {
    tracing::debug!(peer = %peer.addr, by = %peer.by, institutions = ?peer.institutions, "MLLP connection authenticated");
    let (read, mut write) = tokio::io::split(stream);
    let mut reader = BufReader::with_capacity(64 * 1024, read);
    let mut decoder = Decoder::new(limits.max_message_bytes);
    loop {
        let received = read_frame(&mut reader, &mut decoder, limits.idle).await?;
        let ack = match received {
            Frame::Message(bytes) => {
                // A panic in parsing must not cost the peer its connection (nor the ACK).
                match std::panic::AssertUnwindSafe(adt::handle(state, &peer, &bytes))
                    .catch_unwind()
                    .await
                {
                    Ok(ack) => ack,
                    Err(_) => {
                        tracing::error!(peer = %peer.addr, "HL7 v2 message handler panicked");
                        adt::reject_raw(&bytes, "the message could not be processed")
                    }
                }
            }
            Frame::Oversized(prefix) => adt::reject_raw(
                &prefix,
                &format!(
                    "the message exceeds the limit of {} bytes",
                    limits.max_message_bytes
                ),
            ),
            Frame::BadTrailer(block) => adt::reject_raw(
                &block,
                "malformed MLLP frame: the end character 0x1C is not followed by 0x0D",
            ),
            Frame::Garbage => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    "too many bytes outside an MLLP block",
                ));
            }
            Frame::Closed { mid_block } => {
                if mid_block {
                    tracing::info!(peer = %peer.addr, "MLLP peer closed the connection mid-message");
                }
                return Ok(());
            }
        };
        write.write_all(&frame(ack.as_bytes())).await?;
        write.flush().await?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed_all(d: &mut Decoder, mut input: &[u8]) -> Vec<Frame> {
        let mut out = Vec::new();
        while !input.is_empty() {
            let (used, f) = d.feed(input);
            input = &input[used..];
            out.extend(f);
        }
        out
    }

    #[test]
    fn frames_split_anywhere_are_reassembled() {
        let wire = [frame(b"MSH|one"), frame(b"MSH|two")].concat();
        for cut in 0..wire.len() {
            let mut d = Decoder::new(100);
            let mut frames = feed_all(&mut d, &wire[..cut]);
            frames.extend(feed_all(&mut d, &wire[cut..]));
            assert_eq!(
                frames,
                vec![
                    Frame::Message(b"MSH|one".to_vec()),
                    Frame::Message(b"MSH|two".to_vec())
                ],
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn garbage_outside_blocks_is_skipped_until_the_limit() {
        let mut d = Decoder::new(10);
        let frames = feed_all(&mut d, &[b"junk".as_slice(), &frame(b"MSH|x")].concat());
        assert_eq!(frames, vec![Frame::Message(b"MSH|x".to_vec())]);
        let frames = feed_all(&mut d, &[b'z'; 11]);
        assert_eq!(frames, vec![Frame::Garbage]);
    }

    #[test]
    fn oversized_block_and_bad_trailer() {
        let mut d = Decoder::new(4);
        assert_eq!(
            feed_all(&mut d, &[frame(b"MSH|too\x1clong"), frame(b"MSH")].concat()),
            vec![
                Frame::Oversized(b"MSH|".to_vec()),
                Frame::Message(b"MSH".to_vec())
            ]
        );
        let mut d = Decoder::new(100);
        assert_eq!(
            feed_all(&mut d, b"\x0bMSH|a\x1cX"),
            vec![Frame::BadTrailer(b"MSH|a".to_vec())]
        );
        assert!(!d.mid_block());
    }

    #[test]
    fn a_new_start_inside_a_block_restarts_it() {
        let mut d = Decoder::new(100);
        assert_eq!(
            feed_all(&mut d, b"\x0bMSH|lost\x0bMSH|b\x1c\x0d"),
            vec![Frame::Message(b"MSH|b".to_vec())]
        );
        feed_all(&mut d, b"\x0bMSH|half");
        assert!(d.mid_block());
    }
}
