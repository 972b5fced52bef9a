//! The target side of a migration as an explicit state machine.
//!
//! [`Receiver`] does no I/O. The agent reads frames and hands them in;
//! the receiver checks that each frame is allowed in the current state,
//! stores pages into its [`PageSink`], and returns an [`Action`]: messages
//! to send back on the connection the frame came from, and an [`Event`]
//! for the agent (start a job entry, restore now, close...).
//!
//! ```text
//! AwaitHello ─Hello→ AwaitAuth ─AuthResponse→ AwaitStart ─MigrationStart→ ReceivingPages
//! ReceivingPages ─PageBatch, RoundEnd→ ReceivingPages ─RoundEnd{last}→ AwaitFinalState
//! AwaitFinalState ─FinalState→ AwaitCommit ─Commit→ (AwaitStreams →) Restoring
//! Restoring ─restore_finished(Ok)→ Done      any ─error/Abort/refusal→ Failed
//! ```
//!
//! Page connections (`--streams n`): the agent routes a new connection
//! whose first frame is `StreamJoin` to [`Receiver::on_stream_join`], then
//! its frames to [`Receiver::on_stream_frame`]. With several connections
//! the receiver is shared behind a `Mutex`; whichever call completes the
//! last batch after `Commit` gets [`Event::Restore`].
//!
//! Any `Err` from `on_frame`/`on_stream_frame` moves the receiver to
//! `Failed`: the agent sends [`error_message`] on the main connection and
//! closes every connection of the session.

use super::auth::{random_nonce, AuthContext, AuthToken, Nonce, SessionId};
use super::frame::{Frame, FrameType};
use super::messages::{
    AuthChallenge, AuthOk, Features, Hello, Message, MigrationStart, Restored, Role, RoundEnd,
};
use super::pages::{peek_header, BatchDecoder, WireStats};
use super::sink::PageSink;
use super::{WireError, PROTOCOL_MINOR};
use crate::image::{Inventory, MachineInfo};
use std::fmt;

/// Extra page connections a target accepts by default.
pub const DEFAULT_MAX_STREAMS: u16 = 16;

/// Where a migration stands on the target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum State {
    /// Waiting for the source's Hello.
    AwaitHello,
    /// Challenge sent, waiting for AuthResponse.
    AwaitAuth,
    /// Authenticated, waiting for MigrationStart.
    AwaitStart,
    /// Pre-copy rounds: page batches and RoundEnds.
    ReceivingPages,
    /// The last round ended (the source is frozen): waiting for FinalState.
    AwaitFinalState,
    /// Inventory received, waiting for Commit.
    AwaitCommit,
    /// Commit received, page streams still delivering their last batches.
    AwaitStreams,
    /// The agent is restoring; it reports with `restore_finished`.
    Restoring,
    /// The restored tree runs; the source has been told.
    Done,
    /// Refused, aborted or broken; the session is over.
    Failed,
}

impl State {
    pub fn name(self) -> &'static str {
        match self {
            State::AwaitHello => "AwaitHello",
            State::AwaitAuth => "AwaitAuth",
            State::AwaitStart => "AwaitStart",
            State::ReceivingPages => "ReceivingPages",
            State::AwaitFinalState => "AwaitFinalState",
            State::AwaitCommit => "AwaitCommit",
            State::AwaitStreams => "AwaitStreams",
            State::Restoring => "Restoring",
            State::Done => "Done",
            State::Failed => "Failed",
        }
    }

    /// Frame types the main connection may carry in this state.
    pub fn allowed(self) -> &'static [FrameType] {
        use FrameType as F;
        match self {
            State::AwaitHello => &[F::Hello],
            State::AwaitAuth => &[F::AuthResponse, F::Abort, F::Error],
            State::AwaitStart => &[F::MigrationStart, F::Ping, F::Abort, F::Error],
            State::ReceivingPages => &[F::PageBatch, F::RoundEnd, F::Ping, F::Abort, F::Error],
            State::AwaitFinalState => &[F::FinalState, F::Ping, F::Abort, F::Error],
            State::AwaitCommit => &[
                F::Blob,
                F::PostcopyPlan,
                F::Commit,
                F::Ping,
                F::Abort,
                F::Error,
            ],
            State::AwaitStreams | State::Restoring => &[F::Ping, F::Abort, F::Error],
            State::Done => &[F::Ack, F::Ping],
            State::Failed => &[],
        }
    }

    /// Whether page streams may deliver batches in this state.
    pub fn accepts_stream_pages(self) -> bool {
        matches!(
            self,
            State::ReceivingPages
                | State::AwaitFinalState
                | State::AwaitCommit
                | State::AwaitStreams
        )
    }
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// How the target is set up.
#[derive(Debug, Clone)]
pub struct ReceiverConfig {
    pub token: AuthToken,
    /// What this target offers (compression kinds, max page streams).
    pub features: Features,
    /// When set, a MigrationStart from a machine this one cannot restore
    /// (page size, xstate size, XCR0, vDSO layout) is refused up front.
    pub machine: Option<MachineInfo>,
}

impl ReceiverConfig {
    pub fn new(token: AuthToken) -> Self {
        ReceiverConfig {
            token,
            features: Features::ours(DEFAULT_MAX_STREAMS),
            machine: None,
        }
    }
}

/// What the agent must do after a frame.
#[must_use]
#[derive(Debug, Clone, PartialEq)]
pub struct Action {
    /// Messages to send, in order, on the connection the frame came from
    /// (for `restore_finished`: the main connection).
    pub send: Vec<Message>,
    pub event: Event,
}

impl Action {
    fn none() -> Action {
        Action {
            send: Vec::new(),
            event: Event::None,
        }
    }

    fn reply(msg: Message) -> Action {
        Action {
            send: vec![msg],
            event: Event::None,
        }
    }
}

/// Something the agent must act on beyond sending replies.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    None,
    /// The source proved it holds the token; page streams may join.
    Authenticated {
        session: SessionId,
    },
    /// A migration was accepted (the Ack is in `send`).
    Started(Box<MigrationStart>),
    /// A pre-copy round ended.
    RoundEnded(RoundEnd),
    /// All pages and the inventory are in and the sink is flushed: restore
    /// the tree now, then call [`Receiver::restore_finished`].
    Restore(Box<Inventory>),
    /// After `Restored`, the source confirmed it released its job.
    Released,
    /// The source abandoned the migration (Abort or Error frame): discard
    /// its pages (and a partly restored tree), close its connections.
    Aborted {
        reason: String,
    },
    /// This side refused (version, authentication, start, restore
    /// failure): send `send`, then close every connection of the session.
    Close {
        reason: String,
    },
}

#[derive(Debug, Clone, Copy, Default)]
struct Conn {
    joined: bool,
    closed: bool,
    batches: u64,
    round: u32,
}

/// The target's state machine for one migration session.
pub struct Receiver<S: PageSink = Box<dyn PageSink>> {
    config: ReceiverConfig,
    state: State,
    sink: S,
    decoder: BatchDecoder,
    session: Option<SessionId>,
    peer: Option<Hello>,
    negotiated: Option<Features>,
    lenient: bool,
    target_nonce: Option<Nonce>,
    ctx: Option<AuthContext>,
    start: Option<Box<MigrationStart>>,
    /// Index 0 is the main connection, then streams 1..=n.
    conns: Vec<Conn>,
    last_round: u32,
    announced: Vec<u64>,
    final_batches: Option<Vec<u64>>,
    rounds: Vec<RoundEnd>,
    inventory: Option<Box<Inventory>>,
    /// Blob contents received so far, by inventory index.
    blobs: Vec<Vec<u8>>,
    /// Post-copy: pages of each process that come after the resume.
    plans: Vec<super::messages::PostcopyPlan>,
    released: bool,
    failure: Option<String>,
}

impl<S: PageSink> fmt::Debug for Receiver<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Receiver")
            .field("state", &self.state)
            .field("session", &self.session)
            .field("rounds", &self.last_round)
            .field("failure", &self.failure)
            .finish_non_exhaustive()
    }
}

/// The `Error` message to send after an `Err` from the receiver.
pub fn error_message(err: &WireError) -> Message {
    Message::Error {
        message: err.to_string(),
    }
}

/// Why `remote` cannot be restored on `local`, if it cannot.
pub fn machine_mismatch(local: &MachineInfo, remote: &MachineInfo) -> Option<String> {
    if local.page_size != remote.page_size {
        return Some(format!(
            "page size {} on the source, {} here",
            remote.page_size, local.page_size
        ));
    }
    if local.xstate_size != remote.xstate_size || local.xcr0 != remote.xcr0 {
        return Some(format!(
            "CPU state differs: source xstate {} bytes / XCR0 {:#x}, here {} / {:#x}",
            remote.xstate_size, remote.xcr0, local.xstate_size, local.xcr0
        ));
    }
    if local.vdso_layout != remote.vdso_layout {
        return Some(format!(
            "vDSO layout differs (source {:?}, here {:?}): the kernels must be the same",
            remote.vdso_layout, local.vdso_layout
        ));
    }
    None
}

impl<S: PageSink> Receiver<S> {
    pub fn new(config: ReceiverConfig, sink: S) -> Result<Self, WireError> {
        Ok(Receiver {
            config,
            state: State::AwaitHello,
            sink,
            decoder: BatchDecoder::new()?,
            session: None,
            peer: None,
            negotiated: None,
            lenient: false,
            target_nonce: None,
            ctx: None,
            start: None,
            conns: Vec::new(),
            last_round: 0,
            announced: Vec::new(),
            final_batches: None,
            rounds: Vec::new(),
            inventory: None,
            blobs: Vec::new(),
            plans: Vec::new(),
            released: false,
            failure: None,
        })
    }

    pub fn state(&self) -> State {
        self.state
    }

    /// The session id (after Hello).
    pub fn session(&self) -> Option<SessionId> {
        self.session
    }

    /// The source's Hello.
    pub fn peer(&self) -> Option<&Hello> {
        self.peer.as_ref()
    }

    /// Features both sides have (after Hello).
    pub fn negotiated(&self) -> Option<&Features> {
        self.negotiated.as_ref()
    }

    /// The accepted MigrationStart.
    pub fn start_info(&self) -> Option<&MigrationStart> {
        self.start.as_deref()
    }

    /// The inventory, between FinalState and the Restore event.
    pub fn inventory(&self) -> Option<&Inventory> {
        self.inventory.as_deref()
    }

    /// Every RoundEnd received, in order.
    pub fn rounds(&self) -> &[RoundEnd] {
        &self.rounds
    }

    /// Pages and bytes received, by kind, on all connections.
    pub fn stats(&self) -> &WireStats {
        self.decoder.stats()
    }

    /// Why the session failed.
    pub fn failure(&self) -> Option<&str> {
        self.failure.as_deref()
    }

    /// Whether the source confirmed it released its job (after Done).
    pub fn released(&self) -> bool {
        self.released
    }

    pub fn sink(&self) -> &S {
        &self.sink
    }

    pub fn sink_mut(&mut self) -> &mut S {
        &mut self.sink
    }

    pub fn into_sink(self) -> S {
        self.sink
    }

    fn set_state(&mut self, to: State) {
        if to != self.state {
            tracing::debug!(
                session = %self.session.unwrap_or_default(),
                "receiver {} -> {}",
                self.state,
                to
            );
            self.state = to;
        }
    }

    fn fail(&mut self, reason: String) {
        tracing::warn!(session = %self.session.unwrap_or_default(), "migration failed: {reason}");
        self.failure.get_or_insert(reason);
        self.set_state(State::Failed);
    }

    /// Records an error as the failure and passes it on.
    fn failing<T>(&mut self, r: Result<T, WireError>) -> Result<T, WireError> {
        if let Err(e) = &r {
            if self.state != State::Failed || self.failure.is_none() {
                self.fail(e.to_string());
            }
        }
        r
    }

    fn decode(&self, frame: &Frame<'_>) -> Result<Message, WireError> {
        if self.lenient {
            Message::decode_lenient(frame)
        } else {
            Message::decode(frame)
        }
    }

    /// A frame from the main connection.
    pub fn on_frame(&mut self, frame: &Frame<'_>) -> Result<Action, WireError> {
        let r = self.main_frame(frame);
        self.failing(r)
    }

    fn main_frame(&mut self, frame: &Frame<'_>) -> Result<Action, WireError> {
        if !self.state.allowed().contains(&frame.ty) {
            return Err(WireError::UnexpectedFrame {
                frame: frame.ty,
                state: self.state,
            });
        }
        if frame.ty == FrameType::PageBatch {
            self.batch(0, frame.payload)?;
            return Ok(Action::none());
        }
        match self.decode(frame)? {
            Message::Hello(h) => self.on_hello(h),
            Message::AuthResponse(r) => self.on_auth(r.mac, r.nonce),
            Message::MigrationStart(s) => Ok(self.on_start(s)),
            Message::RoundEnd(r) => self.on_round_end(r),
            Message::FinalState(inv) => self.on_final_state(inv),
            Message::Blob(b) => self.on_blob(b),
            Message::PostcopyPlan(p) => self.on_plan(p),
            Message::Commit => self.on_commit(),
            Message::Ping { seq } => Ok(Action::reply(Message::Pong { seq })),
            Message::Ack => {
                if self.released {
                    return Err(WireError::Protocol("a second Ack after Restored".into()));
                }
                self.released = true;
                tracing::info!(session = %self.session.unwrap_or_default(), "source released its job");
                Ok(Action {
                    send: Vec::new(),
                    event: Event::Released,
                })
            }
            Message::Abort { reason } | Message::Error { message: reason } => {
                self.fail(format!("source aborted: {reason}"));
                Ok(Action {
                    send: Vec::new(),
                    event: Event::Aborted { reason },
                })
            }
            other => Err(WireError::UnexpectedFrame {
                frame: other.frame_type(),
                state: self.state,
            }),
        }
    }

    fn refuse(&mut self, send: Vec<Message>, reason: String) -> Action {
        self.fail(reason.clone());
        Action {
            send,
            event: Event::Close { reason },
        }
    }

    fn on_hello(&mut self, h: Hello) -> Result<Action, WireError> {
        if h.role != Role::Source {
            return Err(WireError::Protocol(format!(
                "Hello from a {:?}; a target agent only talks to sources",
                h.role
            )));
        }
        self.session = Some(h.session);
        let ours = Hello::new(Role::Target, h.session, self.config.features);
        if let Err(e) = h.check_version() {
            let reason = e.to_string();
            return Ok(self.refuse(
                vec![
                    Message::Hello(ours),
                    Message::Error {
                        message: reason.clone(),
                    },
                ],
                reason,
            ));
        }
        let nonce = random_nonce()?;
        self.target_nonce = Some(nonce);
        self.negotiated = Some(self.config.features.negotiate(&h.features));
        self.lenient = h.minor > PROTOCOL_MINOR;
        tracing::info!(
            session = %h.session,
            "source {} (protocol {}.{}) says hello",
            h.software,
            h.major,
            h.minor
        );
        self.peer = Some(h);
        self.set_state(State::AwaitAuth);
        Ok(Action {
            send: vec![
                Message::Hello(ours),
                Message::AuthChallenge(AuthChallenge { nonce }),
            ],
            event: Event::None,
        })
    }

    fn on_auth(&mut self, mac: [u8; 32], source_nonce: Nonce) -> Result<Action, WireError> {
        let (Some(session), Some(target_nonce)) = (self.session, self.target_nonce) else {
            return Err(WireError::Protocol(
                "AuthResponse without a challenge".into(),
            ));
        };
        let ctx = AuthContext {
            session,
            target_nonce,
            source_nonce,
        };
        if !self.config.token.verify_source(&ctx, &mac) {
            return Ok(self.refuse(
                vec![Message::AuthFail {
                    reason: "authentication failed".into(),
                }],
                "the source failed to authenticate (wrong token?)".into(),
            ));
        }
        self.ctx = Some(ctx);
        self.set_state(State::AwaitStart);
        Ok(Action {
            send: vec![Message::AuthOk(AuthOk {
                mac: self.config.token.target_proof(&ctx),
            })],
            event: Event::Authenticated { session },
        })
    }

    fn on_start(&mut self, s: Box<MigrationStart>) -> Action {
        let neg = self.negotiated.unwrap_or(self.config.features);
        let refusal = if s.streams > neg.max_streams {
            Some(format!(
                "{} page streams asked, at most {} accepted",
                s.streams, neg.max_streams
            ))
        } else if !neg.allows(s.compression) {
            Some(format!("compression {} was not negotiated", s.compression))
        } else if s.mode.is_postcopy() && neg.flags & Features::POST_COPY == 0 {
            Some(format!("{} migration was not negotiated", s.mode))
        } else {
            self.config
                .machine
                .as_ref()
                .and_then(|m| machine_mismatch(m, &s.machine))
        };
        if let Some(reason) = refusal {
            return self.refuse(
                vec![Message::Abort {
                    reason: reason.clone(),
                }],
                format!("migration refused: {reason}"),
            );
        }
        if let Some(m) = &self.config.machine {
            if m.kernel_release != s.machine.kernel_release {
                tracing::warn!(
                    "source runs kernel {}, this node {}",
                    s.machine.kernel_release,
                    m.kernel_release
                );
            }
        }
        tracing::info!(
            session = %self.session.unwrap_or_default(),
            job = %s.job,
            "migration accepted: {} processes, ~{} pages, {} streams, {}",
            s.processes,
            s.total_pages,
            s.streams,
            s.compression
        );
        self.conns = vec![Conn::default(); 1 + s.streams as usize];
        self.conns[0].joined = true;
        self.announced = vec![0; self.conns.len()];
        self.start = Some(s.clone());
        self.set_state(State::ReceivingPages);
        Action {
            send: vec![Message::Ack],
            event: Event::Started(s),
        }
    }

    fn batch(&mut self, conn: usize, payload: &[u8]) -> Result<(), WireError> {
        let h = peek_header(payload)?;
        let c = self.conns.get(conn).copied().unwrap_or_default();
        if let Some(f) = &self.final_batches {
            if c.batches >= f.get(conn).copied().unwrap_or(0) {
                return Err(WireError::Protocol(format!(
                    "connection {conn} sent more batches than the last RoundEnd announced ({})",
                    c.batches
                )));
            }
        }
        if h.round == 0 || h.round < c.round {
            return Err(WireError::Protocol(format!(
                "connection {conn}: batch of round {} after round {}",
                h.round, c.round
            )));
        }
        if self.final_batches.is_some() && h.round > self.last_round {
            return Err(WireError::Protocol(format!(
                "connection {conn}: batch of round {} after the last round {}",
                h.round, self.last_round
            )));
        }
        self.decoder.decode_to(payload, &mut self.sink)?;
        if let Some(c) = self.conns.get_mut(conn) {
            c.batches += 1;
            c.round = h.round;
        }
        Ok(())
    }

    fn on_round_end(&mut self, r: RoundEnd) -> Result<Action, WireError> {
        if r.round != self.last_round + 1 {
            return Err(WireError::Protocol(format!(
                "RoundEnd for round {} after round {}",
                r.round, self.last_round
            )));
        }
        if r.batches.len() != self.conns.len() {
            return Err(WireError::Protocol(format!(
                "RoundEnd counts {} connections, the migration has {}",
                r.batches.len(),
                self.conns.len()
            )));
        }
        if r.batches[0] != self.conns[0].batches {
            return Err(WireError::Protocol(format!(
                "RoundEnd announces {} batches on the main connection, {} arrived",
                r.batches[0], self.conns[0].batches
            )));
        }
        for (i, (&new, &old)) in r.batches.iter().zip(&self.announced).enumerate() {
            if new < old {
                return Err(WireError::Protocol(format!(
                    "RoundEnd: connection {i} went back from {old} to {new} batches"
                )));
            }
            let c = &self.conns[i];
            if c.closed && c.batches < new {
                return Err(WireError::Protocol(format!(
                    "page stream {i} closed after {} of {new} batches",
                    c.batches
                )));
            }
            if r.last && c.batches > new {
                return Err(WireError::Protocol(format!(
                    "connection {i} delivered {} batches, the last RoundEnd announces {new}",
                    c.batches
                )));
            }
        }
        self.last_round = r.round;
        self.announced.clone_from(&r.batches);
        if r.last {
            self.final_batches = Some(r.batches.clone());
            self.set_state(State::AwaitFinalState);
        }
        tracing::debug!(
            session = %self.session.unwrap_or_default(),
            "round {} ended: {} pages sent, {} dirty{}",
            r.round,
            r.pages_sent,
            r.dirty_count,
            if r.last { " (last)" } else { "" }
        );
        self.rounds.push(r.clone());
        Ok(Action {
            send: Vec::new(),
            event: Event::RoundEnded(r),
        })
    }

    fn on_final_state(&mut self, inv: Box<Inventory>) -> Result<Action, WireError> {
        if let Some(s) = &self.start {
            if s.machine != inv.machine {
                return Err(WireError::Protocol(
                    "FinalState describes another machine than MigrationStart".into(),
                ));
            }
        }
        self.blobs = inv.blobs.iter().map(|_| Vec::new()).collect();
        self.inventory = Some(inv);
        self.set_state(State::AwaitCommit);
        Ok(Action::none())
    }

    fn on_blob(&mut self, b: super::messages::BlobChunk) -> Result<Action, WireError> {
        let Some(inv) = &self.inventory else {
            return Err(WireError::Protocol("Blob before FinalState".into()));
        };
        let (Some(want), Some(have)) = (
            inv.blobs.get(b.index as usize),
            self.blobs.get_mut(b.index as usize),
        ) else {
            return Err(WireError::Protocol(format!(
                "Blob #{} not in the inventory",
                b.index
            )));
        };
        if b.offset != have.len() as u64 || have.len() as u64 + b.data.len() as u64 > want.len {
            return Err(WireError::Protocol(format!(
                "Blob #{} piece at {}+{} does not follow {} of {} bytes",
                b.index,
                b.offset,
                b.data.len(),
                have.len(),
                want.len
            )));
        }
        have.extend_from_slice(&b.data);
        Ok(Action::none())
    }

    fn on_plan(&mut self, p: super::messages::PostcopyPlan) -> Result<Action, WireError> {
        if !self.start.as_ref().is_some_and(|s| s.mode.is_postcopy()) {
            return Err(WireError::Protocol(
                "PostcopyPlan in a pre-copy migration".into(),
            ));
        }
        let known = self
            .inventory
            .as_ref()
            .is_some_and(|inv| inv.processes.iter().any(|q| q.pid == p.pid));
        if !known {
            return Err(WireError::Protocol(format!(
                "PostcopyPlan for pid {}, which is not in the inventory",
                p.pid
            )));
        }
        let mut last_end = 0u64;
        for r in &p.runs {
            let end = (r.npages as u64)
                .checked_mul(super::PAGE_SIZE as u64)
                .and_then(|len| r.addr.checked_add(len));
            match end {
                Some(end) if r.npages > 0 && r.addr % super::PAGE_SIZE as u64 == 0 && r.addr >= last_end => {
                    last_end = end
                }
                _ => {
                    return Err(WireError::Protocol(format!(
                        "PostcopyPlan of pid {}: run {:#x}+{} pages is empty, unaligned or out of order",
                        p.pid, r.addr, r.npages
                    )))
                }
            }
        }
        let total: usize = self.plans.iter().map(|q| q.runs.len()).sum::<usize>() + p.runs.len();
        if total > 16 * super::messages::MAX_PLAN_RUNS {
            return Err(WireError::Protocol(format!(
                "post-copy plans of {total} runs are too large"
            )));
        }
        self.plans.push(p);
        Ok(Action::none())
    }

    /// The post-copy plans received (empty for pre-copy).
    pub fn take_plans(&mut self) -> Vec<super::messages::PostcopyPlan> {
        std::mem::take(&mut self.plans)
    }

    /// Contents of the inventory's blobs, complete and checked once the
    /// restore has been announced.
    pub fn take_blobs(&mut self) -> Vec<Vec<u8>> {
        std::mem::take(&mut self.blobs)
    }

    fn streams_complete(&self) -> bool {
        match &self.final_batches {
            Some(f) => self.conns.iter().zip(f).all(|(c, &n)| c.batches == n),
            None => false,
        }
    }

    fn on_commit(&mut self) -> Result<Action, WireError> {
        if self.streams_complete() {
            self.enter_restoring()
        } else {
            tracing::debug!("commit received; waiting for page streams");
            self.set_state(State::AwaitStreams);
            Ok(Action::none())
        }
    }

    fn enter_restoring(&mut self) -> Result<Action, WireError> {
        self.sink.flush().map_err(WireError::SinkFlush)?;
        let Some(inv) = self.inventory.take() else {
            return Err(WireError::Protocol("Commit without FinalState".into()));
        };
        for (i, (want, have)) in inv.blobs.iter().zip(&self.blobs).enumerate() {
            if have.len() as u64 != want.len || crc32c::crc32c(have) != want.crc {
                return Err(WireError::Protocol(format!(
                    "Blob #{i} incomplete or corrupt at Commit ({} of {} bytes)",
                    have.len(),
                    want.len
                )));
            }
        }
        tracing::info!(
            session = %self.session.unwrap_or_default(),
            "all pages in ({} pages over {} rounds): restoring",
            self.decoder.stats().pages(),
            self.last_round
        );
        self.set_state(State::Restoring);
        Ok(Action {
            send: Vec::new(),
            event: Event::Restore(inv),
        })
    }

    /// The first frame of a new page connection. On success returns the
    /// stream index and the Ack to send on that connection. A refused join
    /// does not affect the session: answer it with `AuthFail` and close
    /// that connection only.
    pub fn on_stream_join(&mut self, frame: &Frame<'_>) -> Result<(u16, Action), WireError> {
        if frame.ty != FrameType::StreamJoin {
            return Err(WireError::Protocol(format!(
                "a page connection must start with StreamJoin, not {}",
                frame.ty
            )));
        }
        if self.state != State::ReceivingPages {
            return Err(WireError::UnexpectedFrame {
                frame: frame.ty,
                state: self.state,
            });
        }
        let Message::StreamJoin(j) = self.decode(frame)? else {
            return Err(WireError::Protocol(
                "StreamJoin did not decode as one".into(),
            ));
        };
        let (Some(session), Some(ctx)) = (self.session, self.ctx) else {
            return Err(WireError::Protocol(
                "stream join before authentication".into(),
            ));
        };
        if j.session != session {
            return Err(WireError::Auth(format!(
                "stream join for session {}, this is session {session}",
                j.session
            )));
        }
        let i = j.index as usize;
        if i == 0 || i >= self.conns.len() {
            return Err(WireError::Protocol(format!(
                "stream index {i} outside 1..={}",
                self.conns.len().saturating_sub(1)
            )));
        }
        if !self.config.token.verify_join(&ctx, j.index, &j.mac) {
            return Err(WireError::Auth(format!(
                "bad proof on the join of stream {i}"
            )));
        }
        if self.conns[i].joined {
            return Err(WireError::Protocol(format!("stream {i} joined twice")));
        }
        self.conns[i].joined = true;
        tracing::debug!(session = %session, "page stream {i} joined");
        Ok((j.index, Action::reply(Message::Ack)))
    }

    /// A frame from page connection `index` (after its join).
    pub fn on_stream_frame(&mut self, index: u16, frame: &Frame<'_>) -> Result<Action, WireError> {
        let r = self.stream_frame(index, frame);
        self.failing(r)
    }

    fn stream_frame(&mut self, index: u16, frame: &Frame<'_>) -> Result<Action, WireError> {
        let i = index as usize;
        match self.conns.get(i) {
            Some(c) if i > 0 && c.joined && !c.closed => {}
            _ => {
                return Err(WireError::Protocol(format!(
                    "frame on page stream {i}, which has not joined"
                )))
            }
        }
        if frame.ty != FrameType::PageBatch {
            return Err(WireError::Protocol(format!(
                "{} on page stream {i}: page streams carry only PageBatch",
                frame.ty
            )));
        }
        if !self.state.accepts_stream_pages() {
            return Err(WireError::UnexpectedFrame {
                frame: frame.ty,
                state: self.state,
            });
        }
        self.batch(i, frame.payload)?;
        if self.state == State::AwaitStreams && self.streams_complete() {
            return self.enter_restoring();
        }
        Ok(Action::none())
    }

    /// Page connection `index` ended (EOF or error). An error if it still
    /// owed batches the last RoundEnd announced.
    pub fn on_stream_closed(&mut self, index: u16) -> Result<Action, WireError> {
        let i = index as usize;
        let Some(c) = self.conns.get_mut(i) else {
            return Ok(Action::none());
        };
        c.closed = true;
        let got = c.batches;
        if let Some(f) = &self.final_batches {
            let want = f.get(i).copied().unwrap_or(0);
            if got < want
                && matches!(
                    self.state,
                    State::AwaitFinalState | State::AwaitCommit | State::AwaitStreams
                )
            {
                let r = Err(WireError::Protocol(format!(
                    "page stream {i} closed after {got} of {want} batches"
                )));
                return self.failing(r);
            }
        }
        Ok(Action::none())
    }

    /// The main connection ended. Returns the event for the agent: nothing
    /// after `Done` (or while restoring: the restore goes on, its result
    /// can no longer be reported); otherwise the session failed.
    pub fn on_main_closed(&mut self) -> Event {
        match self.state {
            State::Done | State::Failed => Event::None,
            State::Restoring => {
                tracing::warn!(
                    session = %self.session.unwrap_or_default(),
                    "source disconnected during the restore; its outcome cannot be reported"
                );
                Event::None
            }
            _ => {
                let reason = format!("source disconnected in state {}", self.state);
                self.fail(reason.clone());
                Event::Aborted { reason }
            }
        }
    }

    /// Reports the restore's outcome; returns the message for the source
    /// (on the main connection).
    pub fn restore_finished(
        &mut self,
        outcome: Result<Restored, String>,
    ) -> Result<Action, WireError> {
        if self.state != State::Restoring {
            return Err(WireError::Protocol(format!(
                "restore_finished in state {}",
                self.state
            )));
        }
        match outcome {
            Ok(r) => {
                tracing::info!(
                    session = %self.session.unwrap_or_default(),
                    "restored: pid {} in {} ms",
                    r.pid,
                    r.restore_ms
                );
                self.set_state(State::Done);
                Ok(Action::reply(Message::Restored(r)))
            }
            Err(reason) => Ok(self.refuse(
                vec![Message::RestoreFailed {
                    reason: reason.clone(),
                }],
                format!("restore failed: {reason}"),
            )),
        }
    }

    /// This side gives up (timeout, disk full, shutdown): returns the Abort
    /// to send, or None when the session is already over.
    pub fn abort(&mut self, reason: &str) -> Option<Message> {
        if matches!(self.state, State::Done | State::Failed) {
            return None;
        }
        self.fail(format!("aborted here: {reason}"));
        Some(Message::Abort {
            reason: reason.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::frame::OwnedFrame;
    use crate::wire::messages::{AuthResponse, Compression, StreamJoin};
    use crate::wire::pages::BatchEncoder;
    use crate::wire::sink::{MemorySink, PageContent};
    use crate::wire::MigrationMode;
    use crate::wire::PAGE_SIZE;

    fn machine() -> MachineInfo {
        MachineInfo {
            kernel_release: "6.18.0".into(),
            hostname: "a".into(),
            page_size: 4096,
            xstate_size: 2696,
            xcr0: 0x2e7,
            vdso_layout: vec![("[vdso]".into(), 8192)],
        }
    }

    fn inventory() -> Inventory {
        Inventory {
            machine: machine(),
            root_pid: 100,
            processes: Vec::new(),
            files: Vec::new(),
            pipes: Vec::new(),
            blobs: Vec::new(),
            created_ns: 1,
            pidns: None,
        }
    }

    fn frame(m: &Message) -> OwnedFrame {
        OwnedFrame::new(m.frame_type(), m.encode().unwrap())
    }

    fn start(streams: u16) -> Message {
        Message::MigrationStart(Box::new(MigrationStart {
            job: "job".into(),
            description: String::new(),
            mode: MigrationMode::PreCopy,
            compression: Compression::Lz4,
            streams,
            total_pages: 10,
            processes: 1,
            machine: machine(),
        }))
    }

    fn batch(pid: i32, round: u32, pages: &[(u64, u8)]) -> OwnedFrame {
        let mut enc = BatchEncoder::new(Compression::Lz4).unwrap();
        enc.begin(pid, round);
        for &(a, fill) in pages {
            enc.push(a, &[fill; PAGE_SIZE]).unwrap();
        }
        OwnedFrame::new(FrameType::PageBatch, enc.finish().unwrap().to_vec())
    }

    fn round_end(round: u32, last: bool, batches: Vec<u64>) -> OwnedFrame {
        frame(&Message::RoundEnd(RoundEnd {
            round,
            pages_sent: 0,
            dirty_count: 0,
            last,
            batches,
        }))
    }

    /// Drives a receiver through Hello and auth with `token`; returns the
    /// context the source would hold.
    fn authenticate(rx: &mut Receiver<MemorySink>, token: &AuthToken) -> (Action, AuthContext) {
        let session = SessionId([3; 16]);
        let hello = Hello::new(Role::Source, session, Features::ours(4));
        let a = rx
            .on_frame(&frame(&Message::Hello(hello)).as_frame())
            .unwrap();
        assert_eq!(rx.state(), State::AwaitAuth);
        let Message::AuthChallenge(c) = &a.send[1] else {
            panic!("no challenge: {a:?}")
        };
        let ctx = AuthContext {
            session,
            target_nonce: c.nonce,
            source_nonce: [8; 32],
        };
        let resp = Message::AuthResponse(AuthResponse {
            mac: token.source_proof(&ctx),
            nonce: ctx.source_nonce,
        });
        (rx.on_frame(&frame(&resp).as_frame()).unwrap(), ctx)
    }

    fn receiver() -> Receiver<MemorySink> {
        let mut cfg = ReceiverConfig::new(AuthToken::new(b"secret-token-0123").unwrap());
        cfg.machine = Some(machine());
        Receiver::new(cfg, MemorySink::new()).unwrap()
    }

    #[test]
    fn receivers_and_coders_can_move_between_threads() {
        fn send<T: Send>() {}
        send::<Receiver<MemorySink>>();
        send::<Receiver<Box<dyn PageSink>>>();
        send::<BatchEncoder>();
        send::<BatchDecoder>();
    }

    #[test]
    fn postcopy_plans_are_checked_and_kept() {
        use crate::wire::messages::{PlanRun, PostcopyPlan};
        let plan = |pid, runs: Vec<(u64, u32)>| {
            frame(&Message::PostcopyPlan(PostcopyPlan {
                pid,
                runs: runs
                    .into_iter()
                    .map(|(addr, npages)| PlanRun { addr, npages })
                    .collect(),
            }))
        };
        let session = || {
            let mut rx = receiver();
            let token = AuthToken::new(b"secret-token-0123").unwrap();
            let _ = authenticate(&mut rx, &token);
            let Message::MigrationStart(mut s) = start(0) else {
                unreachable!()
            };
            s.mode = MigrationMode::PostCopy;
            let a = rx
                .on_frame(&frame(&Message::MigrationStart(s)).as_frame())
                .unwrap();
            assert_eq!(a.send, vec![Message::Ack]);
            let _ = rx
                .on_frame(&round_end(1, true, vec![0]).as_frame())
                .unwrap();
            let mut inv = inventory();
            inv.processes
                .push(crate::image::tests_support::process(100, Vec::new()));
            let inv = Message::FinalState(Box::new(inv));
            let _ = rx.on_frame(&frame(&inv).as_frame()).unwrap();
            assert_eq!(rx.state(), State::AwaitCommit);
            rx
        };
        // A 4 GiB run (2^20 pages: 2^32 bytes) and a second one after it.
        let mut rx = session();
        let big = plan(
            100,
            vec![(0x7f00_0000_0000, 1 << 20), (0x7f02_0000_0000, 3)],
        );
        let _ = rx.on_frame(&big.as_frame()).unwrap();
        assert_eq!(rx.take_plans()[0].runs.len(), 2);
        for bad in [
            plan(100, vec![(0x1001, 1)]),
            plan(100, vec![(0x1000, 0)]),
            plan(100, vec![(0x5000, 1), (0x1000, 1)]),
            plan(100, vec![(u64::MAX - 0xfff, 2)]),
            plan(7, vec![(0x1000, 1)]),
        ] {
            let mut rx = session();
            assert!(rx.on_frame(&bad.as_frame()).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn full_session_on_the_main_connection() {
        let mut rx = receiver();
        let token = AuthToken::new(b"secret-token-0123").unwrap();
        let (a, ctx) = authenticate(&mut rx, &token);
        let Message::AuthOk(ok) = &a.send[0] else {
            panic!("{a:?}")
        };
        assert!(token.verify_target(&ctx, &ok.mac), "mutual authentication");
        assert_eq!(rx.state(), State::AwaitStart);
        let a = rx.on_frame(&frame(&start(0)).as_frame()).unwrap();
        assert_eq!(a.send, vec![Message::Ack]);
        assert!(matches!(a.event, Event::Started(_)));
        let _ = rx
            .on_frame(&batch(100, 1, &[(0x1000, 1), (0x2000, 0)]).as_frame())
            .unwrap();
        let a = rx
            .on_frame(&round_end(1, false, vec![1]).as_frame())
            .unwrap();
        assert!(matches!(a.event, Event::RoundEnded(_)));
        let _ = rx
            .on_frame(&batch(100, 2, &[(0x1000, 9)]).as_frame())
            .unwrap();
        let _ = rx
            .on_frame(&round_end(2, true, vec![2]).as_frame())
            .unwrap();
        assert_eq!(rx.state(), State::AwaitFinalState);
        let inv = Message::FinalState(Box::new(inventory()));
        let _ = rx.on_frame(&frame(&inv).as_frame()).unwrap();
        assert_eq!(rx.state(), State::AwaitCommit);
        let a = rx.on_frame(&frame(&Message::Commit).as_frame()).unwrap();
        let Event::Restore(got) = a.event else {
            panic!("{a:?}")
        };
        assert_eq!(*got, inventory());
        assert_eq!(rx.state(), State::Restoring);
        let a = rx
            .restore_finished(Ok(Restored {
                pid: 100,
                restore_ms: 5,
            }))
            .unwrap();
        assert!(matches!(a.send[0], Message::Restored(_)));
        assert_eq!(rx.state(), State::Done);
        let a = rx.on_frame(&frame(&Message::Ack).as_frame()).unwrap();
        assert_eq!(a.event, Event::Released);
        assert_eq!(
            rx.sink().get(100, 0x1000),
            Some(PageContent::Data(&[9; PAGE_SIZE]))
        );
        assert_eq!(rx.sink().get(100, 0x2000), Some(PageContent::Zero));
        assert_eq!(rx.stats().pages(), 3);
        assert_eq!(rx.rounds().len(), 2);
    }

    #[test]
    fn wrong_token_is_refused_with_auth_fail() {
        let mut rx = receiver();
        let (a, _) = authenticate(&mut rx, &AuthToken::new(b"not-the-token").unwrap());
        assert!(matches!(a.send[0], Message::AuthFail { .. }));
        assert!(matches!(a.event, Event::Close { .. }));
        assert_eq!(rx.state(), State::Failed);
        assert!(rx.on_frame(&frame(&start(0)).as_frame()).is_err());
    }

    #[test]
    fn other_major_version_gets_our_hello_and_an_error() {
        let mut rx = receiver();
        let mut hello = Hello::new(Role::Source, SessionId([1; 16]), Features::ours(1));
        hello.major = 2;
        let a = rx
            .on_frame(&frame(&Message::Hello(hello)).as_frame())
            .unwrap();
        assert!(matches!(a.send[0], Message::Hello(_)));
        assert!(matches!(a.send[1], Message::Error { .. }));
        assert!(matches!(a.event, Event::Close { .. }));
        assert_eq!(rx.state(), State::Failed);
    }

    #[test]
    fn incompatible_start_is_refused() {
        for bad in [
            |s: &mut MigrationStart| s.machine.xcr0 = 7,
            |s: &mut MigrationStart| s.streams = 99,
        ] {
            let mut rx = receiver();
            let token = AuthToken::new(b"secret-token-0123").unwrap();
            let _ = authenticate(&mut rx, &token);
            let Message::MigrationStart(mut s) = start(0) else {
                unreachable!()
            };
            bad(&mut s);
            let a = rx
                .on_frame(&frame(&Message::MigrationStart(s)).as_frame())
                .unwrap();
            assert!(matches!(a.send[0], Message::Abort { .. }), "{a:?}");
            assert!(matches!(a.event, Event::Close { .. }));
            assert_eq!(rx.state(), State::Failed);
        }
    }

    #[test]
    fn commit_waits_for_page_streams() {
        let mut rx = receiver();
        let token = AuthToken::new(b"secret-token-0123").unwrap();
        let (_, ctx) = authenticate(&mut rx, &token);
        let _ = rx.on_frame(&frame(&start(2)).as_frame()).unwrap();
        for i in 1..=2u16 {
            let j = frame(&Message::StreamJoin(StreamJoin {
                session: ctx.session,
                index: i,
                mac: token.join_proof(&ctx, i),
            }));
            let (idx, a) = rx.on_stream_join(&j.as_frame()).unwrap();
            assert_eq!((idx, a.send), (i, vec![Message::Ack]));
            // Replayed join: refused, session unaffected.
            assert!(rx.on_stream_join(&j.as_frame()).is_err());
        }
        // A join with a bad proof, and one for stream 3, are refused.
        let j = frame(&Message::StreamJoin(StreamJoin {
            session: ctx.session,
            index: 3,
            mac: token.join_proof(&ctx, 3),
        }));
        assert!(rx.on_stream_join(&j.as_frame()).is_err());
        assert_eq!(rx.state(), State::ReceivingPages);

        let _ = rx
            .on_stream_frame(1, &batch(100, 1, &[(0x1000, 1)]).as_frame())
            .unwrap();
        let _ = rx
            .on_frame(&round_end(1, true, vec![0, 1, 1]).as_frame())
            .unwrap();
        let _ = rx
            .on_frame(&frame(&Message::FinalState(Box::new(inventory()))).as_frame())
            .unwrap();
        let a = rx.on_frame(&frame(&Message::Commit).as_frame()).unwrap();
        assert_eq!(a.event, Event::None);
        assert_eq!(rx.state(), State::AwaitStreams);
        let a = rx
            .on_stream_frame(2, &batch(100, 1, &[(0x200000, 2)]).as_frame())
            .unwrap();
        assert!(matches!(a.event, Event::Restore(_)));
        assert_eq!(rx.state(), State::Restoring);
        // One batch too many.
        assert!(rx
            .on_stream_frame(2, &batch(100, 1, &[(0x300000, 2)]).as_frame())
            .is_err());
        assert_eq!(rx.state(), State::Failed);
    }

    #[test]
    fn stream_closing_early_fails_the_session() {
        let mut rx = receiver();
        let token = AuthToken::new(b"secret-token-0123").unwrap();
        let (_, ctx) = authenticate(&mut rx, &token);
        let _ = rx.on_frame(&frame(&start(1)).as_frame()).unwrap();
        let j = frame(&Message::StreamJoin(StreamJoin {
            session: ctx.session,
            index: 1,
            mac: token.join_proof(&ctx, 1),
        }));
        let _ = rx.on_stream_join(&j.as_frame()).unwrap();
        let _ = rx
            .on_frame(&round_end(1, true, vec![0, 3]).as_frame())
            .unwrap();
        assert!(rx.on_stream_closed(1).is_err());
        assert_eq!(rx.state(), State::Failed);
    }

    #[test]
    fn rounds_must_advance_and_counts_must_match() {
        let mut rx = receiver();
        let token = AuthToken::new(b"secret-token-0123").unwrap();
        let _ = authenticate(&mut rx, &token);
        let _ = rx.on_frame(&frame(&start(0)).as_frame()).unwrap();
        let _ = rx
            .on_frame(&batch(1, 1, &[(0x1000, 1)]).as_frame())
            .unwrap();
        assert!(rx
            .on_frame(&round_end(1, false, vec![5]).as_frame())
            .is_err());
        assert_eq!(rx.state(), State::Failed);

        let mut rx = receiver();
        let _ = authenticate(&mut rx, &token);
        let _ = rx.on_frame(&frame(&start(0)).as_frame()).unwrap();
        let _ = rx
            .on_frame(&batch(1, 2, &[(0x1000, 1)]).as_frame())
            .unwrap();
        assert!(rx
            .on_frame(&batch(1, 1, &[(0x1000, 1)]).as_frame())
            .is_err());

        let mut rx = receiver();
        let _ = authenticate(&mut rx, &token);
        let _ = rx.on_frame(&frame(&start(0)).as_frame()).unwrap();
        assert!(rx
            .on_frame(&round_end(2, false, vec![0]).as_frame())
            .is_err());
    }

    #[test]
    fn abort_from_the_source_and_here() {
        let mut rx = receiver();
        let token = AuthToken::new(b"secret-token-0123").unwrap();
        let _ = authenticate(&mut rx, &token);
        let a = rx
            .on_frame(&frame(&Message::Abort { reason: "x".into() }).as_frame())
            .unwrap();
        assert_eq!(a.event, Event::Aborted { reason: "x".into() });
        assert_eq!(rx.state(), State::Failed);
        assert!(rx.abort("again").is_none());

        let mut rx = receiver();
        let _ = authenticate(&mut rx, &token);
        assert!(matches!(rx.abort("timeout"), Some(Message::Abort { .. })));
        assert_eq!(rx.state(), State::Failed);
        assert_eq!(rx.failure(), Some("aborted here: timeout"));
    }

    #[test]
    fn pings_are_answered() {
        let mut rx = receiver();
        let token = AuthToken::new(b"secret-token-0123").unwrap();
        let _ = authenticate(&mut rx, &token);
        let a = rx
            .on_frame(&frame(&Message::Ping { seq: 5 }).as_frame())
            .unwrap();
        assert_eq!(a.send, vec![Message::Pong { seq: 5 }]);
        assert_eq!(rx.state(), State::AwaitStart);
    }
}
