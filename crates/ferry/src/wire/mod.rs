//! The migration protocol between a migration *source* (`ferry migrate`)
//! and a *target agent* (`ferry agent`), documented in docs/protocol.md.
//!
//! Layers, bottom up:
//!
//! - [`frame`]: the framing. Every frame is a 20-byte header (magic
//!   `FRY1`, type, flags, length, payload CRC32C, header CRC32C) and a
//!   payload; lengths are capped before anything is allocated.
//! - [`messages`]: the control messages (postcard payloads) and the
//!   frame type codes.
//! - [`pages`]: the binary page-batch payload: zero detection,
//!   lz4/zstd compression with raw fallback, zero/absent runs.
//! - [`auth`]: the shared-token challenge–response (HMAC-SHA256, mutual).
//! - [`receiver`]: the target's state machine; it does no I/O and returns
//!   [`receiver::Action`]s, storing pages into a [`sink::PageSink`].
//! - [`source`]: blocking helpers for the source side of the handshake.
//! - [`throttle`]: a token bucket for `--max-bandwidth`.
//!
//! Everything here works on blocking `std::io` streams; nothing panics on
//! bad input, and the page path allocates nothing per page.

pub mod auth;
pub mod frame;
pub mod messages;
pub mod pages;
pub mod receiver;
pub mod sink;
pub mod source;
pub mod throttle;

pub use auth::{load_token, AuthToken, SessionId};
pub use frame::{Frame, FrameReader, FrameType, FrameWriter, OwnedFrame};
pub use messages::{
    Compression, Features, Hello, Message, MigrationMode, MigrationStart, Restored, Role, RoundEnd,
};
pub use pages::{BatchDecoder, BatchEncoder, EntryKind, Page, WireStats};
pub use receiver::{error_message, Action, Event, Receiver, ReceiverConfig, State};
pub use sink::{MemorySink, PageContent, PageSink, SinkError};
pub use source::{stream_for, Outcome, SourceSession, StreamIndex};
pub use throttle::{format_bandwidth, parse_bandwidth, RateLimiter, Throttled};

use std::path::PathBuf;

/// Major protocol version: peers with different majors refuse each other.
pub const PROTOCOL_MAJOR: u16 = 1;
/// Minor protocol version: a newer minor only adds optional things
/// (trailing message fields, feature bits, frame types that are negotiated).
pub const PROTOCOL_MINOR: u16 = 0;
/// TCP port the target agent listens on by default.
pub const DEFAULT_PORT: u16 = 7707;
/// Frame magic, the first four bytes of every frame.
pub const MAGIC: [u8; 4] = *b"FRY1";
/// Default cap on a frame payload (control messages and page batches).
pub const DEFAULT_MAX_PAYLOAD: u32 = 16 << 20;
/// Cap on a `FinalState` payload (the inventory of a large tree), the same
/// as the image format's cap on an inventory file.
pub const MAX_FINAL_STATE: u32 = crate::image::format::MAX_INVENTORY as u32;
/// Page size the protocol carries (x86_64).
pub const PAGE_SIZE: usize = crate::sys::PAGE_SIZE;

/// Errors of the wire protocol. Every variant says what was being done or
/// which frame/page was wrong; none is produced by a panic.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("{context}: {source}")]
    Io {
        context: &'static str,
        source: std::io::Error,
    },
    #[error("connection closed by the peer {context}")]
    Closed { context: &'static str },
    #[error("bad frame magic {found:02x?} (not a ferry peer, or the stream lost sync)")]
    BadMagic { found: [u8; 4] },
    #[error(
        "frame header checksum mismatch (computed {computed:#010x}, header says {stored:#010x})"
    )]
    HeaderChecksum { computed: u32, stored: u32 },
    #[error("{ty} frame: payload checksum mismatch (computed {computed:#010x}, header says {stored:#010x})")]
    PayloadChecksum {
        ty: FrameType,
        computed: u32,
        stored: u32,
    },
    #[error("{ty} frame of {len} bytes exceeds the cap of {max} bytes")]
    TooLarge { ty: FrameType, len: u64, max: u64 },
    #[error("unknown frame type {0:#04x}")]
    UnknownFrameType(u8),
    #[error("{ty} frame: reserved header bits set (flags {flags:#04x}, reserved {reserved:#06x})")]
    ReservedBits {
        ty: FrameType,
        flags: u8,
        reserved: u16,
    },
    #[error("cannot decode {ty} message: {why}")]
    Decode { ty: FrameType, why: String },
    #[error("cannot encode {ty} message: {why}")]
    Encode { ty: FrameType, why: String },
    #[error("malformed page batch{}: {why}", pid.map(|p| format!(" of pid {p}")).unwrap_or_default())]
    Batch { pid: Option<i32>, why: String },
    #[error("page {addr:#x} of pid {pid}: {why}")]
    Page { pid: i32, addr: u64, why: String },
    #[error("page encoder: {0}")]
    Encoder(String),
    #[error(
        "peer speaks protocol {major}.{minor}, this ferry speaks {}.{} (major versions must match)",
        PROTOCOL_MAJOR,
        PROTOCOL_MINOR
    )]
    Version { major: u16, minor: u16 },
    #[error("{frame} frame in state {state}")]
    UnexpectedFrame {
        frame: FrameType,
        state: receiver::State,
    },
    #[error("protocol violation: {0}")]
    Protocol(String),
    #[error("authentication failed: {0}")]
    Auth(String),
    #[error("token file {}: {why}", path.display())]
    Token { path: PathBuf, why: String },
    #[error("peer refused: {0}")]
    Refused(String),
    #[error("peer aborted the migration: {0}")]
    PeerAbort(String),
    #[error("cannot get random bytes: {0}")]
    Random(String),
    #[error("page sink failed on page {addr:#x} of pid {pid}: {source}")]
    Sink {
        pid: i32,
        addr: u64,
        source: SinkError,
    },
    #[error("page sink failed to flush: {0}")]
    SinkFlush(SinkError),
    #[error("invalid bandwidth {input:?}: {why}")]
    Bandwidth { input: String, why: String },
    #[error("invalid compression {input:?}: {why}")]
    CompressionSpec { input: String, why: String },
}

impl WireError {
    /// Wraps an I/O error with what was being done; a clean EOF becomes
    /// [`WireError::Closed`].
    pub(crate) fn io(context: &'static str) -> impl FnOnce(std::io::Error) -> WireError {
        move |source| {
            if source.kind() == std::io::ErrorKind::UnexpectedEof {
                WireError::Closed { context }
            } else {
                WireError::Io { context, source }
            }
        }
    }

    /// Whether the peer went away (EOF or reset) rather than sending
    /// something wrong.
    pub fn is_disconnect(&self) -> bool {
        match self {
            WireError::Closed { .. } => true,
            WireError::Io { source, .. } => matches!(
                source.kind(),
                std::io::ErrorKind::ConnectionReset
                    | std::io::ErrorKind::ConnectionAborted
                    | std::io::ErrorKind::BrokenPipe
            ),
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_error_is_send_sync_and_readable() {
        fn assert_send_sync<T: Send + Sync + 'static>() {}
        assert_send_sync::<WireError>();
        let e = WireError::UnexpectedFrame {
            frame: FrameType::PageBatch,
            state: State::AwaitHello,
        };
        assert_eq!(e.to_string(), "PageBatch frame in state AwaitHello");
        let e = WireError::Batch {
            pid: Some(7),
            why: "x".into(),
        };
        assert_eq!(e.to_string(), "malformed page batch of pid 7: x");
        let e = WireError::io("reading a frame header")(std::io::Error::from(
            std::io::ErrorKind::UnexpectedEof,
        ));
        assert!(e.is_disconnect());
    }
}
