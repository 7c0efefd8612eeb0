//! The resilience pipeline's own cost: one Graph call on the success path through the same
//! functions `sync` uses ([`SuccessPath`]: the mailbox, tenant and app rate limits and the
//! tenant's Graph breaker when admitted; the success recorded on the breaker and its deposit in
//! the retry budget when answered), beside the `recloser` crate's breaker in the same run.
//! No HTTP, no token, no metrics: only what the resilience code adds to each call.
//!
//! `cargo bench -p calsync-core --bench pipeline`

use std::hint::black_box;

use calsync_core::config::Settings;
use calsync_core::resilience::success_path::SuccessPath;
use calsync_core::resilience::ResilienceSettings;
use criterion::Criterion;
use recloser::Recloser;
use tokio::time::Instant;

/// Calls per allocation count.
const COUNTED_CALLS: u64 = 100_000;

/// The embedded defaults.
fn settings() -> ResilienceSettings {
    Settings::from_toml_str("")
        .expect("the embedded defaults load")
        .resilience
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
    let pipeline = SuccessPath::new(&SuccessPath::unlimited(settings.clone()));
    let call = || assert!(pipeline.call(), "no limiter waits, the breaker is closed");
    let breaker_only = || assert!(pipeline.breaker_only(), "the breaker is closed");
    let breaker = recloser(&settings);

    println!("allocations per call ({COUNTED_CALLS} calls after a warm-up):");
    println!(
        "  calsync pipeline (limits + breaker + budget): {}",
        allocations_per_call(call)
    );
    println!(
        "  calsync breaker alone:                        {}",
        allocations_per_call(breaker_only)
    );
    println!(
        "  recloser breaker:                             {}",
        allocations_per_call(|| recloser_call(&breaker))
    );

    let mut c = Criterion::default().configure_from_args();
    let mut group = c.benchmark_group("success_call");
    group.bench_function("calsync_pipeline", |b| b.iter(call));
    group.bench_function("calsync_breaker", |b| b.iter(breaker_only));
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
