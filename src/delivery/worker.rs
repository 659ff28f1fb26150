//! The delivery engine: take fresh deliveries from publishes and claim due ones under a
//! lease, sign and send each through the guarded client, record the outcomes in batches,
//! and schedule what comes next.
//!
//! Shape: publishes hand the engine the deliveries it has room for, already leased
//! ([`Handoff`]); one dispatcher task claims the others from the database. Each delivery
//! waits in its webhook's lane ([`Launcher`]), where runner tasks, one per place in use
//! (the webhook's cap of attempts in flight, so a hanging endpoint holds at most its cap
//! and never the pool), take one of the global places, send, hand the report to one
//! recorder task, which writes them in batches, and go on to the lane's next delivery. A
//! webhook's place is free again as soon as its response is in, not once the outcome is
//! recorded: a fast endpoint never waits on the database's commit.
//!
//! Architecture invariant: no database transaction is open while a request is in
//! flight: a claim or a publish commits before its deliveries are sent, the record starts
//! after the send.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus_client::metrics::counter::Counter;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, SemaphorePermit, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::client::{Dispatch, FailureClass, GuardedClient};
use super::secrets::SecretCache;
use crate::domain::ids::WebhookId;
use crate::domain::sealing::EncryptionKey;
use crate::domain::signing::signature_header;
use crate::domain::time::{EpochMillis, now_millis};
use crate::store::{
    AttemptRecord, AttemptReport, ClaimRoom, ClaimedDelivery, DeliveryPolicy, DeliveryStatus,
    Handover, Published, Store, Unsent,
};
use crate::telemetry::{AttemptLabels, Metrics, StartLabels};

/// Wakes the dispatcher: new events, retries, re-enabled webhooks.
#[derive(Clone, Default)]
pub struct Wakeup(Arc<(Notify, AtomicU64)>);

impl Wakeup {
    pub fn wake(&self) {
        self.0.1.fetch_add(1, Ordering::Relaxed);
        // `notify_one` keeps a permit when nobody waits, so a wake-up is never lost.
        self.0.0.notify_one();
    }

    /// Wake-ups so far.
    fn count(&self) -> u64 {
        self.0.1.load(Ordering::Relaxed)
    }

    async fn notified(&self) {
        self.0.0.notified().await;
    }
}

/// Engine settings, checked at start.
#[derive(Debug, Clone)]
pub struct EngineSettings {
    pub policy: DeliveryPolicy,
    /// Attempts in flight at once, in all.
    pub concurrency: u32,
    /// Attempts in flight at once to one webhook.
    pub per_webhook: u32,
    /// How often to look for due work without being woken (retries come due, other
    /// instances publish).
    pub poll_interval: Duration,
    /// How long a claim lasts; longer than an attempt can take.
    pub lease: Duration,
    /// How long a claimed delivery may wait for its webhook's turn before it is put back
    /// unsent: the lease must outlast the wait plus the attempt.
    pub queued_at_most: Duration,
    /// How long events, deliveries and attempts are kept.
    pub retention: Duration,
}

/// See the module docs.
pub struct Engine {
    pub store: Arc<dyn Store>,
    pub client: GuardedClient,
    pub key: Arc<EncryptionKey>,
    pub settings: EngineSettings,
    pub wakeup: Wakeup,
    pub metrics: Arc<Metrics>,
    /// Signing secrets opened once per webhook and sealed value, not once per attempt.
    pub secrets: SecretCache,
    /// Where publishes hand their deliveries over while the engine runs.
    pub handoff: Handoff,
}

impl Finished {
    /// A claimed delivery that was not sent.
    fn unsent(delivery: ClaimedDelivery, why: Unsent) -> Self {
        tracing::debug!(delivery = %delivery.delivery_id, ?why, "delivery put back unsent");
        let now = now_millis();
        Finished {
            report: AttemptReport {
                delivery_id: delivery.delivery_id,
                row: delivery.row,
                webhook_id: delivery.webhook_id,
                succeeded: false,
                gone: false,
                retry_after: None,
                jitter_draw: 0.0,
                lease_until: delivery.lease_until,
                unsent: Some(why),
                attempt: AttemptRecord {
                    attempted_at: now,
                    response_time_ms: 0,
                    status_code: None,
                    failure: None,
                    response_body: None,
                },
            },
            event_created_at: delivery.event_created_at,
            failure: None,
        }
    }
}

/// What the recorder needs besides the report.
struct Finished {
    report: AttemptReport,
    event_created_at: EpochMillis,
    failure: Option<FailureClass>,
}

/// Each webhook's claimed deliveries, from the claim until the response, and whether a
/// finished attempt should wake the dispatcher.
///
/// A claim takes up to twice a webhook's cap (`PREFETCH`): the deliveries beyond the cap
/// wait in memory for one of the webhook's places (`Lane::queue`), so when an attempt
/// ends the next one starts at once instead of after a round trip to the database (with
/// one, a place stayed empty for several milliseconds, and 16 places per webhook held the
/// throughput to a fraction of what the receiver could take). The cap on requests in
/// flight to an endpoint is unchanged.
///
/// Deliveries taken at publish ([`Handoff`]) may queue deeper, up to what the webhook
/// answers in a second at its present pace (so about a second's wait), while its
/// attempts succeed.
/// A webhook whose fresh deliveries went to the database instead ("spilled": its lane
/// was full) takes none at publish until the claims have taken as many fresh deliveries
/// of it back: newer events never overtake older ones waiting in the database.
struct InFlight {
    /// Each webhook's places (`VIGNETIM_WEBHOOK_CONCURRENCY`).
    per_webhook: u32,
    lanes: Mutex<Lanes>,
    /// The last claim was partial: it found work but less than it had room for, so more
    /// may be due for webhooks that filled up during it.
    partial: AtomicBool,
    /// Room was freed where work may be waiting (see `finish`).
    freed: Notify,
}

#[derive(Default)]
struct Lanes {
    lanes: HashMap<WebhookId, Lane>,
    /// Fresh deliveries of each webhook that went to the database rather than to the
    /// engine at publish, not yet claimed back.
    spilled: HashMap<WebhookId, u32>,
}

impl Lanes {
    /// The webhook's lane, made when it has nothing in the engine.
    fn lane(&mut self, webhook: WebhookId, per_webhook: u32) -> &mut Lane {
        self.lanes
            .entry(webhook)
            .or_insert_with(|| Lane::new(per_webhook, Instant::now()))
    }
}

struct Lane {
    /// Its webhook's cap of attempts in flight.
    places: u32,
    /// Claimed and not finished: sending or waiting for a place.
    claimed: u32,
    /// Deliveries waiting for a place, oldest first.
    queue: VecDeque<Queued>,
    /// Tasks sending the lane's deliveries one after another, one per place in use (at
    /// most `places`): the cap on attempts in flight to the webhook.
    runners: u32,
    /// Attempts finished lately, to size the queue taken at publish.
    done: Recent,
}

/// A delivery waiting in its lane.
struct Queued {
    delivery: ClaimedDelivery,
    /// Its room in the engine's budget, held until it finishes.
    permit: OwnedSemaphorePermit,
    /// It must have started by then (its lease must cover a whole attempt), or it is put
    /// back unsent.
    start_by: tokio::time::Instant,
}

/// Attempts finished in the current and the previous second, and whether any failed.
struct Recent {
    since: Instant,
    now: u32,
    before: u32,
    failed: bool,
}

/// How long a second must have run before what finished in it is taken as the pace of
/// the whole second.
const PACE_AFTER: Duration = Duration::from_millis(10);

impl Recent {
    fn new(at: Instant) -> Self {
        Recent {
            since: at,
            now: 0,
            before: 0,
            failed: false,
        }
    }

    fn roll(&mut self, at: Instant) {
        let elapsed = at.saturating_duration_since(self.since);
        if elapsed >= Duration::from_secs(1) {
            self.before = if elapsed >= Duration::from_secs(2) {
                0
            } else {
                self.now
            };
            self.now = 0;
            self.failed = false;
            self.since = at;
        }
    }

    fn count(&mut self, succeeded: bool, at: Instant) {
        self.roll(at);
        self.now += 1;
        self.failed |= !succeeded;
    }

    /// Deliveries the webhook takes in about a second; none while its attempts fail (its
    /// retries then wait in the database, and fresh deliveries must not overtake them).
    /// Within the current second, what finished so far is scaled to the whole second
    /// once `PACE_AFTER` has passed: a lane that starts with a burst learns its pace in
    /// milliseconds, rather than filling its first second's small queue and sending
    /// the rest of the burst through the database (a fifth of the benchmark's peak
    /// took that path: BENCHMARKS.md, step 26).
    fn per_second(&mut self, at: Instant) -> u32 {
        self.roll(at);
        if self.failed {
            return 0;
        }
        let elapsed = at.saturating_duration_since(self.since);
        let pace = if elapsed >= PACE_AFTER {
            let scaled = u128::from(self.now) * 1_000 / elapsed.as_millis().max(1);
            u32::try_from(scaled).unwrap_or(u32::MAX)
        } else {
            self.now
        };
        pace.max(self.before)
    }
}

/// What `InFlight::take` did with a fresh delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Take {
    Taken,
    /// Its webhook has room but older fresh deliveries wait in the database: a claim can
    /// take them now.
    Behind,
    /// Its webhook's lane is full: a claim could not take it either until room frees
    /// (which signals `InFlight::freed`).
    Full,
}

/// Deliveries claimed per webhook, as a multiple of its cap.
const PREFETCH: u32 = 2;

/// Deliveries in the engine (sending or waiting), in all, per place of
/// `VIGNETIM_DELIVERY_CONCURRENCY` (256 places: 8,192 deliveries, about 20 MiB).
const BUDGET_PER_PLACE: u32 = 32;

/// A webhook's deliveries in the engine at most, per place of its own.
const MAX_DEPTH: u32 = 128;

impl InFlight {
    fn new(per_webhook: u32) -> Self {
        InFlight {
            per_webhook,
            lanes: Mutex::default(),
            partial: AtomicBool::new(false),
            freed: Notify::new(),
        }
    }

    fn room(&self) -> ClaimRoom {
        let at = Instant::now();
        ClaimRoom {
            per_webhook: self.per_webhook.saturating_mul(PREFETCH),
            left: self
                .lanes
                .lock()
                .map(|mut m| {
                    m.lanes
                        .iter_mut()
                        .map(|(w, l)| (*w, l.depth(at).saturating_sub(l.claimed)))
                        .collect()
                })
                .unwrap_or_default(),
        }
    }

    fn any_full(&self) -> bool {
        let at = Instant::now();
        self.lanes
            .lock()
            .is_ok_and(|mut m| m.lanes.values_mut().any(|l| l.claimed >= l.depth(at)))
    }

    /// Counts a claimed delivery in its webhook's lane.
    fn start(&self, webhook: WebhookId) {
        if let Ok(mut m) = self.lanes.lock() {
            m.lane(webhook, self.per_webhook).claimed += 1;
        }
    }

    /// Counts a fresh delivery taken at publish, if its webhook has room and nothing
    /// spilled; otherwise counts it as spilled.
    fn take(&self, webhook: WebhookId) -> Take {
        let at = Instant::now();
        let Ok(mut m) = self.lanes.lock() else {
            return Take::Behind;
        };
        let m = &mut *m;
        let behind = m.spilled.get(&webhook).is_some_and(|n| *n > 0);
        // A webhook with nothing in the engine has a new lane's room.
        let room = m
            .lanes
            .get_mut(&webhook)
            .is_none_or(|lane| lane.claimed < lane.depth(at));
        let refused = match (behind, room) {
            (false, true) => {
                m.lane(webhook, self.per_webhook).claimed += 1;
                return Take::Taken;
            }
            (true, true) => Take::Behind,
            (_, false) => Take::Full,
        };
        *m.spilled.entry(webhook).or_insert(0) += 1;
        refused
    }

    /// A fresh delivery went (or went back) to the database.
    fn spill(&self, webhook: WebhookId) {
        if let Ok(mut m) = self.lanes.lock() {
            *m.spilled.entry(webhook).or_insert(0) += 1;
        }
    }

    /// Claims took these fresh deliveries back from the database.
    fn unspill(&self, webhooks: impl Iterator<Item = WebhookId>) {
        if let Ok(mut m) = self.lanes.lock() {
            for webhook in webhooks {
                if let Some(n) = m.spilled.get_mut(&webhook) {
                    *n = n.saturating_sub(1);
                    if *n == 0 {
                        m.spilled.remove(&webhook);
                    }
                }
            }
        }
    }

    /// Nothing is due in the database: whatever spilled has been claimed (or is gone).
    fn forget_spills(&self) {
        if let Ok(mut m) = self.lanes.lock() {
            m.spilled.clear();
        }
    }

    /// Queues a counted delivery in its lane; true when a runner must be started for it
    /// (the lane has a place no runner holds).
    fn enqueue(&self, webhook: WebhookId, queued: Queued) -> bool {
        // Unreachable in practice (nothing panics while holding the lock); dropped, the
        // delivery stays leased in the database and is claimed when its lease ends.
        let Ok(mut m) = self.lanes.lock() else {
            return false;
        };
        let lane = m.lane(webhook, self.per_webhook);
        lane.queue.push_back(queued);
        if lane.runners < lane.places {
            lane.runners += 1;
            return true;
        }
        false
    }

    /// A runner's step: counts the delivery it finished (`finished`: `Some(attempted)`,
    /// as in `finish`), and gives it the lane's next delivery, or retires it.
    fn next(&self, webhook: WebhookId, finished: Option<Option<bool>>) -> Option<Queued> {
        self.settle(webhook, finished, true)
    }

    /// Frees the room of a delivery no runner took (the publish that took it failed).
    /// `attempted` is `Some(succeeded)` when the delivery was sent.
    fn finish(&self, webhook: WebhookId, attempted: Option<bool>) {
        self.settle(webhook, Some(attempted), false);
    }

    /// Frees a finished delivery's room, and tells the dispatcher if that may let waiting
    /// work go (the webhook was full for claims, or the last claim was partial); for a
    /// runner, also takes the lane's next delivery or retires the runner.
    fn settle(
        &self,
        webhook: WebhookId,
        finished: Option<Option<bool>>,
        runner: bool,
    ) -> Option<Queued> {
        let at = Instant::now();
        let (next, wake) = match self.lanes.lock() {
            Ok(mut m) => {
                let m = &mut *m;
                let spilled = m.spilled.get(&webhook).is_some_and(|n| *n > 0);
                match m.lanes.get_mut(&webhook) {
                    Some(lane) => {
                        let wake =
                            finished.is_some_and(|attempted| lane.finish(attempted, spilled, at));
                        let next = if runner {
                            let next = lane.queue.pop_front();
                            if next.is_none() {
                                lane.runners = lane.runners.saturating_sub(1);
                            }
                            next
                        } else {
                            None
                        };
                        if lane.claimed == 0 && lane.runners == 0 {
                            m.lanes.remove(&webhook);
                        }
                        (next, wake)
                    }
                    None => (None, false),
                }
            }
            Err(_) => (None, true),
        };
        if wake || self.partial.load(Ordering::Relaxed) {
            self.freed.notify_one();
        }
        next
    }
}

impl Lane {
    fn new(per_webhook: u32, at: Instant) -> Self {
        Lane {
            places: per_webhook,
            claimed: 0,
            queue: VecDeque::new(),
            runners: 0,
            done: Recent::new(at),
        }
    }

    /// Counts a delivery out of the lane (`attempted`: `Some(succeeded)` when it was
    /// sent). True at the step from full to not full, or when there is room while fresh
    /// deliveries of this webhook wait in the database (`spilled`).
    fn finish(&mut self, attempted: Option<bool>, spilled: bool, at: Instant) -> bool {
        if let Some(succeeded) = attempted {
            self.done.count(succeeded, at);
        }
        let depth = self.depth(at);
        let after = self.claimed.saturating_sub(1);
        let was_full = after < depth && (self.claimed >= depth || spilled);
        self.claimed = after;
        was_full
    }

    /// Deliveries the webhook may hold, sending or waiting: twice its places
    /// (`PREFETCH`), or what it answers in a second at its present pace while its
    /// attempts succeed (`Recent::per_second`: about a second's wait, well inside what a
    /// lease allows), at most `MAX_DEPTH` per place.
    fn depth(&mut self, at: Instant) -> u32 {
        let at_most = self.places.saturating_mul(MAX_DEPTH);
        self.places
            .saturating_mul(PREFETCH)
            .max(self.done.per_second(at).min(at_most))
    }
}

/// Hands the deliveries of a publish straight to the running engine, leased, so they need
/// no claim (the claim was the writer's largest job at the benchmark's peak). Shared by
/// the API and the engine; empty while no engine runs.
#[derive(Clone)]
pub struct Handoff {
    launcher: Arc<Mutex<Option<Arc<Launcher>>>>,
    /// For the deliveries the engine did not take: they wait for a claim.
    wakeup: Wakeup,
}

impl Handoff {
    pub fn new(wakeup: Wakeup) -> Self {
        Handoff {
            launcher: Arc::default(),
            wakeup,
        }
    }

    /// Room for one publish's deliveries, or `None` while no engine runs.
    pub fn reserve(&self) -> Option<Arc<Reservation>> {
        let launcher = self.launcher.lock().ok()?.as_ref().map(Arc::clone)?;
        if launcher.shutdown.is_cancelled() {
            return None;
        }
        Some(Arc::new(Reservation {
            lease_until: now_millis() + launcher.lease_ms,
            launcher,
            held: Mutex::new(Vec::new()),
            claim: AtomicBool::new(false),
        }))
    }

    /// After a publish committed: starts the attempts of the deliveries handed over,
    /// and wakes the dispatcher if one it did not take could be claimed now (one whose
    /// webhook is full is claimed when that webhook frees room).
    pub fn start(&self, reservation: Option<Arc<Reservation>>, published: &mut Published) {
        let handed = std::mem::take(&mut published.handed);
        if let Some(reservation) = reservation {
            reservation.launch(handed);
            if reservation.claim.load(Ordering::Relaxed) {
                self.wakeup.wake();
            }
        }
    }

    fn set(&self, launcher: Option<Arc<Launcher>>) {
        if let Ok(mut current) = self.launcher.lock() {
            *current = launcher;
        }
    }
}

/// Room the engine holds for one publish's deliveries, from the publishing transaction
/// until they are launched, or given back when the publish fails.
pub struct Reservation {
    launcher: Arc<Launcher>,
    lease_until: EpochMillis,
    held: Mutex<Vec<(WebhookId, OwnedSemaphorePermit)>>,
    /// A delivery it did not take could be claimed now: the dispatcher must look.
    claim: AtomicBool,
}

impl Handover for Reservation {
    fn take(&self, webhook: WebhookId) -> bool {
        let launcher = &self.launcher;
        if launcher.shutdown.is_cancelled() {
            return false;
        }
        let Ok(permit) = Arc::clone(&launcher.budget).try_acquire_owned() else {
            launcher.in_flight.spill(webhook);
            self.claim.store(true, Ordering::Relaxed);
            return false;
        };
        match launcher.in_flight.take(webhook) {
            Take::Taken => {}
            Take::Behind => {
                self.claim.store(true, Ordering::Relaxed);
                return false;
            }
            // Waking the dispatcher for it would only make it read the database for
            // nothing (under a hanging webhook's backlog, on every publish).
            Take::Full => return false,
        }
        match self.held.lock() {
            Ok(mut held) => {
                held.push((webhook, permit));
                true
            }
            Err(_) => {
                launcher.in_flight.finish(webhook, None);
                false
            }
        }
    }

    fn lease_until(&self) -> EpochMillis {
        self.lease_until
    }
}

impl Reservation {
    /// Starts the attempts of the deliveries the publish handed over (after it committed).
    pub fn launch(&self, handed: Vec<ClaimedDelivery>) {
        let Ok(mut held) = self.held.lock() else {
            return;
        };
        for delivery in handed {
            // Each was counted by `take` for its webhook; one that was not (impossible)
            // stays leased in the database and is claimed when its lease ends.
            let Some(i) = held.iter().position(|(w, _)| *w == delivery.webhook_id) else {
                continue;
            };
            let (_, permit) = held.swap_remove(i);
            self.launcher.started.publish.inc();
            self.launcher.launch(delivery, permit);
        }
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        // Room taken for deliveries that were never launched (the publish failed).
        if let Ok(mut held) = self.held.lock() {
            for (webhook, permit) in held.drain(..) {
                drop(permit);
                self.launcher.in_flight.finish(webhook, None);
            }
        }
    }
}

/// Keeps a lane right if its runner panics (a bug): the delivery it held counts as
/// finished unsent (it stays leased in the database, and is claimed again when the lease
/// ends), and the deliveries waiting behind it get a new runner, instead of waiting in
/// memory for ever and keeping the webhook's room taken.
struct RunnerGuard {
    launcher: Arc<Launcher>,
    webhook: WebhookId,
    /// It holds a delivery taken from the lane; or, when false, the lane found none for
    /// it and no longer counts it among its runners.
    holding: bool,
}

impl Drop for RunnerGuard {
    fn drop(&mut self) {
        if !std::thread::panicking() || !self.holding {
            return;
        }
        let launcher = &self.launcher;
        if let Some(next) = launcher.in_flight.next(self.webhook, Some(None)) {
            let runner = Arc::clone(launcher).run_lane(self.webhook, Some(next));
            launcher.attempts.spawn(runner);
        }
    }
}

/// Starts attempts: the dispatcher's claimed deliveries and those taken at publish.
pub struct Launcher {
    engine: Arc<Engine>,
    tx: mpsc::Sender<Finished>,
    in_flight: Arc<InFlight>,
    /// Attempts in flight, in all.
    sending: Arc<Semaphore>,
    /// Deliveries in the engine (claimed or taken at publish, not finished): a claim
    /// and a publish's handover each take what they give the engine.
    budget: Arc<Semaphore>,
    attempts: TaskTracker,
    shutdown: CancellationToken,
    lease_ms: i64,
    /// `vignetim_deliveries_started_total` by way, looked up once.
    started: Started,
}

/// The counters of deliveries the engine took on ([`StartLabels`]).
struct Started {
    publish: Counter,
    claim: Counter,
    retry: Counter,
}

impl Started {
    fn new(metrics: &Metrics) -> Self {
        let via = |via| {
            metrics
                .deliveries_started
                .get_or_create(&StartLabels { via })
                .clone()
        };
        Started {
            publish: via("publish"),
            claim: via("claim"),
            retry: via("retry"),
        }
    }

    /// A claimed delivery: its first attempt, or a later one.
    fn claimed(&self, delivery: &ClaimedDelivery) {
        if delivery.attempts_made == 0 {
            self.claim.inc();
        } else {
            self.retry.inc();
        }
    }
}

impl Launcher {
    /// Queues a delivery in its webhook's lane, and starts a runner for the lane when it
    /// has a place no runner holds. The runners send the lane's deliveries one after
    /// another, so a place goes to the next delivery as soon as a response is in, without
    /// a task, a permit and a timer per delivery (BENCHMARKS.md, step 28).
    fn launch(self: &Arc<Self>, delivery: ClaimedDelivery, permit: OwnedSemaphorePermit) {
        let webhook = delivery.webhook_id;
        // At most `queued_at_most`, and never so long that the lease (taken before the
        // claim or publish committed) could not cover a whole attempt after the wait.
        let timeout_ms =
            i64::try_from(self.engine.client.timeout().as_millis()).unwrap_or(i64::MAX);
        let lease_left = delivery
            .lease_until
            .saturating_sub(now_millis())
            .saturating_sub(timeout_ms)
            .saturating_sub(1_000);
        let wait = self
            .engine
            .settings
            .queued_at_most
            .min(Duration::from_millis(
                u64::try_from(lease_left).unwrap_or(0),
            ));
        let queued = Queued {
            delivery,
            permit,
            start_by: tokio::time::Instant::now() + wait,
        };
        if self.in_flight.enqueue(webhook, queued) {
            let launcher = Arc::clone(self);
            self.attempts.spawn(launcher.run_lane(webhook, None));
        }
    }

    /// A runner: sends its lane's deliveries one after another until the lane has none
    /// waiting. A delivery that can no longer start within its wait bound (its webhook
    /// or the whole engine is slow), or that is still waiting at shutdown, is put back
    /// unsent.
    async fn run_lane(self: Arc<Self>, webhook: WebhookId, first: Option<Queued>) {
        // Counted among the lane's runners from here until the lane has nothing for it.
        let mut guard = RunnerGuard {
            launcher: Arc::clone(&self),
            webhook,
            holding: false,
        };
        let mut next = match first {
            Some(first) => Some(first),
            None => self.in_flight.next(webhook, None),
        };
        guard.holding = next.is_some();
        let mut done: Option<Finished> = None;
        loop {
            if let Some(finished) = done.take() {
                // The recorder only stops after every attempt has finished.
                let _ = self.tx.send(finished).await;
            }
            let Some(Queued {
                delivery,
                permit,
                start_by,
            }) = next
            else {
                break;
            };
            let fresh = delivery.attempts_made == 0;
            let finished = match self.slot(start_by).await {
                Some(slot) => {
                    let finished = self.engine.attempt(delivery).await;
                    drop(slot);
                    finished
                }
                None => {
                    if fresh {
                        self.in_flight.spill(webhook);
                    }
                    Finished::unsent(delivery, Unsent::WaitedTooLong)
                }
            };
            drop(permit);
            let attempted = finished
                .report
                .unsent
                .is_none()
                .then_some(finished.report.succeeded);
            // Its place is free before the outcome is recorded.
            next = self.in_flight.next(webhook, Some(attempted));
            guard.holding = next.is_some();
            done = Some(finished);
        }
    }

    /// One of the engine's places for attempts in flight, unless the delivery's wait
    /// bound passes first or the service is shutting down (a delivery still waiting is
    /// left to the next start).
    async fn slot(&self, start_by: tokio::time::Instant) -> Option<SemaphorePermit<'_>> {
        if self.shutdown.is_cancelled() || tokio::time::Instant::now() >= start_by {
            return None;
        }
        if let Ok(slot) = self.sending.try_acquire() {
            return Some(slot);
        }
        tokio::select! {
            slot = tokio::time::timeout_at(start_by, self.sending.acquire()) => {
                slot.ok().and_then(Result::ok)
            }
            _ = self.shutdown.cancelled() => None,
        }
    }
}

const CLAIM_BATCH: u32 = 256;
const CLAIM_LINGER: Duration = Duration::from_millis(1);
const RECORD_BATCH: usize = 512;
const RECORD_LINGER: Duration = Duration::from_millis(2);

impl Engine {
    /// Runs until `shutdown`: then stops claiming, lets the attempts in flight finish
    /// (each is bounded by the delivery timeout), records them, and returns.
    pub async fn run(self, shutdown: CancellationToken) {
        let engine = Arc::new(self);
        let (tx, rx) = mpsc::channel::<Finished>(engine.settings.concurrency as usize * 2);
        let recorder = tokio::spawn(Arc::clone(&engine).record(rx));
        let purger = tokio::spawn(Arc::clone(&engine).purge_periodically(shutdown.clone()));
        let attempts = TaskTracker::new();
        engine.dispatch(&shutdown, &attempts, tx).await;
        attempts.close();
        attempts.wait().await;
        let _ = recorder.await;
        purger.abort();
    }

    async fn dispatch(
        self: &Arc<Self>,
        shutdown: &CancellationToken,
        attempts: &TaskTracker,
        tx: mpsc::Sender<Finished>,
    ) {
        // Deliveries in the engine, in all; each webhook's share is its `Lane::depth`.
        let permits = Arc::new(Semaphore::new(
            self.settings.concurrency.saturating_mul(BUDGET_PER_PLACE) as usize,
        ));
        // Attempts in flight, in all. A delivery waiting for its turn holds none, so a
        // hanging webhook's waiting deliveries take no place from the healthy ones.
        let sending = Arc::new(Semaphore::new(self.settings.concurrency as usize));
        let in_flight = Arc::new(InFlight::new(self.settings.per_webhook));
        let lease_ms = i64::try_from(self.settings.lease.as_millis()).unwrap_or(i64::MAX);
        let launcher = Arc::new(Launcher {
            engine: Arc::clone(self),
            tx,
            in_flight: Arc::clone(&in_flight),
            sending,
            budget: Arc::clone(&permits),
            attempts: attempts.clone(),
            shutdown: shutdown.clone(),
            lease_ms,
            started: Started::new(&self.metrics),
        });
        self.handoff.set(Some(Arc::clone(&launcher)));
        while !shutdown.is_cancelled() {
            // Wait for room in the pool before claiming: a claim is a promise to send.
            let first = tokio::select! {
                _ = shutdown.cancelled() => break,
                permit = Arc::clone(&permits).acquire_owned() => match permit {
                    Ok(p) => p,
                    Err(_) => break,
                },
            };
            let room = u32::try_from(permits.available_permits() + 1).unwrap_or(u32::MAX);
            let want = room.min(CLAIM_BATCH);
            let now = now_millis();
            let wakeups = self.wakeup.count();
            let claimed = match self
                .store
                .claim_due(now, want, &in_flight.room(), now + lease_ms)
                .await
            {
                Ok(claimed) => claimed,
                Err(e) => {
                    tracing::error!(error = %crate::api::error::error_chain(&e), "claiming deliveries failed");
                    drop(first);
                    self.pause(shutdown, Duration::from_secs(1)).await;
                    continue;
                }
            };
            let got = claimed.len();
            in_flight.partial.store(
                got > 0 && u32::try_from(got).unwrap_or(u32::MAX) < want,
                Ordering::Relaxed,
            );
            in_flight.unspill(
                claimed
                    .iter()
                    .filter(|d| d.attempts_made == 0)
                    .map(|d| d.webhook_id),
            );
            tracing::trace!(got, want, claim_ms = now_millis() - now, "claimed");
            let mut first = Some(first);
            for delivery in claimed {
                let permit = match first.take() {
                    Some(p) => p,
                    // The room was counted above, so these are available at once.
                    None => match Arc::clone(&permits).acquire_owned().await {
                        Ok(p) => p,
                        Err(_) => break,
                    },
                };
                in_flight.start(delivery.webhook_id);
                launcher.started.claimed(&delivery);
                launcher.launch(delivery, permit);
            }
            drop(first);
            if got == 0 {
                // Nothing could be claimed: sleep until woken, until the next due time,
                // or until the poll interval passes.
                let next_due = self.store.next_due_at().await;
                // Work is due, none could be claimed, a webhook is full, and nothing was
                // published since the claim began: the due work is all for full webhooks.
                // Until one of them frees room, claiming on every publish would read that
                // backlog again each time (most of the writer's work under a backlog); a
                // publish for another webhook meanwhile waits for the next freed room or
                // the poll.
                if matches!(next_due, Ok(None)) || matches!(next_due, Ok(Some(at)) if at > now) {
                    in_flight.forget_spills();
                }
                let clogged = matches!(next_due, Ok(Some(at)) if at <= now)
                    && self.wakeup.count() == wakeups
                    && in_flight.any_full();
                tracing::trace!(clogged, next_due = ?next_due.as_ref().ok(), now, "nothing claimed");
                let wait = match next_due {
                    Ok(Some(at)) if at > now => {
                        Duration::from_millis(u64::try_from(at - now).unwrap_or(0))
                            .min(self.settings.poll_interval)
                    }
                    _ => self.settings.poll_interval,
                };
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = self.wakeup.notified(), if !clogged => {},
                    _ = in_flight.freed.notified() => self.gather_freed_room().await,
                    _ = tokio::time::sleep(wait) => {},
                }
            } else if u32::try_from(got).unwrap_or(u32::MAX) < want {
                // All that could be claimed was: finishing attempts wake us (see
                // `InFlight::finish`), as does a publish.
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = self.wakeup.notified() => {},
                    _ = in_flight.freed.notified() => self.gather_freed_room().await,
                    _ = tokio::time::sleep(self.settings.poll_interval) => {},
                }
            }
        }
        // No more deliveries at publish: the launcher (and its sender to the recorder)
        // goes once the publishes holding a reservation are done.
        self.handoff.set(None);
    }

    /// Room freed by one finished attempt is usually followed by more within a moment:
    /// claiming for all of it at once costs one claim instead of one per attempt (under a
    /// backlog, a claim per finished attempt was most of the writer's work).
    async fn gather_freed_room(&self) {
        tokio::time::sleep(CLAIM_LINGER).await;
    }

    async fn pause(&self, shutdown: &CancellationToken, how_long: Duration) {
        tokio::select! {
            _ = shutdown.cancelled() => {},
            _ = tokio::time::sleep(how_long) => {},
        }
    }

    /// One attempt: sign the stored bytes afresh (this attempt's timestamp; both
    /// secrets during a rotation), send, and describe what happened.
    async fn attempt(&self, delivery: ClaimedDelivery) -> Finished {
        use tracing::Instrument;
        let span = tracing::info_span!(
            "attempt",
            organization = %delivery.tenant.organization_id,
            webhook = %delivery.webhook_id,
            delivery = %delivery.delivery_id,
            attempt = delivery.attempts_made + 1,
        );
        self.attempt_in_span(delivery).instrument(span).await
    }

    async fn attempt_in_span(&self, delivery: ClaimedDelivery) -> Finished {
        let started_at = now_millis();
        let secrets = match self.secrets.open(
            &self.key,
            delivery.webhook_id,
            &delivery.secrets,
            started_at,
        ) {
            Ok(secrets) => secrets,
            Err(e) => {
                // Our fault (e.g. the wrong encryption key), not the endpoint's: nothing is
                // sent and nothing counts against it; the recorder retries it later.
                tracing::error!(error = %e, "signing secret could not be opened; delivery postponed");
                return Finished::unsent(delivery, Unsent::InternalError);
            }
        };
        let timestamp = started_at.div_euclid(1000);
        let signature =
            signature_header(&secrets, &delivery.event_id, timestamp, &delivery.payload);
        let outcome = self
            .client
            .send(Dispatch {
                url: &delivery.url,
                msg_id: &delivery.event_id,
                timestamp,
                signature,
                body: delivery.payload.clone(),
            })
            .await;
        tracing::debug!(
            elapsed_ms = outcome.elapsed.as_secs_f64() * 1000.0,
            since_publish_ms = now_millis() - delivery.event_created_at,
            status = ?outcome.status,
            failure = outcome.failure.map(FailureClass::as_str),
            detail = %outcome.detail,
            "attempt finished"
        );
        let honours_retry_after = matches!(outcome.status, Some(429 | 503));
        let failure = outcome.failure;
        Finished {
            report: AttemptReport {
                delivery_id: delivery.delivery_id,
                row: delivery.row,
                webhook_id: delivery.webhook_id,
                succeeded: outcome.succeeded(),
                gone: outcome.status == Some(410),
                retry_after: outcome.retry_after.filter(|_| honours_retry_after),
                jitter_draw: jitter_draw(),
                lease_until: delivery.lease_until,
                unsent: None,
                attempt: outcome.into_record(started_at),
            },
            event_created_at: delivery.event_created_at,
            failure,
        }
    }

    /// Writes finished attempts in batches: one transaction for whatever has queued up.
    async fn record(self: Arc<Self>, mut rx: mpsc::Receiver<Finished>) {
        let mut batch: Vec<Finished> = Vec::with_capacity(RECORD_BATCH);
        while let Some(first) = rx.recv().await {
            // Recording a little later costs no delivery latency, and larger batches
            // cost far less per attempt.
            crate::batch::gather(&mut rx, first, &mut batch, RECORD_BATCH, RECORD_LINGER).await;
            let (reports, seen): (Vec<AttemptReport>, Vec<_>) = batch
                .drain(..)
                .map(|f| {
                    let seen = (
                        f.event_created_at,
                        f.failure,
                        f.report.succeeded,
                        f.report.unsent.is_some(),
                    );
                    (f.report, seen)
                })
                .unzip();
            let mut delay = Duration::from_millis(50);
            let statuses = loop {
                let now = now_millis();
                match self
                    .store
                    .record_attempts(&reports, &self.settings.policy, now)
                    .await
                {
                    Ok(statuses) => break Some((statuses, now)),
                    Err(e) => {
                        // The leases expire if this never succeeds, and the deliveries are
                        // attempted again: at least once, never lost.
                        tracing::error!(error = %crate::api::error::error_chain(&e), "recording attempts failed; retrying");
                        if delay > Duration::from_secs(5) {
                            break None;
                        }
                        tokio::time::sleep(delay).await;
                        delay *= 2;
                    }
                }
            };
            if let Some((statuses, now)) = statuses {
                // A retry was scheduled (or the lease of a delivery held back released):
                // the dispatcher looks again at when the next one is due.
                if statuses.contains(&DeliveryStatus::Pending) {
                    self.wakeup.wake();
                }
                for ((created_at, failure, succeeded, internal), status) in
                    seen.into_iter().zip(statuses)
                {
                    if internal {
                        continue; // nothing was sent
                    }
                    self.metrics
                        .delivery_attempts
                        .get_or_create(&AttemptLabels {
                            outcome: if succeeded { "success" } else { "failure" },
                            failure: failure.map_or("none", FailureClass::as_str),
                        })
                        .inc();
                    if succeeded && status == DeliveryStatus::Succeeded {
                        let latency = (now - created_at).max(0) as f64 / 1000.0;
                        self.metrics.publish_to_success.observe(latency);
                    }
                }
            }
        }
    }

    async fn purge_periodically(self: Arc<Self>, shutdown: CancellationToken) {
        let retention = i64::try_from(self.settings.retention.as_millis()).unwrap_or(i64::MAX);
        // Hourly, or as often as the retention itself when it is shorter.
        let every = self
            .settings
            .retention
            .clamp(Duration::from_millis(100), Duration::from_secs(3600));
        let mut tick = tokio::time::interval(every);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tick.tick() => {}
            }
            match self
                .store
                .purge(now_millis().saturating_sub(retention))
                .await
            {
                Ok(0) => {}
                Ok(n) => tracing::info!(events = n, "purged events past the retention"),
                Err(e) => {
                    tracing::error!(error = %crate::api::error::error_chain(&e), "purge failed")
                }
            }
        }
    }
}

/// Uniform in [0, 1), from the OS generator.
fn jitter_draw() -> f64 {
    let bits = u64::from_le_bytes(crate::domain::buffered_random_bytes::<8>()) >> 11;
    bits as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publishes_hand_over_until_the_lane_is_full_then_wait_behind_what_spilled() {
        let lanes = InFlight::new(2);
        let (webhook, other) = (WebhookId::new(), WebhookId::new());
        // Cap 2, limit 4: a lane with no history holds 4.
        for _ in 0..4 {
            assert_eq!(lanes.take(webhook), Take::Taken);
        }
        assert_eq!(lanes.take(webhook), Take::Full, "past the lane's depth");
        // One finished: there is room again, but a fresh delivery went to the database,
        // so publishes wait until a claim has taken it back.
        lanes.finish(webhook, Some(true));
        assert_eq!(
            lanes.take(webhook),
            Take::Behind,
            "overtook the spilled one"
        );
        assert_eq!(lanes.take(other), Take::Taken, "another webhook is held up");
        lanes.unspill([webhook].into_iter());
        // Two spilled (the refusal above counted one more): one claim back is not enough.
        assert_eq!(lanes.take(webhook), Take::Behind);
        lanes.forget_spills();
        assert_eq!(lanes.take(webhook), Take::Taken);
        // Claims see the room the lane has left.
        assert_eq!(lanes.room().left(&webhook), 0);
        assert_eq!(lanes.room().left(&other), 3);
        // A refusal keeps no lane for a webhook with nothing in the engine.
        let third = WebhookId::new();
        lanes.spill(third);
        assert_eq!(lanes.take(third), Take::Behind);
        assert!(!lanes.room().left.contains_key(&third));
    }

    fn queued(webhook: WebhookId, n: u8, budget: &Arc<Semaphore>) -> Queued {
        use crate::domain::apikey::Environment;
        use crate::domain::ids::{DeliveryId, OrganizationId};
        use crate::store::{SealedSecrets, Tenant};
        Queued {
            delivery: ClaimedDelivery {
                delivery_id: DeliveryId::new(),
                row: crate::store::RowKey::default(),
                tenant: Tenant {
                    organization_id: OrganizationId::new(),
                    environment: Environment::Live,
                },
                webhook_id: webhook,
                url: "https://example.com/".to_owned(),
                secrets: SealedSecrets {
                    current: Vec::new(),
                    previous: None,
                },
                event_id: format!("evt-{n}"),
                event_created_at: 0,
                payload: bytes::Bytes::new(),
                attempts_made: 0,
                lease_until: 0,
            },
            permit: Arc::clone(budget)
                .try_acquire_owned()
                .expect("a budget permit"),
            start_by: tokio::time::Instant::now(),
        }
    }

    #[test]
    fn a_lane_has_a_runner_per_place_at_most_and_hands_them_its_deliveries_in_order() {
        let lanes = InFlight::new(2);
        let webhook = WebhookId::new();
        let budget = Arc::new(Semaphore::new(16));
        // Three taken at publish, cap 2: two runners start, the third waits for one.
        let mut runners = 0;
        for n in 0..3 {
            assert_eq!(lanes.take(webhook), Take::Taken);
            if lanes.enqueue(webhook, queued(webhook, n, &budget)) {
                runners += 1;
            }
        }
        assert_eq!(runners, 2);
        let event = |q: Option<Queued>| q.map(|q| q.delivery.event_id);
        // Oldest first.
        assert_eq!(event(lanes.next(webhook, None)).as_deref(), Some("evt-0"));
        assert_eq!(event(lanes.next(webhook, None)).as_deref(), Some("evt-1"));
        // A runner that finished goes on with the one waiting; the other finds none and
        // retires; so does the last (a panicking runner's delivery counts as unsent).
        let third = lanes.next(webhook, Some(Some(true)));
        assert_eq!(event(third).as_deref(), Some("evt-2"));
        assert!(lanes.next(webhook, Some(Some(true))).is_none());
        assert!(
            lanes.room().left.contains_key(&webhook),
            "one still counted"
        );
        assert!(lanes.next(webhook, Some(None)).is_none());
        assert!(
            !lanes.room().left.contains_key(&webhook),
            "the lane is gone"
        );
        // The budget's permits went with the deliveries.
        assert_eq!(budget.available_permits(), 16);
        // A new delivery starts a runner again.
        assert_eq!(lanes.take(webhook), Take::Taken);
        assert!(lanes.enqueue(webhook, queued(webhook, 3, &budget)));
    }

    #[test]
    fn a_lane_that_answers_fast_queues_about_a_second_of_work_unless_it_fails() {
        let start = Instant::now();
        let at = |ms: u64| start + Duration::from_millis(ms);
        let mut lane = Lane::new(16, start);
        assert_eq!(lane.depth(at(0)), 32);
        // Within the first milliseconds, what finished is all it knows.
        for _ in 0..50 {
            lane.done.count(true, at(1));
        }
        assert_eq!(lane.depth(at(5)), 50);
        // After PACE_AFTER, the pace so far is scaled to a second: 50 in 100 ms.
        assert_eq!(lane.depth(at(100)), 500);
        for _ in 0..50 {
            lane.done.count(true, at(500));
        }
        // The next second starts from the last one's count; a quiet second after it
        // leaves twice the places.
        assert_eq!(lane.depth(at(1_000)), 100);
        assert_eq!(lane.depth(at(1_001)), 100);
        assert_eq!(lane.depth(at(2_500)), 32);
        // At most MAX_DEPTH per place.
        for _ in 0..1_000 {
            lane.done.count(true, at(2_600));
        }
        assert_eq!(lane.depth(at(2_600)), 16 * MAX_DEPTH);
        // A failure: its retries wait in the database, so no deep queue of fresh ones.
        lane.done.count(false, at(2_700));
        assert_eq!(lane.depth(at(2_700)), 32);
    }
}
