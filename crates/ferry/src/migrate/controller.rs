//! Convergence controllers: when to stop pre-copy iterations and freeze.
//!
//! Iterative pre-copy sends the whole memory of the job once (round 0, the
//! *full pass*), then resends the pages the job wrote meanwhile, round after
//! round, and finally freezes the job and sends what is still dirty
//! (stop-and-copy). A [`Controller`] looks at the statistics of every round
//! ([`RoundStats`]) and decides whether to go on or to freeze.
//!
//! Four controllers exist, chosen by a spec string ([`parse`]):
//!
//! * `stop-copy` ([`StopCopy`]) — no live phase at all: the
//!   checkpoint/restart baseline.
//! * `downtime:<ms>` ([`Downtime`]) — the KVM rule (Ibrahim et al.,
//!   Algorithm 1, lines 28-32): `expected_downtime = remaining / bandwidth`;
//!   stop when it is below the target.
//! * `iterations:<n>` ([`Iterations`]) — the Xen rule (Ibrahim et al.,
//!   section 9, and Xen's `xc_domain_save`): stop after `n` rounds, when
//!   fewer than 50 pages are dirty, or when more than 3x the memory has been
//!   sent in total.
//! * `adaptive` ([`Adaptive`], the default) — the algorithm of Ibrahim,
//!   Hofmeyr, Iancu, Roman, "Optimized Pre-Copy Live Migration for Memory
//!   Intensive Applications" (SC'11), section 7 and Algorithm 2: after one full
//!   pass, sample the memory activity every interval and switch to
//!   stop-and-copy as soon as one of three *memory-update patterns* (their
//!   Figure 10 / Table 1) shows that going on cannot lower the downtime:
//!   **a** stable modified level, **b** small migration activity,
//!   **c** (90 %) retransmission of modified pages.
//!
//! The controllers are pure logic: they never touch the job, time or the
//! network; the migration engine measures and feeds them. That keeps them
//! unit-testable with synthetic sequences (see the tests at the end).

use serde::{Deserialize, Serialize};
use std::collections::VecDeque;
use std::fmt;
use std::time::Duration;

/// Size of a page of the job's memory (x86_64). Kept local rather than taken
/// from `sys` so the migrate layer does not reach into `sys`.
pub const PAGE_SIZE: u64 = 4096;

/// Hard safety cap on live rounds for the `downtime` controller and the
/// default cap of the adaptive one: whatever the workload does, pre-copy ends.
pub const HARD_MAX_ROUNDS: u32 = 30;

/// Xen rule: stop when fewer than this many pages are dirty.
pub const FEW_DIRTY_PAGES: u64 = 50;

/// Xen rule (`max_factor`): stop when more than this many times the job's
/// memory has been sent in total.
pub const MAX_SENT_FACTOR: u64 = 3;

/// Statistics of one pre-copy round (or sampling interval), fed by the
/// migration engine to [`Controller::decide`], once per round, in order.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RoundStats {
    /// 0 = the first full pass. Informational (reports, logs): controllers
    /// count the calls to `decide` themselves.
    pub round: u32,
    /// Wall time of the round. With a sampling interval this is the time
    /// between two harvests of the dirty set: `max(interval, send time)`.
    pub duration: Duration,
    /// Pages transmitted this round.
    pub pages_sent: u64,
    /// Bytes on the wire this round (after zero-page elision and compression).
    pub bytes_sent: u64,
    /// Pages found dirty (written) at the end of this round = what remains
    /// to send (and what the freeze would have to send now).
    pub dirty_pages: u64,
    /// Of `pages_sent`, how many had already been sent in the previous
    /// round (retransmissions).
    pub resent_pages: u64,
    /// Pages of the job's memory in total.
    pub total_pages: u64,
    /// Measured transfer rate of this round in bytes/s, *while sending*
    /// (bytes sent / time spent sending, not counting the idle part of a
    /// sampling interval). 0, negative or not finite = unknown.
    pub bandwidth: f64,
}

impl RoundStats {
    /// Bytes still to send if the job were frozen now (raw pages: compression
    /// and zero pages only make the real figure smaller).
    pub fn remaining_bytes(&self) -> u64 {
        self.dirty_pages.saturating_mul(PAGE_SIZE)
    }

    /// Remaining bytes / bandwidth as seconds: 0 when nothing is dirty,
    /// +inf when the bandwidth is unknown.
    pub fn estimated_downtime_secs(&self) -> f64 {
        transfer_secs(self.remaining_bytes(), self.bandwidth)
    }

    /// Remaining bytes / bandwidth, saturating at [`Duration::MAX`] when the
    /// bandwidth is unknown.
    pub fn estimated_downtime(&self) -> Duration {
        secs_to_duration(self.estimated_downtime_secs())
    }

    /// `resent_pages / pages_sent`, or `None` when nothing was sent.
    pub fn retransmit_ratio(&self) -> Option<f64> {
        (self.pages_sent > 0)
            .then(|| self.resent_pages.min(self.pages_sent) as f64 / self.pages_sent as f64)
    }
}

/// Seconds to move `bytes` at `bandwidth` bytes/s (+inf if it is unknown).
fn transfer_secs(bytes: u64, bandwidth: f64) -> f64 {
    if bytes == 0 {
        0.0
    } else if bandwidth > 0.0 {
        // An infinite bandwidth gives 0, NaN fails the comparison above.
        bytes as f64 / bandwidth
    } else {
        f64::INFINITY
    }
}

fn secs_to_duration(secs: f64) -> Duration {
    Duration::try_from_secs_f64(secs).unwrap_or(Duration::MAX)
}

/// What the engine does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Run another live round.
    Continue,
    /// Freeze the job and send the rest.
    StopAndCopy { reason: StopReason },
}

impl Decision {
    pub fn is_stop(&self) -> bool {
        matches!(self, Decision::StopAndCopy { .. })
    }

    /// The reason, when this is a stop.
    pub fn reason(&self) -> Option<StopReason> {
        match self {
            Decision::Continue => None,
            Decision::StopAndCopy { reason } => Some(*reason),
        }
    }
}

/// Why the live phase ended (goes into the migration report).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    /// Adaptive, pattern a: modified pages per interval are stable.
    PatternA,
    /// Adaptive, pattern b: the dirty set drains in less than one interval.
    PatternB,
    /// Adaptive, pattern c: the pages sent are mostly retransmissions.
    PatternC,
    /// KVM rule: the estimated downtime fell below the target.
    DowntimeReached,
    /// The round cap was reached (iterations:n, max-iterations, safety cap).
    MaxIterations,
    /// Xen rule: fewer than 50 pages dirty.
    FewDirty,
    /// Xen rule: more than 3x the job's memory sent in total.
    TooMuchSent,
    /// The stop-copy controller: no live phase was wanted.
    Manual,
}

impl StopReason {
    /// The memory-update pattern of Ibrahim et al. that fired ("a", "b",
    /// "c"), as in their Table 1; `None` for the other rules.
    pub fn pattern(&self) -> Option<&'static str> {
        match self {
            StopReason::PatternA => Some("a"),
            StopReason::PatternB => Some("b"),
            StopReason::PatternC => Some("c"),
            _ => None,
        }
    }

    /// One line for humans.
    pub fn describe(&self) -> &'static str {
        match self {
            StopReason::PatternA => {
                "pattern a: modified pages per interval are stable, more rounds cannot lower the downtime"
            }
            StopReason::PatternB => {
                "pattern b: the dirty pages are sent in less than one interval (activity below what the link drains)"
            }
            StopReason::PatternC => {
                "pattern c: most pages sent this round had been sent the round before (retransmission)"
            }
            StopReason::DowntimeReached => "estimated downtime fell below the target",
            StopReason::MaxIterations => "round limit reached",
            StopReason::FewDirty => "fewer than 50 pages dirty",
            StopReason::TooMuchSent => "more than 3x the job's memory sent",
            StopReason::Manual => "stop-and-copy without a live phase",
        }
    }
}

impl fmt::Display for StopReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.describe())
    }
}

/// Decides, round by round, when pre-copy stops.
pub trait Controller: Send {
    /// The spec that builds this controller again with [`parse`], e.g.
    /// "adaptive", "downtime:300", "iterations:30", "stop-copy".
    fn name(&self) -> String;

    /// Whether there is a live (pre-copy) phase at all; false for stop-copy.
    fn live_phase(&self) -> bool {
        true
    }

    /// After the first full pass, how long the engine should let the job run
    /// between two harvests of the dirty set (the sampling interval,
    /// counted from one harvest to the next, sending included); `None` =
    /// harvest immediately after sending (classic rounds).
    fn interval(&self) -> Option<Duration> {
        None
    }

    /// Called once per round, in order, starting with round 0.
    fn decide(&mut self, r: &RoundStats) -> Decision;

    /// Remaining bytes / bandwidth, for the progress line.
    fn estimated_downtime(&self, r: &RoundStats) -> Duration {
        r.estimated_downtime()
    }
}

impl fmt::Debug for dyn Controller + '_ {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Controller({})", self.name())
    }
}

/// Tuning of the adaptive controller.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdaptiveParams {
    /// Sampling interval (the paper uses 1 s: "Shorter intervals increase
    /// the variation in the measurements of paging activity and make it
    /// more difficult to recognize steady state").
    pub interval: Duration,
    /// Moving-average window, in intervals, and the number of consecutive
    /// flat samples pattern a needs.
    pub window: usize,
    /// Relative change of the moving average that still counts as flat.
    pub stable_tolerance: f64,
    /// Pattern c fires when resent/sent reaches this (the paper: 90 %).
    pub retransmit_threshold: f64,
    /// Safety cap on rounds, the full pass included.
    pub max_rounds: u32,
}

impl Default for AdaptiveParams {
    fn default() -> Self {
        AdaptiveParams {
            interval: Duration::from_secs(1),
            window: 3,
            stable_tolerance: 0.1,
            retransmit_threshold: 0.9,
            max_rounds: HARD_MAX_ROUNDS,
        }
    }
}

impl AdaptiveParams {
    pub fn validate(&self) -> Result<(), ControllerError> {
        let bad = |option, why: &str| {
            Err(ControllerError::BadOption {
                option,
                why: why.to_string(),
            })
        };
        if self.interval.is_zero() {
            return bad("interval", "must be longer than 0");
        }
        if self.window == 0 {
            return bad("window", "must be at least 1 interval");
        }
        if !(self.stable_tolerance > 0.0 && self.stable_tolerance.is_finite()) {
            return bad("stable-tolerance", "must be a finite number above 0");
        }
        if !(self.retransmit_threshold > 0.0 && self.retransmit_threshold <= 1.0) {
            return bad("retransmit-threshold", "must be above 0 and at most 1");
        }
        if self.max_rounds == 0 {
            return bad("max-rounds", "must be at least 1");
        }
        Ok(())
    }
}

/// Options shared by the controllers built by [`parse`].
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ControllerOptions {
    /// Cap on live rounds (the full pass included) for every live controller.
    pub max_iterations: Option<u32>,
    pub adaptive: AdaptiveParams,
}

/// A controller spec or option that cannot be used.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ControllerError {
    #[error(
        "unknown controller {spec:?}: expected adaptive, downtime:<ms>, iterations:<n> or stop-copy"
    )]
    Unknown { spec: String },
    #[error("controller {spec:?} needs a value: {usage}")]
    MissingValue { spec: String, usage: &'static str },
    #[error("controller {spec:?}: {value:?} is not {expected}")]
    BadValue {
        spec: String,
        value: String,
        expected: &'static str,
    },
    #[error("controller {spec:?} takes no value")]
    UnexpectedValue { spec: String },
    #[error("controller option {option}: {why}")]
    BadOption { option: &'static str, why: String },
}

/// Builds a controller from its spec: "adaptive", "downtime:<ms>",
/// "iterations:<n>" or "stop-copy".
pub fn parse(spec: &str, opts: &ControllerOptions) -> Result<Box<dyn Controller>, ControllerError> {
    if opts.max_iterations == Some(0) {
        return Err(ControllerError::BadOption {
            option: "max-iterations",
            why: "must be at least 1".into(),
        });
    }
    let spec = spec.trim();
    let (kind, value) = match spec.split_once(':') {
        Some((k, v)) => (k.trim(), Some(v.trim())),
        None => (spec, None),
    };
    let number = |usage: &'static str, expected: &'static str| -> Result<u64, ControllerError> {
        match value {
            None | Some("") => Err(ControllerError::MissingValue {
                spec: spec.to_string(),
                usage,
            }),
            Some(v) => match v.parse::<u64>() {
                Ok(n) if n > 0 => Ok(n),
                _ => Err(ControllerError::BadValue {
                    spec: spec.to_string(),
                    value: v.to_string(),
                    expected,
                }),
            },
        }
    };
    let no_value = || match value {
        None => Ok(()),
        Some(_) => Err(ControllerError::UnexpectedValue {
            spec: spec.to_string(),
        }),
    };
    match kind {
        "stop-copy" => {
            no_value()?;
            Ok(Box::new(StopCopy))
        }
        "adaptive" => {
            no_value()?;
            Ok(Box::new(Adaptive::new(
                opts.adaptive.clone(),
                opts.max_iterations,
            )?))
        }
        "downtime" => {
            let ms = number(
                "downtime:<ms>, e.g. downtime:300",
                "a whole number of milliseconds above 0",
            )?;
            Ok(Box::new(Downtime::new(
                Duration::from_millis(ms),
                opts.max_iterations,
            )))
        }
        "iterations" => {
            let n = number(
                "iterations:<n>, e.g. iterations:30",
                "a whole number of iterations of at least 1",
            )?;
            let n = u32::try_from(n).map_err(|_| ControllerError::BadValue {
                spec: spec.to_string(),
                value: n.to_string(),
                expected: "a number of iterations that fits in 32 bits",
            })?;
            Ok(Box::new(Iterations::new(n, opts.max_iterations)))
        }
        _ => Err(ControllerError::Unknown {
            spec: spec.to_string(),
        }),
    }
}

/// `stop-copy`: no live phase, freeze at once.
#[derive(Debug, Clone, Default)]
pub struct StopCopy;

impl Controller for StopCopy {
    fn name(&self) -> String {
        "stop-copy".into()
    }

    fn live_phase(&self) -> bool {
        false
    }

    fn decide(&mut self, _r: &RoundStats) -> Decision {
        Decision::StopAndCopy {
            reason: StopReason::Manual,
        }
    }
}

/// `downtime:<ms>`: the KVM rule (QEMU-KVM 0.14, Algorithm 1 of Ibrahim et
/// al., lines 28-32: `expected_downtime <- remaining / bandwidth; if
/// expected_downtime < max_downtime then next_stage <- 3`). The paper shows
/// that a target below what the workload allows makes this iterate forever,
/// so the rounds are capped by `max_iterations` and by [`HARD_MAX_ROUNDS`].
#[derive(Debug, Clone)]
pub struct Downtime {
    target: Duration,
    cap: u32,
    rounds: u32,
}

impl Downtime {
    pub fn new(target: Duration, max_iterations: Option<u32>) -> Self {
        let cap = max_iterations.map_or(HARD_MAX_ROUNDS, |m| m.clamp(1, HARD_MAX_ROUNDS));
        Downtime {
            target,
            cap,
            rounds: 0,
        }
    }

    /// Rounds after which it stops whatever the downtime.
    pub fn cap(&self) -> u32 {
        self.cap
    }
}

impl Controller for Downtime {
    fn name(&self) -> String {
        format!("downtime:{}", self.target.as_millis())
    }

    fn decide(&mut self, r: &RoundStats) -> Decision {
        self.rounds = self.rounds.saturating_add(1);
        // Compared in f64 seconds: an unknown bandwidth gives +inf, never below.
        if r.estimated_downtime_secs() < self.target.as_secs_f64() {
            stop(StopReason::DowntimeReached)
        } else if self.rounds >= self.cap {
            stop(StopReason::MaxIterations)
        } else {
            Decision::Continue
        }
    }
}

/// `iterations:<n>`: the Xen rule (Xen's `xc_domain_save`, summarised in
/// section 9 of Ibrahim et al.): stop after `n` rounds (`max_iters`), when
/// fewer than 50 pages are dirty, or when more than 3x the job's memory has
/// been sent (`max_factor`).
#[derive(Debug, Clone)]
pub struct Iterations {
    n: u32,
    cap: u32,
    rounds: u32,
    total_sent_pages: u64,
}

impl Iterations {
    /// `max_iterations`, when given, lowers the cap further.
    pub fn new(n: u32, max_iterations: Option<u32>) -> Self {
        let n = n.max(1);
        Iterations {
            n,
            cap: max_iterations.map_or(n, |m| m.clamp(1, n)),
            rounds: 0,
            total_sent_pages: 0,
        }
    }
}

impl Controller for Iterations {
    fn name(&self) -> String {
        format!("iterations:{}", self.n)
    }

    fn decide(&mut self, r: &RoundStats) -> Decision {
        self.rounds = self.rounds.saturating_add(1);
        self.total_sent_pages = self.total_sent_pages.saturating_add(r.pages_sent);
        if r.dirty_pages < FEW_DIRTY_PAGES {
            stop(StopReason::FewDirty)
        } else if self.total_sent_pages > r.total_pages.saturating_mul(MAX_SENT_FACTOR) {
            stop(StopReason::TooMuchSent)
        } else if self.rounds >= self.cap {
            stop(StopReason::MaxIterations)
        } else {
            Decision::Continue
        }
    }
}

/// `adaptive`: Ibrahim et al., SC'11, section 7 and Algorithm 2.
///
/// The paper switches to stop-and-copy "by matching memory update patterns
/// that indicate that no beneficial progress, reduction in downtime, is
/// achieved by continuing live migration". Mapping onto process migration:
///
/// * **Full pass first.** "in our implementation we transfer once the whole
///   memory space before enabling the convergence mechanisms": round 0 never
///   stops, unless nothing at all is dirty.
/// * **Interval.** The paper samples every second and, over RDMA, sizes the
///   batch of pages per interval by linear regression (Algorithm 2, lines
///   25-37) so the sampling period stays constant. ferry does not throttle
///   the batch: every round sends the whole harvested dirty set, and the
///   engine harvests every [`AdaptiveParams::interval`] (waiting out the rest
///   of the interval when sending was quicker). So one call of `decide` after
///   round 0 is one sampling interval, and `dirty_pages` is "the number of
///   page changes per a constant time interval". When sending took longer
///   than the interval the round is longer; its count is then scaled to a
///   per-interval rate (`dirty_pages * interval / duration`), which is what
///   the paper's constant period measures.
/// * **Pattern a** ("modified pages are stable for a prolonged period of
///   time"; Algorithm 2 line 38, "migrated history in steady state"). The
///   paper "computes a moving average in order to handle variation of the
///   monitored data" and uses "a simple filtering technique to check if the
///   rate of page modification is stable". Here: with `s_k` the per-interval
///   sample of interval k (k >= 1) and `MA_k` the mean of the last
///   `min(k, window)` samples, interval k is *flat* when
///   `|MA_k - MA_(k-1)| < stable_tolerance * max(MA_(k-1), 1)`; a fires when
///   the last `window` intervals were all flat **and** the drift over them is
///   flat too: `|MA_k - MA_(k-window)| < stable_tolerance * max(MA_(k-window), 1)`.
///   The drift check is ours: without it a set that shrinks a few percent per
///   interval (still converging, each step under the tolerance) would look
///   flat. Earliest firing: interval `window + 1` (round index `window + 1`).
/// * **Pattern b** ("application activity drops below a certain threshold";
///   "all modified pages have been transferred in an interval less than the
///   preset sampling interval ... the active set is smaller than the
///   interconnect capability for migration"). Here: the pages dirty now take
///   less than one interval at the measured bandwidth:
///   `dirty_pages * 4096 / bandwidth < interval`. Every round of ferry sends
///   the whole dirty set, so this is the paper's test applied to the set the
///   freeze would have to send. Nothing dirty at all counts as b (the empty
///   set drains at once), in round 0 too.
/// * **Pattern c** ("the migration activity involves high retransmission of
///   pages"; Algorithm 2 lines 41-43, `if retransmitted/migrated >= 90%`):
///   `resent_pages / pages_sent >= retransmit_threshold`. The paper keeps a
///   bitmap of the pages sent in the previous iteration. Adaptation: not
///   checked in round 1, whose previous round is the full pass, where every
///   page was sent, so its ratio is 1 whatever the workload does.
/// * **Safety cap**: after `max_rounds` rounds (and `max_iterations`, if
///   lower) it stops with [`StopReason::MaxIterations`].
///
/// When several patterns hold in one interval the reason is b, then c, then
/// a: b says the downtime is already below one interval, which is the most
/// useful fact for the report.
#[derive(Debug, Clone)]
pub struct Adaptive {
    params: AdaptiveParams,
    cap: u32,
    rounds: u32,
    /// The last `window` per-interval samples.
    samples: VecDeque<f64>,
    /// The last `window + 1` moving averages.
    averages: VecDeque<f64>,
    /// Consecutive flat intervals.
    flat_run: usize,
}

impl Adaptive {
    pub fn new(
        params: AdaptiveParams,
        max_iterations: Option<u32>,
    ) -> Result<Self, ControllerError> {
        params.validate()?;
        let cap = max_iterations.map_or(params.max_rounds, |m| m.clamp(1, params.max_rounds));
        Ok(Adaptive {
            cap,
            rounds: 0,
            samples: VecDeque::with_capacity(params.window + 1),
            averages: VecDeque::with_capacity(params.window + 2),
            flat_run: 0,
            params,
        })
    }

    pub fn params(&self) -> &AdaptiveParams {
        &self.params
    }

    /// The current moving average of modified pages per interval, once at
    /// least one interval after the full pass has been seen.
    pub fn moving_average(&self) -> Option<f64> {
        self.averages.back().copied()
    }

    /// Modified pages per sampling interval in this round.
    fn per_interval(&self, r: &RoundStats) -> f64 {
        let dirty = r.dirty_pages as f64;
        let interval = self.params.interval.as_secs_f64();
        let took = r.duration.as_secs_f64();
        if took > interval {
            dirty * interval / took
        } else {
            dirty
        }
    }

    /// Feeds one interval into the moving average; true when pattern a holds.
    fn observe(&mut self, r: &RoundStats) -> bool {
        let window = self.params.window;
        let tol = self.params.stable_tolerance;
        self.samples.push_back(self.per_interval(r));
        if self.samples.len() > window {
            self.samples.pop_front();
        }
        let ma = self.samples.iter().sum::<f64>() / self.samples.len() as f64;
        let flat = |from: f64, to: f64| (to - from).abs() < tol * from.max(1.0);
        match self.averages.back() {
            Some(&prev) if flat(prev, ma) => self.flat_run += 1,
            _ => self.flat_run = 0,
        }
        self.averages.push_back(ma);
        if self.averages.len() > window + 1 {
            self.averages.pop_front();
        }
        self.flat_run >= window
            && self.averages.len() == window + 1
            && self.averages.front().is_some_and(|&old| flat(old, ma))
    }
}

impl Controller for Adaptive {
    fn name(&self) -> String {
        "adaptive".into()
    }

    fn interval(&self) -> Option<Duration> {
        Some(self.params.interval)
    }

    fn decide(&mut self, r: &RoundStats) -> Decision {
        self.rounds = self.rounds.saturating_add(1);
        if r.dirty_pages == 0 {
            return stop(StopReason::PatternB);
        }
        if self.rounds == 1 {
            // The full pass: convergence detection is not enabled yet.
            return if self.rounds >= self.cap {
                stop(StopReason::MaxIterations)
            } else {
                Decision::Continue
            };
        }
        // Always feed the history, whichever rule ends up deciding.
        let pattern_a = self.observe(r);
        let pattern_b = r.estimated_downtime_secs() < self.params.interval.as_secs_f64();
        let pattern_c = self.rounds >= 3
            && r.retransmit_ratio()
                .is_some_and(|x| x >= self.params.retransmit_threshold);
        if pattern_b {
            stop(StopReason::PatternB)
        } else if pattern_c {
            stop(StopReason::PatternC)
        } else if pattern_a {
            stop(StopReason::PatternA)
        } else if self.rounds >= self.cap {
            stop(StopReason::MaxIterations)
        } else {
            Decision::Continue
        }
    }
}

fn stop(reason: StopReason) -> Decision {
    Decision::StopAndCopy { reason }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const MB: f64 = 1_000_000.0;

    /// One interval of a live round: `dirty` pages written, `sent` pages
    /// sent of which `resent` were retransmissions, at `bw` bytes/s.
    fn round(round: u32, dirty: u64, sent: u64, resent: u64, bw: f64) -> RoundStats {
        RoundStats {
            round,
            duration: Duration::from_secs(1),
            pages_sent: sent,
            bytes_sent: sent * PAGE_SIZE,
            dirty_pages: dirty,
            resent_pages: resent,
            total_pages: 1_000_000,
            bandwidth: bw,
        }
    }

    /// The full pass of a 1M-page job.
    fn full_pass(dirty: u64, bw: f64) -> RoundStats {
        RoundStats {
            duration: Duration::from_secs(40),
            ..round(0, dirty, 1_000_000, 0, bw)
        }
    }

    /// Feeds `dirty[k]` as round k (round 0 = full pass); returns the round
    /// index and reason of the first stop, or None.
    fn run(
        c: &mut dyn Controller,
        dirty: &[u64],
        bw: f64,
        resent_ratio: f64,
    ) -> Option<(u32, StopReason)> {
        let mut prev = 1_000_000;
        for (k, &d) in dirty.iter().enumerate() {
            let r = if k == 0 {
                full_pass(d, bw)
            } else {
                let resent = (prev as f64 * resent_ratio) as u64;
                round(k as u32, d, prev, resent, bw)
            };
            prev = d;
            if let Decision::StopAndCopy { reason } = c.decide(&r) {
                return Some((k as u32, reason));
            }
        }
        None
    }

    fn adaptive() -> Adaptive {
        Adaptive::new(AdaptiveParams::default(), None).unwrap()
    }

    // ---- stop-copy ----

    #[test]
    fn stop_copy_stops_immediately() {
        let mut c = StopCopy;
        assert!(!c.live_phase());
        assert_eq!(c.interval(), None);
        assert_eq!(
            c.decide(&full_pass(500_000, 100.0 * MB)),
            stop(StopReason::Manual)
        );
        assert_eq!(StopReason::Manual.pattern(), None);
    }

    // ---- downtime (KVM) ----

    #[test]
    fn downtime_stops_exactly_when_estimate_drops_under_target() {
        // 4_096_000 B/s drains 1000 pages/s: 300 pages = exactly 300 ms.
        let bw = 4_096_000.0;
        let mut c = Downtime::new(Duration::from_millis(300), None);
        assert!(c.live_phase());
        assert_eq!(c.interval(), None);
        for (k, d) in [100_000, 5_000, 301, 300].into_iter().enumerate() {
            assert_eq!(
                c.decide(&round(k as u32, d, 1000, 0, bw)),
                Decision::Continue,
                "dirty {d}"
            );
        }
        assert_eq!(
            c.decide(&round(4, 299, 1000, 0, bw)),
            stop(StopReason::DowntimeReached)
        );
        assert_eq!(
            c.estimated_downtime(&round(4, 299, 1000, 0, bw)),
            Duration::from_millis(299)
        );
    }

    #[test]
    fn downtime_may_stop_after_the_first_pass() {
        let mut c = Downtime::new(Duration::from_millis(300), None);
        assert_eq!(
            c.decide(&full_pass(10, 100.0 * MB)),
            stop(StopReason::DowntimeReached)
        );
    }

    #[test]
    fn downtime_respects_max_iterations_and_hard_cap() {
        let bw = 10.0 * MB;
        let mut c = Downtime::new(Duration::from_millis(1), Some(5));
        let got = run(&mut c, &[200_000; 100], bw, 0.0);
        assert_eq!(got, Some((4, StopReason::MaxIterations)));

        let mut c = Downtime::new(Duration::from_millis(1), None);
        let got = run(&mut c, &[200_000; 100], bw, 0.0);
        assert_eq!(got, Some((HARD_MAX_ROUNDS - 1, StopReason::MaxIterations)));

        // An explicit cap above the hard cap does not lift it.
        let mut c = Downtime::new(Duration::from_millis(1), Some(1000));
        assert_eq!(c.cap(), HARD_MAX_ROUNDS);
        let got = run(&mut c, &[200_000; 100], bw, 0.0);
        assert_eq!(got, Some((HARD_MAX_ROUNDS - 1, StopReason::MaxIterations)));
    }

    #[test]
    fn downtime_unknown_bandwidth_never_reaches_target() {
        let mut c = Downtime::new(Duration::from_secs(3600), Some(3));
        for bw in [0.0, -1.0, f64::NAN] {
            let r = round(1, 10, 10, 0, bw);
            assert_eq!(c.estimated_downtime(&r), Duration::MAX);
        }
        assert_eq!(c.decide(&round(0, 10, 10, 0, 0.0)), Decision::Continue);
        assert_eq!(c.decide(&round(1, 10, 10, 0, f64::NAN)), Decision::Continue);
        assert_eq!(
            c.decide(&round(2, 10, 10, 0, -5.0)),
            stop(StopReason::MaxIterations)
        );
        // Nothing dirty: no downtime whatever the bandwidth.
        let mut c = Downtime::new(Duration::from_millis(1), None);
        assert_eq!(
            c.decide(&round(0, 0, 10, 0, 0.0)),
            stop(StopReason::DowntimeReached)
        );
    }

    // ---- iterations (Xen) ----

    #[test]
    fn iterations_stops_at_n() {
        let mut c = Iterations::new(5, None);
        assert_eq!(
            run(&mut c, &[100_000; 20], MB, 0.0),
            Some((4, StopReason::MaxIterations))
        );
        let mut c = Iterations::new(1, None);
        assert_eq!(
            run(&mut c, &[100_000; 20], MB, 0.0),
            Some((0, StopReason::MaxIterations))
        );
        let mut c = Iterations::new(10, Some(3));
        assert_eq!(
            run(&mut c, &[100_000; 20], MB, 0.0),
            Some((2, StopReason::MaxIterations))
        );
    }

    #[test]
    fn iterations_stops_on_few_dirty() {
        let mut c = Iterations::new(30, None);
        assert_eq!(
            run(&mut c, &[100_000, 5_000, 50, 49], MB, 0.0),
            Some((3, StopReason::FewDirty))
        );
    }

    #[test]
    fn iterations_stops_on_three_times_memory_sent() {
        let mut c = Iterations::new(30, None);
        let r = |k, sent| RoundStats {
            total_pages: 1000,
            ..round(k, 900, sent, 0, MB)
        };
        assert_eq!(c.decide(&r(0, 1000)), Decision::Continue);
        assert_eq!(c.decide(&r(1, 1000)), Decision::Continue);
        assert_eq!(c.decide(&r(2, 1000)), Decision::Continue); // exactly 3x: not more
        assert_eq!(c.decide(&r(3, 1)), stop(StopReason::TooMuchSent));
    }

    // ---- adaptive (Ibrahim et al.) ----

    #[test]
    fn adaptive_pattern_a_on_flat_activity() {
        // 10000 pages per interval +-2 %, a link that drains only ~2441
        // pages/s (writes outrun the link), few retransmissions.
        let bw = 10.0 * MB;
        let mut dirty = vec![400_000];
        dirty.extend((0..20).map(|i| [10_000, 10_200, 9_800, 10_100, 9_900][i % 5]));
        let mut c = adaptive();
        assert_eq!(c.interval(), Some(Duration::from_secs(1)));
        let (at, why) = run(&mut c, &dirty, bw, 0.3).unwrap();
        assert_eq!(why, StopReason::PatternA);
        assert_eq!(why.pattern(), Some("a"));
        // window (3) intervals to judge, plus the one they are compared to.
        assert_eq!(at, 4);
        let ma = c.moving_average().unwrap();
        assert!((9_800.0..=10_200.0).contains(&ma), "{ma}");
    }

    #[test]
    fn adaptive_pattern_a_scales_long_rounds_to_the_interval() {
        // Same write rate (5000 pages/s), rounds of 2, 3, 4, 5, 6 s because
        // sending the dirty set takes longer than the interval.
        let mut c = adaptive();
        assert_eq!(c.decide(&full_pass(400_000, MB)), Decision::Continue);
        let mut got = None;
        for k in 1..10u32 {
            let secs = k as u64 + 1;
            let r = RoundStats {
                duration: Duration::from_secs(secs),
                ..round(k, 5_000 * secs, 10_000, 1_000, MB)
            };
            if let Decision::StopAndCopy { reason } = c.decide(&r) {
                got = Some((k, reason));
                break;
            }
        }
        assert_eq!(got, Some((4, StopReason::PatternA)));
    }

    #[test]
    fn adaptive_pattern_b_when_dirty_set_drains_within_an_interval() {
        // 100 MB/s drains 24414 pages/s; after the full pass only 2000 pages
        // are written per interval.
        let mut c = adaptive();
        assert_eq!(
            run(&mut c, &[50_000, 2_000], 100.0 * MB, 0.5),
            Some((1, StopReason::PatternB))
        );
        // Just over one interval's worth: not yet.
        let mut c = adaptive();
        assert_eq!(c.decide(&full_pass(50_000, 100.0 * MB)), Decision::Continue);
        assert_eq!(
            c.decide(&round(1, 24_415, 50_000, 0, 100.0 * MB)),
            Decision::Continue
        );
        assert_eq!(
            c.decide(&round(2, 24_414, 24_415, 0, 100.0 * MB)),
            stop(StopReason::PatternB)
        );
        assert_eq!(StopReason::PatternB.pattern(), Some("b"));
    }

    #[test]
    fn adaptive_pattern_c_on_hot_set_retransmission() {
        // The job rewrites the same hot set: 95 % of what is sent again had
        // been sent the round before. Activity varies too much to be flat.
        let bw = 10.0 * MB;
        let mut c = adaptive();
        let (at, why) = run(&mut c, &[300_000, 60_000, 30_000, 80_000, 20_000], bw, 0.95).unwrap();
        assert_eq!((at, why), (2, StopReason::PatternC));
        assert_eq!(why.pattern(), Some("c"));
    }

    #[test]
    fn adaptive_pattern_c_threshold_and_round_one() {
        let bw = 10.0 * MB;
        let mut c = adaptive();
        assert_eq!(c.decide(&full_pass(300_000, bw)), Decision::Continue);
        // Round 1 resends pages of the full pass by construction: ignored.
        assert_eq!(
            c.decide(&round(1, 60_000, 300_000, 300_000, bw)),
            Decision::Continue
        );
        assert_eq!(
            c.decide(&round(2, 30_000, 60_000, 53_999, bw)),
            Decision::Continue
        ); // 89.998 %
        assert_eq!(
            c.decide(&round(3, 80_000, 30_000, 27_000, bw)),
            stop(StopReason::PatternC)
        ); // 90 %
    }

    #[test]
    fn adaptive_keeps_going_while_dirty_set_shrinks() {
        let bw = 50.0 * MB; // drains 12207 pages per interval
                            // Halving: no a, then b once one interval's worth remains.
        let dirty: Vec<u64> = (0..12).map(|k| 400_000 >> k).collect();
        let mut c = adaptive();
        assert_eq!(
            run(&mut c, &dirty, bw, 0.2),
            Some((6, StopReason::PatternB))
        );

        // Slow convergence, 6 % less per interval: each step is under the
        // 10 % tolerance, but the drift over the window is not. Never a.
        let bw = 1.0 * MB;
        let dirty: Vec<u64> = (0..40).map(|k| (1e6 * 0.94f64.powi(k)) as u64).collect();
        let mut c = adaptive();
        assert_eq!(
            run(&mut c, &dirty, bw, 0.2),
            Some((HARD_MAX_ROUNDS - 1, StopReason::MaxIterations))
        );
    }

    #[test]
    fn adaptive_pattern_a_only_after_shrinking_stops() {
        // 20 % less per interval for 10 intervals, then a plateau.
        let bw = 1.0 * MB;
        let plateau = 8;
        let mut dirty: Vec<u64> = (0..=plateau)
            .map(|k| (500_000.0 * 0.8f64.powi(k)) as u64)
            .collect();
        let level = *dirty.last().unwrap();
        dirty.extend(std::iter::repeat_n(level, 20));
        let mut c = adaptive();
        let (at, why) = run(&mut c, &dirty, bw, 0.2).unwrap();
        assert_eq!(why, StopReason::PatternA);
        let window = AdaptiveParams::default().window as u32;
        assert!(
            at > plateau as u32 && at <= plateau as u32 + 2 * window,
            "stopped at {at}"
        );
    }

    #[test]
    fn adaptive_never_stops_in_round_zero_unless_nothing_is_dirty() {
        // A full pass that would match every pattern if they were enabled.
        for dirty in [1, 10, 1_000, 1_000_000] {
            let mut c = adaptive();
            let r = RoundStats {
                resent_pages: 1_000_000,
                ..full_pass(dirty, 1e12)
            };
            assert_eq!(c.decide(&r), Decision::Continue, "dirty {dirty}");
        }
        let mut c = adaptive();
        assert_eq!(c.decide(&full_pass(0, 0.0)), stop(StopReason::PatternB));
    }

    #[test]
    fn adaptive_stops_by_max_rounds() {
        // Wildly varying activity, few resends, a slow link: no pattern.
        let dirty: Vec<u64> = (0..100)
            .map(|k| if k % 2 == 0 { 300_000 } else { 100_000 })
            .collect();
        let mut c = adaptive();
        assert_eq!(
            run(&mut c, &dirty, MB, 0.1),
            Some((HARD_MAX_ROUNDS - 1, StopReason::MaxIterations))
        );
        let params = AdaptiveParams {
            max_rounds: 7,
            ..AdaptiveParams::default()
        };
        let mut c = Adaptive::new(params.clone(), None).unwrap();
        assert_eq!(
            run(&mut c, &dirty, MB, 0.1),
            Some((6, StopReason::MaxIterations))
        );
        let mut c = Adaptive::new(params, Some(4)).unwrap();
        assert_eq!(
            run(&mut c, &dirty, MB, 0.1),
            Some((3, StopReason::MaxIterations))
        );
    }

    #[test]
    fn adaptive_rejects_bad_params() {
        let bad = [
            AdaptiveParams {
                window: 0,
                ..Default::default()
            },
            AdaptiveParams {
                interval: Duration::ZERO,
                ..Default::default()
            },
            AdaptiveParams {
                stable_tolerance: f64::NAN,
                ..Default::default()
            },
            AdaptiveParams {
                retransmit_threshold: 1.5,
                ..Default::default()
            },
            AdaptiveParams {
                max_rounds: 0,
                ..Default::default()
            },
        ];
        for p in bad {
            let err = Adaptive::new(p.clone(), None).unwrap_err();
            assert!(
                matches!(err, ControllerError::BadOption { .. }),
                "{p:?}: {err}"
            );
        }
    }

    // ---- parse ----

    #[test]
    fn parse_all_specs() {
        let opts = ControllerOptions::default();
        for (spec, name, live, interval) in [
            ("adaptive", "adaptive", true, Some(Duration::from_secs(1))),
            ("downtime:300", "downtime:300", true, None),
            (" iterations:30 ", "iterations:30", true, None),
            ("stop-copy", "stop-copy", false, None),
        ] {
            let c = parse(spec, &opts).unwrap();
            assert_eq!(c.name(), name);
            assert_eq!(c.live_phase(), live, "{spec}");
            assert_eq!(c.interval(), interval, "{spec}");
            assert_eq!(parse(&c.name(), &opts).unwrap().name(), name);
            assert_eq!(format!("{c:?}"), format!("Controller({name})"));
        }
        let opts = ControllerOptions {
            adaptive: AdaptiveParams {
                interval: Duration::from_millis(250),
                ..Default::default()
            },
            ..Default::default()
        };
        assert_eq!(
            parse("adaptive", &opts).unwrap().interval(),
            Some(Duration::from_millis(250))
        );
    }

    #[test]
    fn parse_errors_are_clear() {
        let opts = ControllerOptions::default();
        let err = |spec: &str| parse(spec, &opts).unwrap_err();

        let e = err("downtime:");
        assert!(matches!(e, ControllerError::MissingValue { .. }));
        assert_eq!(
            e.to_string(),
            "controller \"downtime:\" needs a value: downtime:<ms>, e.g. downtime:300"
        );
        assert!(matches!(
            err("downtime"),
            ControllerError::MissingValue { .. }
        ));

        let e = err("downtime:abc");
        assert!(matches!(e, ControllerError::BadValue { .. }));
        assert_eq!(
            e.to_string(),
            "controller \"downtime:abc\": \"abc\" is not a whole number of milliseconds above 0"
        );
        assert!(matches!(
            err("downtime:-5"),
            ControllerError::BadValue { .. }
        ));

        let e = err("iterations:0");
        assert_eq!(
            e.to_string(),
            "controller \"iterations:0\": \"0\" is not a whole number of iterations of at least 1"
        );
        assert!(matches!(
            err("iterations:99999999999"),
            ControllerError::BadValue { .. }
        ));

        let e = err("foo");
        assert_eq!(
            e.to_string(),
            "unknown controller \"foo\": expected adaptive, downtime:<ms>, iterations:<n> or stop-copy"
        );
        assert!(matches!(err(""), ControllerError::Unknown { .. }));

        let e = err("stop-copy:3");
        assert_eq!(e.to_string(), "controller \"stop-copy:3\" takes no value");

        let zero = ControllerOptions {
            max_iterations: Some(0),
            ..Default::default()
        };
        let e = parse("adaptive", &zero).unwrap_err();
        assert_eq!(
            e.to_string(),
            "controller option max-iterations: must be at least 1"
        );
    }

    // ---- reasons and serialization ----

    #[test]
    fn reasons_describe_and_serialize() {
        let all = [
            StopReason::PatternA,
            StopReason::PatternB,
            StopReason::PatternC,
            StopReason::DowntimeReached,
            StopReason::MaxIterations,
            StopReason::FewDirty,
            StopReason::TooMuchSent,
            StopReason::Manual,
        ];
        for r in all {
            assert!(!r.describe().is_empty());
            assert_eq!(r.to_string(), r.describe());
            let bytes = postcard::to_allocvec(&r).unwrap();
            assert_eq!(postcard::from_bytes::<StopReason>(&bytes).unwrap(), r);
        }
        let s = round(3, 10, 20, 5, 1e6);
        let bytes = postcard::to_allocvec(&s).unwrap();
        assert_eq!(postcard::from_bytes::<RoundStats>(&bytes).unwrap(), s);
        let p = AdaptiveParams::default();
        let bytes = postcard::to_allocvec(&p).unwrap();
        assert_eq!(postcard::from_bytes::<AdaptiveParams>(&bytes).unwrap(), p);
        assert!(stop(StopReason::FewDirty).is_stop());
        assert_eq!(
            stop(StopReason::FewDirty).reason(),
            Some(StopReason::FewDirty)
        );
        assert_eq!(Decision::Continue.reason(), None);
    }

    // ---- property: every controller stops within its cap ----

    fn any_bandwidth() -> impl Strategy<Value = f64> {
        prop_oneof![
            Just(0.0),
            Just(-1.0),
            Just(f64::NAN),
            Just(f64::INFINITY),
            1.0..1e11f64,
        ]
    }

    fn any_round() -> impl Strategy<Value = RoundStats> {
        (
            0u64..10_000,
            0u64..2_000_000,
            0u64..2_000_000,
            0u64..2_000_000,
            0u64..2_000_000,
            any_bandwidth(),
        )
            .prop_map(|(ms, sent, dirty, resent, total, bw)| RoundStats {
                round: 0,
                duration: Duration::from_millis(ms),
                pages_sent: sent,
                bytes_sent: sent * PAGE_SIZE,
                dirty_pages: dirty,
                resent_pages: resent.min(sent),
                total_pages: total,
                bandwidth: bw,
            })
    }

    proptest! {
        #[test]
        fn every_controller_stops_within_its_cap(
            rounds in proptest::collection::vec(any_round(), 70),
            max_iterations in proptest::option::of(1u32..40),
            n in 1u32..40,
            ms in 1u64..2_000,
            window in 1usize..6,
            max_rounds in 1u32..40,
        ) {
            let opts = ControllerOptions {
                max_iterations,
                adaptive: AdaptiveParams { window, max_rounds, ..Default::default() },
            };
            let limit = |cap: u32| max_iterations.map_or(cap, |m| m.min(cap));
            let specs = [
                ("stop-copy".to_string(), 1),
                (format!("downtime:{ms}"), limit(HARD_MAX_ROUNDS)),
                (format!("iterations:{n}"), limit(n)),
                ("adaptive".to_string(), limit(max_rounds)),
            ];
            for (spec, cap) in specs {
                let mut c = parse(&spec, &opts).unwrap();
                let mut stopped = None;
                for (k, r) in rounds.iter().enumerate() {
                    let r = RoundStats { round: k as u32, ..r.clone() };
                    let _ = c.estimated_downtime(&r);
                    let d = c.decide(&r);
                    if spec == "adaptive" && k == 0 && r.dirty_pages > 0 && cap > 1 {
                        prop_assert_eq!(d, Decision::Continue, "adaptive stopped in round 0");
                    }
                    if d.is_stop() {
                        stopped = Some(k as u32 + 1);
                        break;
                    }
                }
                let calls = stopped.expect("never stopped");
                prop_assert!(calls <= cap, "{} took {} rounds, cap {}", spec, calls, cap);
            }
        }
    }
}
