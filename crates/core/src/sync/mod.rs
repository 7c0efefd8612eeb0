//! One sync job for one mailbox: a delta round over the mailbox's window, page by page, each
//! page committed with the link after it. A job may be cancelled at any await point (its
//! deadline is enforced from outside): the store then holds the last committed page.

mod series;
pub mod writes;

use std::future::Future;
use std::hash::{BuildHasher, Hash, Hasher};
use std::time::Duration;

use chrono::{DateTime, Utc};
use foldhash::{HashMap, HashMapExt, HashSet, HashSetExt};
use serde::Serialize;

use crate::auth::{AccessToken, AuthError, TokenProvider};
use crate::graph::{
    CheckedLink, DeltaPage, GraphClient, GraphError, PageItem, PageLink, RequestIds, Window,
};
use crate::metrics::DeferReason;
use crate::resilience::limits::{MailboxRate, RateLimits};
use crate::resilience::retry::{Decision, Failure, RetryPolicy};
use crate::resilience::{Admission, Evidence, GraphCall, Refused, TenantGuard};
use crate::store::{Cursor, Lease, MailboxRecord, PageWrite, RoundEnd, Store, StoreError};
use tokio::time::Instant;

/// A page seen this many times in one job means Graph is looping (the known endless-nextLink
/// fault); a single repeat can be an honest duplicate when pages are tiny.
const REPEATED_PAGE_LIMIT: usize = 3;

#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error(transparent)]
    Auth(#[from] AuthError),
    #[error(transparent)]
    Graph(#[from] GraphError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("delta round stopped after {pages} pages (graph.max_pages_per_round); the next job starts a fresh round")]
    RoundTooLong { pages: u64 },
    #[error("delta round is looping: the same page came back {times} times; the next job starts a fresh round")]
    PageLoop { times: usize },
    #[error("Graph asked for a resync again right after a resync")]
    ResyncLoop,
    #[error(
        "the same page failed {times} times in a row ({error}); the next job starts a fresh round"
    )]
    PageKeepsFailing { times: u32, error: GraphError },
    /// Not an error of the mailbox: the job stops and the mailbox is rescheduled `wait` later.
    /// `by_graph`: Graph named the wait (`Retry-After`), so nothing may run the mailbox sooner;
    /// otherwise it is calsync's own (a breaker, a rate limit).
    #[error("deferred for {}: {reason}", crate::config::HumanDuration(Duration::from_millis(.wait.as_millis() as u64)))]
    Deferred {
        wait: Duration,
        reason: String,
        by_graph: bool,
    },
}

impl SyncError {
    /// How long the server asked us to wait, if it did.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::Auth(e) => e.retry_after(),
            Self::Graph(e) => e.retry_after(),
            Self::Deferred { wait, .. } => Some(*wait),
            _ => None,
        }
    }

    /// Worth another attempt within the same job: throttling, 5xx, timeouts, resets, a token
    /// endpoint failing transiently.
    fn is_retryable(&self) -> bool {
        matches!(
            self,
            Self::Graph(
                GraphError::Transient { .. }
                    | GraphError::Unreachable { .. }
                    | GraphError::Throttled { .. }
            ) | Self::Auth(AuthError::Transient { .. })
        )
    }

    /// After a write's delivery stopped on this error, whether the whole job stops: Graph
    /// asked the mailbox to wait (throttling), the tenant cannot call Graph at all (token
    /// endpoint, breaker), or the job lost its lease or its store. Otherwise (a write timed
    /// out, Graph answered 5xx) the job still runs its delta round, so a write Graph keeps
    /// failing does not hold back the mailbox's reads, and then ends failed with the write's
    /// error (the mailbox backs off; the write waits, queued).
    pub fn stops_the_job(&self) -> bool {
        !matches!(
            self,
            Self::Graph(
                GraphError::Transient { .. }
                    | GraphError::Unreachable { .. }
                    | GraphError::Malformed { .. }
            )
        )
    }

    /// What the Graph call that produced this error says about Graph's health for the tenant.
    fn evidence(&self) -> Evidence {
        match self {
            Self::Graph(GraphError::Unreachable { .. }) => Evidence::GraphFailure,
            Self::Graph(GraphError::Transient { .. }) => Evidence::MailboxFailure,
            // A 429 is Graph working as designed (often one busy mailbox): obeyed, not counted.
            Self::Graph(
                GraphError::Throttled { .. }
                | GraphError::Unauthorized { .. }
                | GraphError::ResyncRequired { .. }
                | GraphError::NotFound { .. }
                | GraphError::Permanent { .. }
                | GraphError::DuplicateTransaction { .. },
            ) => Evidence::Healthy,
            _ => Evidence::Neutral,
        }
    }

    /// The class of this error as a metric label (never its message).
    pub fn reason_label(&self) -> &'static str {
        match self {
            Self::Auth(e) => match e.class() {
                crate::auth::AuthFailureClass::Permanent => "auth_permanent",
                crate::auth::AuthFailureClass::Transient => "auth_transient",
            },
            Self::Graph(e) => e.reason_label(),
            Self::Store(StoreError::LeaseLost(_)) => "lease_lost",
            Self::Store(_) => "store",
            Self::RoundTooLong { .. } => "round_too_long",
            Self::PageLoop { .. } => "page_loop",
            Self::ResyncLoop => "resync_loop",
            Self::PageKeepsFailing { .. } => "page_keeps_failing",
            Self::Deferred { .. } => "deferred",
        }
    }

    pub fn request_ids(&self) -> Option<&RequestIds> {
        match self {
            Self::Graph(e) => e.request_ids(),
            _ => None,
        }
    }
}

/// What a job did, filled in as pages commit so it is accurate even when the job is cut off.
#[derive(Clone, Debug, Default, Serialize)]
pub struct SyncReport {
    pub full_round: bool,
    pub resynced: bool,
    pub pages: u64,
    pub upserted: u64,
    pub deleted: u64,
    /// Items set aside in quarantine (they could not be understood).
    pub quarantined: u64,
    pub completed: bool,
    /// Series masters fetched because stubs of their series came without them.
    pub master_requests: u64,
    pub last_request_id: Option<String>,
    /// The application's writes delivered to Outlook, kept as conflicts, or refused for good.
    pub writes_delivered: u64,
    pub writes_conflicted: u64,
    pub writes_failed: u64,
    /// The round ended on an empty page: its deltaLink, for the job's end to write with the
    /// job's record (see [`RoundEnd`]).
    #[serde(skip)]
    pub round_end: Option<RoundEnd>,
}

/// Everything a round works with besides the mailbox itself.
pub struct RoundContext<'a> {
    pub graph: &'a GraphClient,
    pub store: &'a Store,
    pub tokens: &'a TokenProvider,
    pub guard: &'a TenantGuard,
    pub limits: &'a RateLimits,
    /// The mailbox's own rate limiter, taken once for the job's calls.
    pub mailbox_rate: MailboxRate,
    pub lease: &'a Lease,
    pub window_past: Duration,
    pub window_future: Duration,
    pub max_pages_per_round: u32,
    /// A page failing the same way this many times in a row starts a fresh round.
    pub page_failure_limit: u32,
    /// The job's deadline: waits (rate limits, retries) that would end after it are not started.
    pub deadline: Instant,
    /// Retries of one request: how many, how long apart.
    pub retry: RetryPolicy,
    pub slow_call: Duration,
}

const DAY_SECS: i64 = 86_400;

/// The window a round started now covers for the mailbox `user_id` of `tenant`. It moves once a
/// day, at the mailbox's own second of the day (a stable hash of the mailbox), so mailboxes
/// spread the full rounds a new window costs over the day instead of all starting them at
/// 00:00 UTC. Between moves it always covers `now - past .. now + future`: it runs from the
/// last move minus `past` to the next move plus `future`.
pub fn window_at(
    now: DateTime<Utc>,
    past: Duration,
    future: Duration,
    tenant: &str,
    user_id: &str,
) -> Window {
    let offset = (stable_hash(tenant, user_id) % DAY_SECS as u64) as i64;
    let moved = (now.timestamp() - offset).div_euclid(DAY_SECS) * DAY_SECS + offset;
    let moved = DateTime::from_timestamp(moved, 0).unwrap_or(now);
    // Whole seconds, so the window reads back from the store exactly as it was written.
    let past = chrono::Duration::seconds(past.as_secs() as i64);
    let future =
        chrono::Duration::seconds(future.as_secs() as i64 + i64::from(future.subsec_nanos() > 0));
    Window {
        start: moved
            .checked_sub_signed(past)
            .unwrap_or(DateTime::<Utc>::MIN_UTC),
        end: moved
            .checked_add_signed(chrono::Duration::seconds(DAY_SECS) + future)
            .unwrap_or(DateTime::<Utc>::MAX_UTC),
    }
}

/// FNV-1a with a final mix: the same on every replica and every build (std's hasher is not
/// promised to be), or a mixed fleet would move a mailbox's window back and forth, each move a
/// full round.
fn stable_hash(tenant: &str, user_id: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in tenant.bytes().chain([0]).chain(user_id.bytes()) {
        h ^= u64::from(byte);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h
}

/// Runs one delta round for `mailbox`, starting a full round when there is no usable state
/// or when the window has moved.
pub async fn run_round(
    ctx: &RoundContext<'_>,
    mailbox: &MailboxRecord,
    now: DateTime<Utc>,
    report: &mut SyncReport,
) -> Result<(), SyncError> {
    let RoundContext {
        graph,
        store,
        lease,
        ..
    } = *ctx;
    let window = window_at(
        now,
        ctx.window_past,
        ctx.window_future,
        &mailbox.tenant,
        &mailbox.user_id,
    );
    let mut cursor = mailbox.cursor.clone();
    let has_state = cursor.next_link.is_some() || cursor.delta_link.is_some();
    if cursor.window != Some(window) || (!has_state && !cursor.full) || cursor.round_id == 0 {
        cursor = start_full_round(store, lease, window).await?;
    }
    report.full_round = cursor.full;
    let mut seen_pages: HashMap<u64, usize> = HashMap::new();
    let mut seen_links: HashSet<String> = HashSet::new();
    let mut masters = series::RoundMasters::default();
    let mut pages_this_job: u64 = 0;
    loop {
        let url = match (&cursor.next_link, &cursor.delta_link) {
            (Some(link), _) | (None, Some(link)) => graph.check_link(link)?,
            (None, None) => graph.initial_link(&mailbox.user_id, &window),
        };
        pages_this_job += 1;
        if pages_this_job > u64::from(ctx.max_pages_per_round) {
            // The stored nextLink is inside the endless chain: drop it, or every later job
            // would resume the loop. Events stay until a completed round reconciles them.
            start_full_round(store, lease, window).await?;
            return Err(SyncError::RoundTooLong {
                pages: pages_this_job - 1,
            });
        }
        let page = match call_graph(ctx, |token| {
            let url = &url;
            async move { graph.fetch_page(url, &token).await }
        })
        .await
        {
            Ok((page, ids)) => {
                report.last_request_id = ids.request_id;
                page
            }
            Err(SyncError::Graph(GraphError::ResyncRequired { code, ids, .. })) => {
                if report.resynced {
                    return Err(SyncError::ResyncLoop);
                }
                tracing::info!(
                    mailbox = %mailbox.user_id, %code, %ids,
                    "delta state expired; starting a full resync of the window"
                );
                report.resynced = true;
                cursor = start_full_round(store, lease, window).await?;
                report.full_round = true;
                seen_pages.clear();
                seen_links.clear();
                continue;
            }
            Err(SyncError::Graph(error @ GraphError::Malformed { .. })) => {
                return Err(page_failed(ctx, &url, error).await);
            }
            Err(e) => return Err(e),
        };
        if let Err(looping) = detect_loop(&page, &mut seen_pages, &mut seen_links) {
            start_full_round(store, lease, window).await?;
            return Err(looping);
        }
        // Checked before the page commits: a refused link must not become the stored cursor,
        // where every later job would fail on it.
        match &page.link {
            PageLink::Next(link) | PageLink::Delta(link) => graph.accept_link(link)?,
        };
        if let (PageLink::Delta(delta), true, false) = (
            &page.link,
            page.items.is_empty() && page.rejected.is_empty(),
            cursor.full,
        ) {
            // An idle round: nothing to write but the cursor, which the job's record carries
            // (one write per idle job instead of two, under the same fence).
            report.pages += 1;
            report.completed = true;
            report.round_end = Some(RoundEnd {
                round_id: cursor.round_id,
                delta_link: delta.clone(),
            });
            return Ok(());
        }
        let resolved = series::resolve_page(
            ctx,
            mailbox,
            &cursor,
            page.items,
            page.rejected,
            &mut masters,
            report,
        )
        .await?;
        for item in &resolved.rejected {
            tracing::warn!(
                mailbox = %mailbox.user_id,
                item = item.id.as_deref().unwrap_or("(no id)"),
                reason = %item.reason,
                "an item Graph sent could not be understood; quarantined, the rest of the page is applied"
            );
        }
        let write = PageWrite {
            items: resolved.items,
            masters: &resolved.masters,
            gone_series: &resolved.gone_series,
            round: &resolved.round,
            quarantined: &resolved.rejected,
        };
        let applied = store
            .apply_page(lease, &cursor, write, &page.link, Utc::now())
            .await?;
        report.pages += 1;
        report.upserted += applied.upserted;
        report.deleted += applied.deleted;
        report.quarantined += resolved.rejected.len() as u64;
        crate::metrics::items_quarantined(ctx.tokens.tenant(), resolved.rejected.len() as u64);
        match page.link {
            PageLink::Next(next) => cursor.next_link = Some(next),
            PageLink::Delta(delta) => {
                cursor.next_link = None;
                cursor.delta_link = Some(delta);
                cursor.full = false;
                report.completed = true;
                return Ok(());
            }
        }
    }
}

/// A page Graph answered with something that is not a delta page (not JSON, too large): the job
/// fails without writing. The same failure at the same link `page_failure_limit` times in a row
/// resets the cursor, so the next job starts a fresh round instead of fetching it forever.
async fn page_failed(ctx: &RoundContext<'_>, url: &CheckedLink, error: GraphError) -> SyncError {
    let digest = ring::digest::digest(
        &ring::digest::SHA256,
        format!("malformed {}", url.as_str()).as_bytes(),
    );
    let signature = crate::hex(&digest.as_ref()[..16]);
    match ctx
        .store
        .note_page_failure(ctx.lease, &signature, ctx.page_failure_limit)
        .await
    {
        Ok((times, true)) => {
            crate::metrics::fresh_round_forced(ctx.tokens.tenant());
            SyncError::PageKeepsFailing { times, error }
        }
        Ok((_, false)) => SyncError::Graph(error),
        Err(e) => SyncError::Store(e),
    }
}

async fn start_full_round(
    store: &Store,
    lease: &Lease,
    window: Window,
) -> Result<Cursor, SyncError> {
    let round_id = store.start_full_round(lease, &window).await?;
    Ok(Cursor {
        round_id,
        full: true,
        window: Some(window),
        next_link: None,
        delta_link: None,
    })
}

/// One Graph call (a page, a series master), through the rate limits and the tenant's Graph
/// breaker, with a fresh token after a 401, retried on throttling and transient failures with
/// backoff (or exactly `Retry-After`, plus jitter, never less), within the retry budget and
/// never past the job's deadline: a wait that would end after it stops the job as deferred, so
/// it holds no worker while it waits.
async fn call_graph<T, F, Fut>(
    ctx: &RoundContext<'_>,
    call: F,
) -> Result<(T, RequestIds), SyncError>
where
    F: Fn(AccessToken) -> Fut,
    Fut: Future<Output = Result<(T, RequestIds), GraphError>>,
{
    let mailbox = ctx.mailbox_rate.id();
    let mut attempt: u32 = 0;
    loop {
        // Below the limits (nearly every call) the admission is decided without a future.
        let admitted = match ctx
            .guard
            .admit_now(ctx.limits, &ctx.mailbox_rate, ctx.deadline)
        {
            Admission::Decided(decided) => decided,
            Admission::Wait(pending) => {
                ctx.guard
                    .admit_after(ctx.limits, pending, &ctx.mailbox_rate, ctx.deadline)
                    .await
            }
        };
        let GraphCall {
            reservation,
            admitted_at: started,
        } = match admitted {
            Ok(call) => call,
            Err(Refused::RateLimit(wait)) => {
                crate::metrics::job_deferred(
                    ctx.tokens.tenant(),
                    DeferReason::RateLimit,
                    wait.ready_in,
                );
                return Err(SyncError::Deferred {
                    wait: wait.ready_in,
                    reason: "request rate limit".into(),
                    by_graph: false,
                });
            }
            Err(Refused::Breaker(rejected)) => {
                crate::metrics::job_deferred(
                    ctx.tokens.tenant(),
                    DeferReason::GraphBreaker,
                    rejected.until.saturating_duration_since(Instant::now()),
                );
                return Err(SyncError::Deferred {
                    wait: rejected.until.saturating_duration_since(Instant::now()),
                    reason: "the tenant's Graph circuit is open".into(),
                    by_graph: false,
                });
            }
        };
        let result = with_fresh_token(ctx.tokens, &call).await;
        let ended = Instant::now();
        match &result {
            Ok(_) => crate::metrics::graph_request(ctx.tokens.tenant(), "2xx"),
            // An error without a Graph error (no token, a refused link) sent nothing.
            Err(SyncError::Graph(e)) => {
                crate::metrics::graph_request(ctx.tokens.tenant(), e.status_label())
            }
            Err(_) => {}
        }
        if let Some(ids) = match &result {
            Ok((_, ids)) => Some(ids),
            Err(e) => e.request_ids(),
        } {
            crate::telemetry::record_request_ids(ids.request_id.as_deref(), &ids.client_request_id);
        }
        let evidence = match &result {
            // Slow for one mailbox (a huge calendar) is that mailbox's matter unless others are.
            Ok(_) if ended.saturating_duration_since(started) > ctx.slow_call => {
                Evidence::MailboxFailure
            }
            Ok(_) => Evidence::Healthy,
            Err(e) => e.evidence(),
        };
        let error = match result {
            Ok(answer) => {
                ctx.guard.answered(reservation, mailbox, evidence, ended);
                return Ok(answer);
            }
            Err(SyncError::Auth(
                e @ AuthError::BreakerOpen {
                    permanent: false, ..
                },
            )) => {
                reservation.release();
                crate::metrics::job_deferred(
                    ctx.tokens.tenant(),
                    DeferReason::TokenBreaker,
                    e.retry_after().unwrap_or_default(),
                );
                return Err(SyncError::Deferred {
                    wait: e.retry_after().unwrap_or_default(),
                    reason: e.to_string(),
                    by_graph: false,
                });
            }
            Err(e) => e,
        };
        let retry = next_attempt(ctx, &error, attempt);
        // The attempts of one request are one piece of evidence: only the last one counts.
        match (&retry, evidence) {
            (Ok(_), Evidence::MailboxFailure) => reservation.release(),
            _ => settle(ctx, mailbox, reservation, evidence, ended),
        }
        let (wait, told) = match retry {
            Ok(next) => next,
            Err(stop) => return Err(stop.unwrap_or(error)),
        };
        attempt += 1;
        crate::metrics::graph_retry(ctx.tokens.tenant(), told.then_some(wait));
        tracing::info!(attempt, wait_ms = wait.as_millis() as u64, error = %error, "retrying Graph request");
        tokio::time::sleep(wait).await;
    }
}

/// Records what a call says about Graph in the tenant's breaker.
fn settle(
    ctx: &RoundContext<'_>,
    mailbox: i64,
    reservation: crate::resilience::guard::Reservation<'_>,
    evidence: Evidence,
    ended: Instant,
) {
    ctx.guard.settle(reservation, mailbox, evidence, ended);
}

/// Whether a failed attempt is tried again: `Ok((wait, told))` to retry after `wait` (`told`:
/// Graph named it), `Err(None)` to give up with the error, `Err(Some(deferral))` when Graph
/// asked for a wait past the job's deadline (the job ends and the mailbox waits unworked).
#[allow(clippy::type_complexity)]
fn next_attempt(
    ctx: &RoundContext<'_>,
    error: &SyncError,
    attempt: u32,
) -> Result<(Duration, bool), Option<SyncError>> {
    let failure = Failure {
        retryable: error.is_retryable(),
        retry_after: error.retry_after(),
    };
    let remaining = ctx.deadline.saturating_duration_since(Instant::now());
    // The budget is withdrawn from only for a retry that happens.
    match ctx.retry.decide(failure, attempt, remaining, true) {
        Decision::Retry { wait, told } if ctx.guard.try_retry() => Ok((wait, told)),
        Decision::Retry { .. } | Decision::GiveUp => Err(None),
        Decision::Defer { wait } => {
            crate::metrics::job_deferred(ctx.tokens.tenant(), DeferReason::RetryAfter, wait);
            Err(Some(SyncError::Deferred {
                wait,
                reason: format!("asked to retry after {}s: {error}", wait.as_secs()),
                by_graph: true,
            }))
        }
    }
}

/// A 401 means the token expired or was revoked: drop it, fetch a fresh one, try once more.
async fn with_fresh_token<T, F, Fut>(
    tokens: &TokenProvider,
    call: &F,
) -> Result<(T, RequestIds), SyncError>
where
    F: Fn(AccessToken) -> Fut,
    Fut: Future<Output = Result<(T, RequestIds), GraphError>>,
{
    let token: AccessToken = tokens.token().await?;
    match call(token.clone()).await {
        Err(GraphError::Unauthorized { ids, .. }) => {
            crate::metrics::graph_unauthorized(tokens.tenant());
            tracing::info!(tenant = tokens.tenant(), %ids, "Graph refused the access token; refreshing it once");
            tokens.invalidate(&token).await;
            let fresh = tokens.token().await?;
            Ok(call(fresh).await?)
        }
        other => Ok(other?),
    }
}

fn detect_loop(
    page: &DeltaPage,
    seen_pages: &mut HashMap<u64, usize>,
    seen_links: &mut HashSet<String>,
) -> Result<(), SyncError> {
    if let PageLink::Next(next) = &page.link {
        if !seen_links.insert(next.clone()) {
            return Err(SyncError::PageLoop { times: 2 });
        }
    }
    if page.items.is_empty() {
        return Ok(());
    }
    // Fingerprints within one job: foldhash, not SipHash, whose cost per byte of the ids was
    // ~2 % of a stored event's instructions.
    let mut hasher = seen_pages.hasher().build_hasher();
    for item in &page.items {
        match item {
            // The change key moves with every change, so (id, changeKey) identifies the content.
            PageItem::Event(event) | PageItem::Master(event) => {
                (&event.id, &event.change_key).hash(&mut hasher)
            }
            // A stub has no changeKey; its etag moves with its series.
            PageItem::Occurrence(stub) => (&stub.id, &stub.etag).hash(&mut hasher),
            PageItem::Removed { id } => ("removed", id).hash(&mut hasher),
        }
    }
    let times = seen_pages.entry(hasher.finish()).or_insert(0);
    *times += 1;
    if *times >= REPEATED_PAGE_LIMIT {
        return Err(SyncError::PageLoop { times: *times });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Timelike;

    const DAY: Duration = Duration::from_secs(86_400);

    fn at(text: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(text)
            .expect("a test time")
            .with_timezone(&Utc)
    }

    #[test]
    fn the_window_always_covers_past_and_future_and_moves_once_a_day() {
        let (past, future) = (DAY * 30, DAY * 180);
        let t0 = at("2026-11-27T00:00:00Z");
        for mailbox in ["alice@contoso.com", "bob@contoso.com", "carol@fabrikam.com"] {
            let mut moves = Vec::new();
            let mut last = window_at(t0, past, future, "contoso", mailbox);
            // Every 7 minutes for three days.
            for step in 1..=(3 * 24 * 60 / 7) {
                let now = t0 + chrono::Duration::minutes(7 * step);
                let w = window_at(now, past, future, "contoso", mailbox);
                assert!(
                    w.start <= now - chrono::Duration::days(30),
                    "{mailbox} at {now}: {w:?}"
                );
                assert!(
                    w.end >= now + chrono::Duration::days(180),
                    "{mailbox} at {now}: {w:?}"
                );
                assert_eq!(w.end - w.start, chrono::Duration::days(211));
                if w != last {
                    assert!(w.start > last.start, "it only moves forward");
                    moves.push(now);
                    last = w;
                }
            }
            assert_eq!(moves.len(), 3, "{mailbox}: once a day: {moves:?}");
            for pair in moves.windows(2) {
                let apart = pair[1] - pair[0];
                assert!(
                    (apart - chrono::Duration::days(1)).num_minutes().abs() <= 7,
                    "{mailbox}: a day apart: {moves:?}"
                );
            }
        }
    }

    #[test]
    fn mailboxes_move_their_windows_at_their_own_time_of_day() {
        let (past, future) = (DAY * 30, DAY * 180);
        let mut per_hour = [0u32; 24];
        for n in 0..1000 {
            let w = window_at(
                at("2026-11-27T12:00:00Z"),
                past,
                future,
                "contoso",
                &format!("user{n}@contoso.com"),
            );
            let moved = w.start + chrono::Duration::days(30);
            per_hour[moved.hour() as usize] += 1;
        }
        let busiest = per_hour.iter().max().copied().unwrap_or(0);
        assert!(
            busiest <= 2 * 1000 / 24,
            "busiest hour {busiest} of 1000: {per_hour:?}"
        );
    }

    #[test]
    fn the_time_of_day_is_stable_across_builds_and_tenants_count() {
        // A change of the hash moves every mailbox's window once, a fleet-wide full round:
        // this pins it.
        let w = window_at(
            at("2026-11-27T12:00:00Z"),
            DAY,
            DAY,
            "contoso",
            "alice@contoso.com",
        );
        assert_eq!(
            w.start,
            at("2026-11-25T14:00:19Z"),
            "alice moves her window at 14:00:19 UTC"
        );
        let other = window_at(
            at("2026-11-27T12:00:00Z"),
            DAY,
            DAY,
            "fabrikam",
            "alice@contoso.com",
        );
        assert_ne!(w, other);
    }
}
