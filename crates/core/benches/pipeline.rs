//! The resilience pipeline's own cost: one Graph call on the success path through the same
//! functions `sync` uses ([`TenantGuard::admit_now`]: the mailbox, tenant and app rate limits and
//! the tenant's Graph breaker; [`TenantGuard::answered`]: the success recorded on the breaker
//! and its deposit in the retry budget), beside the `recloser` crate's breaker in the same run.
//! No HTTP, no token, no metrics: only what the resilience code adds to each call.
//!
//! `cargo bench -p calsync-core --bench pipeline`

use std::hint::black_box;
use std::time::Duration;

use calsync_core::config::Settings;
use calsync_core::resilience::limits::{MailboxRate, RateLimits};
use calsync_core::resilience::{Admission, Evidence, ResilienceSettings, TenantGuard};
use criterion::Criterion;
use recloser::Recloser;
use tokio::time::Instant;

const MAILBOX: i64 = 42;
/// Calls per allocation count.
const COUNTED_CALLS: u64 = 100_000;

/// The embedded defaults, with rate limits so high that the limiters count every call but
/// never make one wait (a wait would need a runtime, and would measure the limit, not the code).
fn settings() -> ResilienceSettings {
    let defaults = Settings::from_toml_str("")
        .expect("the embedded defaults load")
        .resilience;
    ResilienceSettings {
        mailbox_requests_per_10min: u32::MAX,
        tenant_requests_per_second: 1_000_000_000,
        app_requests_per_second: 1_000_000_000,
        ..defaults
    }
}

struct Pipeline {
    limits: RateLimits,
    guard: TenantGuard,
    /// The mailbox's limiter, as a job takes it once for all its calls.
    mailbox: MailboxRate,
    deadline: Instant,
}

impl Pipeline {
    fn new(settings: &ResilienceSettings) -> Self {
        let limits = RateLimits::new(settings);
        let guard = TenantGuard::new("bench", settings, &limits);
        Self {
            mailbox: limits.mailbox(MAILBOX),
            limits,
            guard,
            deadline: Instant::now() + Duration::from_secs(3600),
        }
    }

    /// One call's way through the pipeline, as `sync::call_graph` takes it when Graph answers:
    /// admitted (one clock read for the permits), answered (the caller's clock read when the
    /// answer came, which also times the call against `slow_call`).
    fn call(&self) {
        let Admission::Decided(admitted) =
            self.guard
                .admit_now(&self.limits, black_box(&self.mailbox), self.deadline)
        else {
            panic!("no limiter waits: the limits are far above the bench's rate");
        };
        let call = admitted.expect("admitted: the breaker is closed");
        let ended = Instant::now();
        black_box(ended.saturating_duration_since(call.admitted_at));
        self.guard.answered(
            call.reservation,
            MAILBOX,
            black_box(Evidence::Healthy),
            ended,
        );
    }

    /// The breaker alone (reserve, record the success), for a like-for-like look at recloser.
    fn breaker_only(&self) {
        self.guard
            .graph
            .reserve()
            .expect("the breaker is closed")
            .record(calsync_core::resilience::breaker::CallOutcome::Success);
    }
}

/// recloser's breaker set like calsync's defaults: the failure rate, at least `min_calls`
/// calls before it judges, `probes` calls half-open, the base break time.
fn recloser(settings: &ResilienceSettings) -> Recloser {
    let b = &settings.breaker;
    Recloser::custom()
        .error_rate(b.failure_rate as f32)
        .closed_len(b.min_calls as usize)
        .half_open_len(b.probes as usize)
        .open_wait(b.base_break)
        .build()
}

fn recloser_call(r: &Recloser) {
    r.call(|| black_box(Ok::<_, ()>(())))
        .expect("the breaker is closed");
}

/// Allocations per call, after a warm-up, counted on this thread.
fn allocations_per_call(call: impl Fn()) -> f64 {
    for _ in 0..1_000 {
        call();
    }
    let counted = allocation_counter::measure(|| {
        for _ in 0..COUNTED_CALLS {
            call();
        }
    });
    counted.count_total as f64 / COUNTED_CALLS as f64
}

fn main() {
    let settings = settings();
    let pipeline = Pipeline::new(&settings);
    let breaker = recloser(&settings);

    println!("allocations per call ({COUNTED_CALLS} calls after a warm-up):");
    println!(
        "  calsync pipeline (limits + breaker + budget): {}",
        allocations_per_call(|| pipeline.call())
    );
    println!(
        "  calsync breaker alone:                        {}",
        allocations_per_call(|| pipeline.breaker_only())
    );
    println!(
        "  recloser breaker:                             {}",
        allocations_per_call(|| recloser_call(&breaker))
    );

    let mut c = Criterion::default().configure_from_args();
    let mut group = c.benchmark_group("success_call");
    group.bench_function("calsync_pipeline", |b| b.iter(|| pipeline.call()));
    group.bench_function("calsync_breaker", |b| b.iter(|| pipeline.breaker_only()));
    group.bench_function("recloser_breaker", |b| b.iter(|| recloser_call(&breaker)));
    // A successful call reads the clock twice (the permits when admitted, the breaker's
    // window when answered), for scale. This bench is built with tokio's `test-util` (a
    // dev-dependency), whose clock first looks for a paused runtime; the service's build reads
    // the system clock directly, like `std_clock_read`.
    group.bench_function("clock_read", |b| b.iter(|| black_box(Instant::now())));
    group.bench_function("std_clock_read", |b| {
        b.iter(|| black_box(std::time::Instant::now()))
    });
    group.finish();
    c.final_summary();
}
