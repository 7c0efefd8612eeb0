//! How long a calendar change takes to reach the store: via a change notification, and via
//! periodic polling alone. Both measured against the simulator over loopback, each on its own
//! calsync service, for `calsync bench`.

use std::time::Duration;

use anyhow::Context;
use chrono::Utc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use calsync_core::app::Application;
use calsync_core::store::Store;
use calsync_sim::{self as sim, SimConfig, SimHandle};

/// Change-to-stored times, one per sample.
#[derive(Clone, Debug, Default)]
pub struct ChangeLatency {
    pub via_notification: Vec<Duration>,
    pub via_polling: Vec<Duration>,
    /// The polling service's `sync.interval`.
    pub poll_interval: Duration,
}

/// Moves one event per sample in the simulator and times until the store holds it at its new
/// start: `samples` times on a service subscribed to change notifications (periodic interval
/// one hour, so only notifications can explain the speed), then `samples` times on one that
/// only polls every `poll_interval` (changes land at random points of the interval, so expect
/// about half of it on average). A sample not stored within `poll_interval` + 30 s fails.
pub async fn change_to_stored(
    samples: usize,
    poll_interval: Duration,
) -> anyhow::Result<ChangeLatency> {
    let config = SimConfig::generated(1, 1, 50, 11);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let sim = sim::start(config.clone(), listener).await?;
    let limit = poll_interval + Duration::from_secs(30);
    let notified = measure(&sim, &config, samples, None, limit).await;
    let polled = match &notified {
        Ok(_) => measure(&sim, &config, samples, Some(poll_interval), limit).await,
        Err(_) => Ok(Vec::new()),
    };
    sim.shutdown().await;
    Ok(ChangeLatency {
        via_notification: notified?,
        via_polling: polled?,
        poll_interval,
    })
}

/// One service over `sim`: notifications on (`poll` = `None`) or polling every `poll`.
async fn measure(
    sim: &SimHandle,
    config: &SimConfig,
    samples: usize,
    poll: Option<Duration>,
    limit: Duration,
) -> anyhow::Result<Vec<Duration>> {
    let dir = tempfile_dir()?;
    let port = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0")?;
        probe.local_addr()?.port()
    };
    let interval = poll.map_or("1h".to_string(), |p| format!("{}ms", p.as_millis().max(1)));
    let notifications = match poll {
        None => format!(
            "[notifications]\npublic_url = \"http://127.0.0.1:{port}\"\ncheck_interval = \"100ms\"\n"
        ),
        Some(_) => String::new(),
    };
    let overrides = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\npublic_listen = \"127.0.0.1:{port}\"\n[sync]\ninterval = \"{interval}\"\njitter = \"0s\"\npoll_interval = \"10ms\"\n{notifications}"
    );
    let settings =
        crate::demo::sim_service_settings(sim, config, &dir.join("calsync.db"), &overrides)?;
    let app = Application::build(settings).await?;
    let store = app.store().clone();
    let shutdown = CancellationToken::new();
    let running = tokio::spawn(app.run_until_stopped(shutdown.clone()));
    let result = samples_on(sim, &store, samples, poll, limit).await;
    shutdown.cancel();
    let stopped = running.await;
    let _ = std::fs::remove_dir_all(&dir);
    stopped.context("the service task failed")??;
    result
}

async fn samples_on(
    sim: &SimHandle,
    store: &Store,
    samples: usize,
    poll: Option<Duration>,
    limit: Duration,
) -> anyhow::Result<Vec<Duration>> {
    let wait_for_subscription = poll.is_none();
    let started = Instant::now();
    let mailbox = loop {
        let ready = store
            .mailboxes()
            .await?
            .into_iter()
            .find(|m| m.last_success_at.is_some());
        let subscribed = !wait_for_subscription
            || store
                .subscriptions()
                .await?
                .iter()
                .any(|s| s.subscription_id.is_some());
        if let (Some(m), true) = (ready, subscribed) {
            break m;
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(30),
            "the mailbox was not synced{} within 30 s",
            if wait_for_subscription {
                " and subscribed"
            } else {
                ""
            }
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    // Timed events of their own: an all-day event's start is its date, an occurrence's is its series'.
    let events: Vec<_> = store
        .events(mailbox.id)
        .await?
        .into_iter()
        .filter(|e| !e.is_all_day && e.event_type.as_deref() == Some("singleInstance"))
        .collect();
    anyhow::ensure!(
        !events.is_empty(),
        "the simulated mailbox has no single timed events"
    );
    let mut out = Vec::with_capacity(samples);
    for i in 0..samples {
        let event = &events[i % events.len()];
        if let Some(interval) = poll {
            // At a random point of the polling interval, not just after a round.
            let phase = rand::Rng::gen_range(&mut rand::thread_rng(), 0.0..1.0);
            tokio::time::sleep(interval.mul_f64(phase)).await;
        }
        let start = (Utc::now() + chrono::Duration::days(1) + chrono::Duration::minutes(i as i64))
            .with_nanosecond_zero();
        let changed = Instant::now();
        anyhow::ensure!(
            sim.move_event(&mailbox.user_id, &event.id, start),
            "the simulator does not know event {}",
            event.id
        );
        loop {
            let stored = store.events(mailbox.id).await?;
            if stored
                .iter()
                .any(|e| e.id == event.id && e.start_utc == start)
            {
                out.push(changed.elapsed());
                break;
            }
            anyhow::ensure!(
                changed.elapsed() < limit,
                "a change was not stored within {limit:?}"
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
    Ok(out)
}

trait WholeSeconds {
    fn with_nanosecond_zero(self) -> Self;
}

impl WholeSeconds for chrono::DateTime<Utc> {
    fn with_nanosecond_zero(self) -> Self {
        chrono::DateTime::from_timestamp(self.timestamp(), 0).unwrap_or(self)
    }
}

fn tempfile_dir() -> anyhow::Result<std::path::PathBuf> {
    let dir = std::env::temp_dir().join(format!("calsync-latency-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}
