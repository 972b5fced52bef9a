//! Blocking helpers for the source side: the handshake on the main
//! connection, MigrationStart, joining page streams, waiting for the
//! outcome, and the rule that assigns pages to connections.

use super::auth::{random_nonce, AuthContext, AuthToken, SessionId};
use super::frame::{FrameReader, FrameType, FrameWriter};
use super::messages::{
    AuthResponse, Features, Hello, Message, MigrationStart, Restored, Role, StreamJoin,
};
use super::{WireError, PROTOCOL_MINOR};
use std::io::{Read, Write};

/// Index of a connection: 0 the main connection, 1..=n page streams.
pub type StreamIndex = u16;

/// Pages of one 1 MiB-aligned chunk of one process travel on one connection.
pub const STREAM_CHUNK_SHIFT: u32 = 20;

/// The connection that carries the pages at `addr` of `pid` when `streams`
/// page streams are open: 0 (the main connection) without streams, else
/// one of 1..=streams. Every version of a page must travel on the same
/// connection so that a newer version never overtakes an older one; this
/// function is one such assignment (by 1 MiB chunk, hashed).
pub fn stream_for(pid: i32, addr: u64, streams: u16) -> StreamIndex {
    if streams == 0 {
        return 0;
    }
    let mut x = (addr >> STREAM_CHUNK_SHIFT) ^ ((pid as u32 as u64) << 44);
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    1 + (x % streams as u64) as u16
}

/// How a committed migration ended, as far as the target says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The tree runs on the target: kill the frozen original.
    Restored(Restored),
    /// The target did not restore (RestoreFailed, Abort or Error) and
    /// guarantees the tree does not run there: resume the original.
    Failed(String),
}

/// An authenticated session, from the source's point of view.
#[derive(Debug, Clone)]
pub struct SourceSession {
    pub session: SessionId,
    /// The target's Hello.
    pub peer: Hello,
    /// Features both sides have.
    pub negotiated: Features,
    token: AuthToken,
    ctx: AuthContext,
}

/// Reads the next control message, answering nothing; page batches are a
/// protocol error here.
pub fn read_message<R: Read>(r: &mut FrameReader<R>, lenient: bool) -> Result<Message, WireError> {
    let f = r.read_frame()?;
    if matches!(f.ty, FrameType::PageBatch | FrameType::PageReply) {
        return Err(WireError::Protocol(format!(
            "unexpected {} from the target",
            f.ty
        )));
    }
    if lenient {
        Message::decode_lenient(&f)
    } else {
        Message::decode(&f)
    }
}

fn unexpected(what: &str, m: Message) -> WireError {
    match m {
        Message::Error { message } => WireError::Refused(message),
        Message::Abort { reason } => WireError::Refused(reason),
        Message::AuthFail { reason } => WireError::Auth(format!("the target refused: {reason}")),
        other => WireError::Protocol(format!("expected {what}, got {}", other.frame_type())),
    }
}

impl SourceSession {
    /// Runs Hello and the mutual authentication on a fresh main connection.
    pub fn handshake<R: Read, W: Write>(
        r: &mut FrameReader<R>,
        w: &mut FrameWriter<W>,
        token: &AuthToken,
        features: Features,
    ) -> Result<SourceSession, WireError> {
        let session = SessionId::random()?;
        w.send(&Message::Hello(Hello::new(Role::Source, session, features)))?;
        w.flush()?;
        let peer = match read_message(r, true)? {
            Message::Hello(h) => h,
            m => return Err(unexpected("Hello", m)),
        };
        peer.check_version()?;
        if peer.role != Role::Target || peer.session != session {
            return Err(WireError::Protocol(format!(
                "the peer answered as a {:?} for session {}",
                peer.role, peer.session
            )));
        }
        let lenient = peer.minor > PROTOCOL_MINOR;
        let challenge = match read_message(r, lenient)? {
            Message::AuthChallenge(c) => c,
            m => return Err(unexpected("AuthChallenge", m)),
        };
        let ctx = AuthContext {
            session,
            target_nonce: challenge.nonce,
            source_nonce: random_nonce()?,
        };
        w.send(&Message::AuthResponse(AuthResponse {
            mac: token.source_proof(&ctx),
            nonce: ctx.source_nonce,
        }))?;
        w.flush()?;
        match read_message(r, lenient)? {
            Message::AuthOk(ok) if token.verify_target(&ctx, &ok.mac) => {}
            Message::AuthOk(_) => {
                let reason = "the target could not prove it holds the token";
                let _ = w.send(&Message::Abort {
                    reason: reason.into(),
                });
                let _ = w.flush();
                return Err(WireError::Auth(reason.into()));
            }
            m => return Err(unexpected("AuthOk", m)),
        }
        let negotiated = features.negotiate(&peer.features);
        tracing::debug!(session = %session, "authenticated to {}", peer.software);
        Ok(SourceSession {
            session,
            peer,
            negotiated,
            token: token.clone(),
            ctx,
        })
    }

    fn lenient(&self) -> bool {
        self.peer.minor > PROTOCOL_MINOR
    }

    /// Sends MigrationStart and waits for the target's Ack.
    pub fn start<R: Read, W: Write>(
        &self,
        r: &mut FrameReader<R>,
        w: &mut FrameWriter<W>,
        start: &MigrationStart,
    ) -> Result<(), WireError> {
        w.send(&Message::MigrationStart(Box::new(start.clone())))?;
        w.flush()?;
        match read_message(r, self.lenient())? {
            Message::Ack => Ok(()),
            m => Err(unexpected("Ack", m)),
        }
    }

    /// Joins page connection `index` (1..=streams) on a new connection.
    pub fn join_stream<R: Read, W: Write>(
        &self,
        r: &mut FrameReader<R>,
        w: &mut FrameWriter<W>,
        index: StreamIndex,
    ) -> Result<(), WireError> {
        w.send(&Message::StreamJoin(StreamJoin {
            session: self.session,
            index,
            mac: self.token.join_proof(&self.ctx, index),
        }))?;
        w.flush()?;
        match read_message(r, self.lenient())? {
            Message::Ack => Ok(()),
            m => Err(unexpected("Ack", m)),
        }
    }

    /// After Commit: waits for Restored / RestoreFailed, answering pings.
    /// An `Err` (disconnect, garbage) means the outcome is unknown: the
    /// source must keep its job frozen and ask the target agent.
    pub fn await_outcome<R: Read, W: Write>(
        &self,
        r: &mut FrameReader<R>,
        w: &mut FrameWriter<W>,
    ) -> Result<Outcome, WireError> {
        loop {
            match read_message(r, self.lenient())? {
                Message::Restored(x) => return Ok(Outcome::Restored(x)),
                Message::RestoreFailed { reason }
                | Message::Abort { reason }
                | Message::Error { message: reason } => return Ok(Outcome::Failed(reason)),
                Message::Ping { seq } => {
                    w.send(&Message::Pong { seq })?;
                    w.flush()?;
                }
                m => return Err(unexpected("Restored", m)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_assignment_is_stable_and_spread() {
        assert_eq!(stream_for(1, 0x1000, 0), 0);
        let mut hist = [0u32; 5];
        for chunk in 0..4000u64 {
            let a = stream_for(77, chunk << 20, 4);
            assert!((1..=4).contains(&a));
            hist[a as usize] += 1;
            // Same chunk, same stream.
            assert_eq!(a, stream_for(77, (chunk << 20) + 0xf_f000, 4));
        }
        for (i, &n) in hist.iter().enumerate().skip(1) {
            assert!((800..1200).contains(&n), "stream {i}: {n}");
        }
    }
}
