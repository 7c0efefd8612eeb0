//! Graph's app-wide limit: requests of the application across all tenants, counted in a
//! sliding window. Every Graph request counts when it arrives, whether it is answered or
//! throttled (Graph counts early retries against the app too); the token endpoint and the
//! simulator's `/_sim` control routes do not. Over the limit the answer is Graph's 429
//! `ApplicationThrottled` with a `Retry-After`. Off unless `app_requests_per_window` is set.
//!
//! Whether on or off, the simulator measures the app's Graph requests per second: the most
//! that arrived within any one second (a sliding window), for tests that check a fleet of
//! clients keeps under the limit.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::Response;
use serde::Serialize;
use tokio::time::Instant;

use super::faults::RetryAfter;
use super::reply::{finish, graph_error, Delivery, RequestIds};
use super::state::{lock, Shared};

const SECOND: Duration = Duration::from_secs(1);

/// What the simulator saw of the app-wide rate (in `/_sim/stats` as `app`).
#[derive(Debug, Clone, Default, Serialize)]
pub struct AppRequestStats {
    /// The enforced limit: requests per `window_ms` (none: not enforced).
    pub limit: Option<u32>,
    pub window_ms: u64,
    /// The most Graph requests that arrived within one second (any second, sliding).
    pub max_per_second: u64,
    /// The most within one enforcement window.
    pub max_per_window: u64,
    /// Requests answered 429 for being over the app-wide limit.
    pub throttled: u64,
}

/// Arrival times within the last second and within the enforcement window.
#[derive(Debug, Default)]
pub struct AppRequests {
    second: VecDeque<Instant>,
    window: VecDeque<Instant>,
}

/// What one arrival found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Arrival {
    /// Requests within the second ending now, this one included.
    pub in_second: u64,
    /// Requests within the window ending now, this one included.
    pub in_window: u64,
    /// Over the limit: a request would be accepted again after this long.
    pub throttled_for: Option<Duration>,
}

impl AppRequests {
    /// Counts a request arriving at `now` against `limit` requests per `window`.
    pub fn arrive(&mut self, now: Instant, limit: Option<u32>, window: Duration) -> Arrival {
        let in_second = count_in(&mut self.second, now, SECOND);
        let in_window = match limit {
            Some(_) => count_in(&mut self.window, now, window),
            None => in_second,
        };
        let throttled_for = limit.and_then(|limit| {
            let over = in_window.checked_sub(u64::from(limit)).filter(|n| *n > 0)?;
            // Until `over` of the requests in the window have left it.
            let leaving = self.window.get(usize::try_from(over - 1).ok()?)?;
            Some((*leaving + window).saturating_duration_since(now))
        });
        Arrival {
            in_second,
            in_window,
            throttled_for,
        }
    }
}

/// Drops arrivals older than `span` before `now`, adds `now`; how many are left.
fn count_in(arrivals: &mut VecDeque<Instant>, now: Instant, span: Duration) -> u64 {
    while arrivals
        .front()
        .is_some_and(|t| now.saturating_duration_since(*t) >= span)
    {
        arrivals.pop_front();
    }
    arrivals.push_back(now);
    arrivals.len() as u64
}

/// The middleware in front of every route: counts and limits the Graph ones (`/v1.0/...`).
pub async fn app_limit(State(sim): State<Arc<Shared>>, request: Request, next: Next) -> Response {
    if !request.uri().path().starts_with("/v1.0/") {
        return next.run(request).await;
    }
    let (limit, window) = (sim.config.app_requests_per_window, sim.config.app_window);
    let arrival = lock(&sim.app_requests).arrive(Instant::now(), limit, window);
    let throttled_for = {
        let mut stats = lock(&sim.stats);
        let app = &mut stats.app;
        app.limit = limit;
        app.window_ms = window.as_millis() as u64;
        app.max_per_second = app.max_per_second.max(arrival.in_second);
        app.max_per_window = app.max_per_window.max(arrival.in_window);
        if arrival.throttled_for.is_some() {
            app.throttled += 1;
            stats.requests += 1;
            stats.graph_requests += 1;
        }
        arrival.throttled_for
    };
    let Some(wait) = throttled_for else {
        return next.run(request).await;
    };
    let ids = RequestIds::from_headers(request.headers());
    let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    let reply = graph_error(
        429,
        "ApplicationThrottled",
        "Application is over its app-wide request limit.",
        &ids,
    )
    .retry_after(RetryAfter::Seconds(secs.max(1)))
    .header("request-id", ids.request_id.clone())
    .header("client-request-id", ids.client_request_id.clone());
    finish(reply, &Delivery::default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn counts_a_sliding_second_and_throttles_over_the_window_limit() {
        let mut app = AppRequests::default();
        let t0 = Instant::now();
        let ms = |n: u64| t0 + Duration::from_millis(n);
        let window = Duration::from_millis(500);
        for i in 0..3 {
            let a = app.arrive(ms(i * 100), Some(3), window);
            assert_eq!(a.throttled_for, None, "request {i}");
        }
        // The fourth within 500 ms is over; the first leaves the window at 500 ms.
        let a = app.arrive(ms(300), Some(3), window);
        assert_eq!(a.in_window, 4);
        assert_eq!(a.throttled_for, Some(Duration::from_millis(200)));
        // Throttled requests count too: at 400 ms two must leave (the 100 ms one at 600).
        let a = app.arrive(ms(400), Some(3), window);
        assert_eq!(a.in_window, 5);
        assert_eq!(a.throttled_for, Some(Duration::from_millis(200)));
        // At 600 ms the window holds 200, 300, 400 and this one: over until 700.
        let a = app.arrive(ms(600), Some(3), window);
        assert_eq!(a.in_window, 4);
        assert_eq!(a.throttled_for, Some(Duration::from_millis(100)));
        assert_eq!(a.in_second, 6, "every arrival within the second counts");
        let a = app.arrive(ms(1250), Some(3), window);
        assert_eq!((a.in_window, a.throttled_for), (1, None));
        assert_eq!(a.in_second, 4, "300, 400, 600 and 1250");
    }

    #[tokio::test(start_paused = true)]
    async fn without_a_limit_it_only_measures() {
        let mut app = AppRequests::default();
        let t0 = Instant::now();
        for i in 0..50 {
            let a = app.arrive(t0 + Duration::from_millis(i), None, SECOND);
            assert_eq!(a.throttled_for, None);
            assert_eq!(a.in_second, i + 1);
        }
    }
}
