//! HL7 v2 over MLLP: the hospital ADT feed of the EMPI (docs/empi.md, "HL7 v2 feed").
//!
//! A tokio TCP listener (`[mllp]` settings) started with the server when enabled. Each
//! connection is served by its own task, one message at a time (MLLP is request → ACK):
//! a block is `0x0B` data `0x1C 0x0D`. Bytes outside a block are discarded; a block larger
//! than `max_message_bytes` is answered AR as soon as the limit is passed (the rest of the
//! block is skipped up to its end character, after which the connection goes on); a connection idle for `idle_timeout_secs` or cut
//! mid-block is closed. Nothing a peer sends can stop the listener: every failure ends at
//! most that peer's connection.
//!
//! The content is parsed by [`adt`], which maps the PID segment to a FHIR Patient and takes
//! the same registration path as `POST /fhir/Patient`.

pub mod adt;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

use crate::config::MllpSettings;
use crate::state::AppState;

/// Start of block (VT).
pub const START_BLOCK: u8 = 0x0B;
/// End of block (FS), followed by [`CARRIAGE_RETURN`].
pub const END_BLOCK: u8 = 0x1C;
pub const CARRIAGE_RETURN: u8 = 0x0D;

/// Bind the listener and serve in the background. Returns the bound address.
pub async fn start(state: AppState, settings: &MllpSettings) -> anyhow::Result<SocketAddr> {
    let listener = TcpListener::bind(settings.listen)
        .await
        .map_err(|e| anyhow::anyhow!("mllp: cannot listen on {}: {e}", settings.listen))?;
    let addr = listener.local_addr()?;
    let limits = Limits {
        max_message_bytes: settings.max_message_bytes.max(64),
        idle: Duration::from_secs(settings.idle_timeout_secs.max(1)),
    };
    let permits = Arc::new(Semaphore::new(settings.max_connections.max(1)));
    tokio::spawn(accept_loop(listener, state, limits, permits));
    tracing::info!(%addr, "HL7 v2 MLLP listener started");
    Ok(addr)
}

#[derive(Clone, Copy, Debug)]
struct Limits {
    max_message_bytes: usize,
    idle: Duration,
}

async fn accept_loop(
    listener: TcpListener,
    state: AppState,
    limits: Limits,
    permits: Arc<Semaphore>,
) {
    loop {
        let Ok(permit) = permits.clone().acquire_owned().await else {
            return;
        };
        match listener.accept().await {
            Ok((stream, peer)) => {
                let state = state.clone();
                tokio::spawn(async move {
                    if let Err(e) = serve_connection(stream, peer, &state, limits).await {
                        tracing::info!(%peer, error = %e, "MLLP connection ended");
                    }
                    drop(permit);
                });
            }
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tracing::warn!(error = %e, "MLLP accept failed");
                drop(permit);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
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

async fn read_frame(
    reader: &mut BufReader<tokio::net::tcp::OwnedReadHalf>,
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

async fn serve_connection(
    stream: TcpStream,
    peer: SocketAddr,
    state: &AppState,
    limits: Limits,
) -> std::io::Result<()> {
    let _ = stream.set_nodelay(true);
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::with_capacity(64 * 1024, read);
    let mut decoder = Decoder::new(limits.max_message_bytes);
    loop {
        let received = read_frame(&mut reader, &mut decoder, limits.idle).await?;
        let ack = match received {
            Frame::Message(bytes) => {
                // A panic in parsing must not cost the peer its connection (nor the ACK).
                match std::panic::AssertUnwindSafe(adt::handle(state, peer, &bytes))
                    .catch_unwind()
                    .await
                {
                    Ok(ack) => ack,
                    Err(_) => {
                        tracing::error!(%peer, "HL7 v2 message handler panicked");
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
                    tracing::info!(%peer, "MLLP peer closed the connection mid-message");
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
