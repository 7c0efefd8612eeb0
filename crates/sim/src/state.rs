//! Shared simulator state: tenants, mailboxes with their calendars and Outlook limit counters,
//! fault rules, stats and the simulator clock.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

pub use super::locks::lock;
use std::time::Duration;

use chrono::{DateTime, DurationRound, Utc};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::sync::watch;
use tokio::time::Instant;

use super::calendar::{MailboxCalendar, Window};
use super::config::{SimConfig, SimTenant};
use super::faults::FaultSet;
use super::stats::{MailboxStats, SimStats, TenantStats};
use super::subscriptions::{notify_changes, Subscriptions};
use super::tokens::Signer;

pub struct MailboxState {
    pub calendar: MailboxCalendar,
    pub in_flight: usize,
    pub window_start: Instant,
    pub window_count: u32,
    /// Set when a response told the client to wait; earlier requests are early retries.
    pub not_before: Option<Instant>,
}

pub struct MailboxEntry {
    pub address: String,
    /// The user's Entra object id, stable for a seed: Graph's notifications name the user by it.
    pub object_id: String,
    pub tenant: usize,
    pub state: Mutex<MailboxState>,
}

pub struct Shared {
    pub config: SimConfig,
    pub signer: Signer,
    pub tenants: Vec<SimTenant>,
    /// Lower-cased tenant id, name and mailbox domain -> index into `tenants`.
    tenant_keys: HashMap<String, usize>,
    /// Lower-cased address -> mailbox.
    pub mailboxes: HashMap<String, MailboxEntry>,
    /// Mailbox addresses in config order, for deterministic random picks.
    pub mailbox_order: Vec<String>,
    pub faults: Mutex<FaultSet>,
    pub stats: Mutex<SimStats>,
    /// Graph requests of the app, for its app-wide limit.
    pub app_requests: Mutex<super::app_limit::AppRequests>,
    pub token_not_before: Mutex<HashMap<usize, Instant>>,
    clock_offset: Mutex<chrono::Duration>,
    pub mutation_rate: watch::Sender<f64>,
    pub mutation_rng: Mutex<StdRng>,
    /// Change-notification subscriptions and what was sent to clients.
    pub subscriptions: Arc<Subscriptions>,
    /// Answer a create retried with its transactionId by `ErrorDuplicateTransactionId` (naming
    /// the event) instead of 201 with the event, as some clients report Graph doing.
    pub refuse_transaction_retries: std::sync::atomic::AtomicBool,
}

impl Shared {
    pub fn new(config: SimConfig) -> anyhow::Result<Arc<Self>> {
        config.validate()?;
        let now = Utc::now();
        let midnight = now.duration_trunc(chrono::Duration::days(1)).unwrap_or(now);
        let range = Window {
            start: config.calendar_start.resolve(midnight),
            end: config.calendar_end.resolve(midnight),
        };
        anyhow::ensure!(
            range.start < range.end,
            "calendar_start must be before calendar_end"
        );
        let mut tenant_keys = HashMap::new();
        let mut mailboxes = HashMap::new();
        let mut mailbox_order = Vec::new();
        let mut stats = SimStats::default();
        let started = Instant::now();
        for (ti, t) in config.tenants.iter().enumerate() {
            tenant_keys.insert(t.tenant_id.to_ascii_lowercase(), ti);
            tenant_keys.insert(t.name.to_ascii_lowercase(), ti);
            stats.tenants.insert(
                t.name.clone(),
                TenantStats {
                    tenant_id: t.tenant_id.clone(),
                    ..TenantStats::default()
                },
            );
            for m in &t.mailboxes {
                if let Some((_, domain)) = m.split_once('@') {
                    tenant_keys.entry(domain.to_ascii_lowercase()).or_insert(ti);
                }
                let index = mailbox_order.len() as u64;
                let calendar = MailboxCalendar::generate(
                    m,
                    config.seed,
                    index,
                    config.events_per_mailbox,
                    range,
                    now,
                );
                mailboxes.insert(
                    m.to_ascii_lowercase(),
                    MailboxEntry {
                        address: m.clone(),
                        object_id: super::config::derived_guid(
                            config.seed,
                            &format!("user-object-id-{}", m.to_ascii_lowercase()),
                        ),
                        tenant: ti,
                        state: Mutex::new(MailboxState {
                            calendar,
                            in_flight: 0,
                            window_start: started,
                            window_count: 0,
                            not_before: None,
                        }),
                    },
                );
                stats.mailboxes.insert(
                    m.clone(),
                    MailboxStats {
                        tenant: t.name.clone(),
                        ..MailboxStats::default()
                    },
                );
                mailbox_order.push(m.to_ascii_lowercase());
            }
        }
        let (mutation_rate, _) = watch::channel(config.mutations_per_second);
        Ok(Arc::new(Self {
            signer: Signer::random(),
            tenants: config.tenants.clone(),
            tenant_keys,
            mailboxes,
            mailbox_order,
            faults: Mutex::new(FaultSet::new(config.seed)),
            stats: Mutex::new(stats),
            app_requests: Mutex::new(Default::default()),
            token_not_before: Mutex::new(HashMap::new()),
            clock_offset: Mutex::new(chrono::Duration::zero()),
            mutation_rate,
            mutation_rng: Mutex::new(StdRng::seed_from_u64(config.seed ^ 0x7a7e)),
            subscriptions: Arc::new(Subscriptions::new()),
            refuse_transaction_retries: std::sync::atomic::AtomicBool::new(false),
            config,
        }))
    }

    /// The simulator's wall clock: real time plus any test-requested advance. Token lifetimes
    /// and delta-token ages are judged against it.
    pub fn now(&self) -> DateTime<Utc> {
        Utc::now() + *lock(&self.clock_offset)
    }

    pub fn advance_clock(&self, by: Duration) {
        let by = chrono::Duration::from_std(by).unwrap_or(chrono::Duration::zero());
        *lock(&self.clock_offset) += by;
    }

    pub fn move_clock_back(&self, by: Duration) {
        let by = chrono::Duration::from_std(by).unwrap_or(chrono::Duration::zero());
        *lock(&self.clock_offset) -= by;
    }

    pub fn tenant_by_key(&self, key: &str) -> Option<usize> {
        self.tenant_keys.get(&key.to_ascii_lowercase()).copied()
    }

    pub fn mailbox(&self, address: &str) -> Option<&MailboxEntry> {
        self.mailboxes.get(&address.to_ascii_lowercase())
    }

    /// Applies `n` mutations to one mailbox; returns how many took effect.
    pub fn mutate_mailbox(&self, entry: &MailboxEntry, n: usize) -> usize {
        let now = self.now();
        let mut changes = Vec::new();
        {
            let mut st = lock(&entry.state);
            for _ in 0..n {
                changes.extend(st.calendar.mutate(now));
            }
        }
        let done = changes.len();
        notify_changes(self, entry, &changes);
        let mut stats = lock(&self.stats);
        stats.mutations_applied += done as u64;
        if let Some(m) = stats.mailboxes.get_mut(&entry.address) {
            m.mutations += done as u64;
        }
        done
    }

    /// Applies `n` mutations to mailboxes chosen by the seeded stream RNG.
    pub fn mutate_random(&self, n: usize) {
        if self.mailbox_order.is_empty() {
            return;
        }
        for _ in 0..n {
            let idx = lock(&self.mutation_rng).gen_range(0..self.mailbox_order.len());
            if let Some(entry) = self.mailboxes.get(&self.mailbox_order[idx]) {
                self.mutate_mailbox(entry, 1);
            }
        }
    }
}

/// The background mutation stream. Mutations are batched per 10 ms tick so high rates do not
/// need one timer per mutation; fractional remainders carry over so the long-run rate is exact.
pub async fn mutation_loop(shared: Arc<Shared>, mut shutdown: watch::Receiver<bool>) {
    let mut rate_rx = shared.mutation_rate.subscribe();
    let mut carry = 0.0f64;
    loop {
        let rate = *rate_rx.borrow_and_update();
        if rate <= 0.0 {
            carry = 0.0;
            tokio::select! {
                r = rate_rx.changed() => if r.is_err() { return },
                _ = shutdown.changed() => return,
            }
            continue;
        }
        let tick = Duration::from_secs_f64((1.0 / rate).clamp(0.01, 1.0));
        let started = Instant::now();
        tokio::select! {
            _ = tokio::time::sleep(tick) => {}
            r = rate_rx.changed() => { if r.is_err() { return } continue; }
            _ = shutdown.changed() => return,
        }
        carry += rate * started.elapsed().as_secs_f64();
        let n = carry.floor();
        carry -= n;
        shared.mutate_random(n as usize);
    }
}
