//! What the simulator received: request counts, concurrency peaks and rule violations, so a
//! drill can assert that the client behaved, not only that it converged.

use std::collections::BTreeMap;

use serde::Serialize;
use serde_json::Value;

const MAX_EXAMPLES: usize = 5;

#[derive(Debug, Clone, Default, Serialize)]
pub struct Violation {
    pub count: u64,
    pub examples: Vec<Value>,
}

impl Violation {
    fn record(&mut self, example: Value) {
        self.count += 1;
        if self.examples.len() < MAX_EXAMPLES {
            self.examples.push(example);
        }
    }
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Violations {
    /// A request for a mailbox (or tenant token endpoint) before its Retry-After had passed.
    pub early_retry: Violation,
    /// More requests in flight for one mailbox than the MailboxConcurrency limit.
    pub over_concurrency: Violation,
    /// A bearer token from one tenant sent for another tenant's mailbox.
    pub wrong_tenant: Violation,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ViolationKind {
    EarlyRetry,
    OverConcurrency,
    WrongTenant,
}

/// Event writes a client made (the owner's Outlook edits are not counted).
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq, Eq)]
pub struct WriteStats {
    /// POSTs that created an event.
    pub creates: u64,
    /// POSTs answered with the event an earlier POST with the same `transactionId` made.
    pub deduplicated: u64,
    /// PATCHes applied.
    pub updates: u64,
    pub deletes: u64,
    pub cancels: u64,
    /// PATCHes refused with 412 because `If-Match` named an old changeKey.
    pub precondition_failed: u64,
    /// POSTs refused with `ErrorDuplicateTransactionId` (their transactionId had made an event).
    pub duplicate_transaction: u64,
    /// Events created by a POST with the same subject, start and end as an event another POST
    /// created in that mailbox: what retrying without a `transactionId` leaves behind.
    pub duplicates: u64,
}

/// One write to count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteCount {
    Create { duplicate: bool },
    Deduplicated,
    Update,
    Delete,
    Cancel,
    PreconditionFailed,
    DuplicateTransaction,
}

impl WriteStats {
    fn add(&mut self, what: WriteCount) {
        match what {
            WriteCount::Create { duplicate } => {
                self.creates += 1;
                self.duplicates += u64::from(duplicate);
            }
            WriteCount::Deduplicated => self.deduplicated += 1,
            WriteCount::Update => self.updates += 1,
            WriteCount::Delete => self.deletes += 1,
            WriteCount::Cancel => self.cancels += 1,
            WriteCount::PreconditionFailed => self.precondition_failed += 1,
            WriteCount::DuplicateTransaction => self.duplicate_transaction += 1,
        }
    }
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct TenantStats {
    pub tenant_id: String,
    pub token_requests: u64,
    /// Token endpoint responses by HTTP status.
    pub token_by_status: BTreeMap<u16, u64>,
    pub graph_requests: u64,
    pub graph_by_status: BTreeMap<u16, u64>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct MailboxStats {
    pub tenant: String,
    pub requests: u64,
    /// Endpoint (`delta`, `event`, `create`, `update`, `delete`, `cancel`) -> HTTP status ->
    /// count.
    pub by_endpoint: BTreeMap<String, BTreeMap<u16, u64>>,
    pub in_flight: usize,
    pub max_in_flight: usize,
    pub throttled: u64,
    pub mutations: u64,
    /// Events in the mailbox now (all of its calendar, not one window).
    pub events: usize,
    pub writes: WriteStats,
    /// When the most recent requests arrived (at most [`ARRIVALS_KEPT`]), for tests that check
    /// the spacing of retries exactly instead of sampling counters.
    #[serde(skip)]
    pub arrivals: Vec<tokio::time::Instant>,
}

/// Request arrival times kept per mailbox.
pub const ARRIVALS_KEPT: usize = 64;

impl MailboxStats {
    pub fn arrived(&mut self, at: tokio::time::Instant) {
        if self.arrivals.len() == ARRIVALS_KEPT {
            self.arrivals.remove(0);
        }
        self.arrivals.push(at);
    }
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct SimStats {
    pub requests: u64,
    pub token_requests: u64,
    pub graph_requests: u64,
    /// Requests that matched no tenant or mailbox (unknown tenant, unknown user, bad path).
    pub unmatched_requests: u64,
    pub mutations_applied: u64,
    pub tenants: BTreeMap<String, TenantStats>,
    pub mailboxes: BTreeMap<String, MailboxStats>,
    /// Fault rule id -> times it fired.
    pub faults_fired: BTreeMap<u64, u64>,
    pub violations: Violations,
    /// The app-wide rate: its limit, the most requests seen in one second, the 429s it gave.
    pub app: super::app_limit::AppRequestStats,
    /// Event writes of every mailbox (each mailbox has its own under `mailboxes`).
    pub writes: WriteStats,
}

impl SimStats {
    pub fn violation(&mut self, kind: ViolationKind, example: Value) {
        let v = match kind {
            ViolationKind::EarlyRetry => &mut self.violations.early_retry,
            ViolationKind::OverConcurrency => &mut self.violations.over_concurrency,
            ViolationKind::WrongTenant => &mut self.violations.wrong_tenant,
        };
        v.record(example);
    }

    pub fn write(&mut self, mailbox: &str, what: WriteCount) {
        self.writes.add(what);
        if let Some(m) = self.mailboxes.get_mut(mailbox) {
            m.writes.add(what);
        }
    }

    pub fn token_response(&mut self, tenant: Option<&str>, status: u16) {
        self.requests += 1;
        self.token_requests += 1;
        match tenant.and_then(|t| self.tenants.get_mut(t)) {
            Some(t) => {
                t.token_requests += 1;
                *t.token_by_status.entry(status).or_default() += 1;
            }
            None => self.unmatched_requests += 1,
        }
    }

    pub fn graph_response(
        &mut self,
        tenant: Option<&str>,
        mailbox: Option<&str>,
        endpoint: &str,
        status: u16,
    ) {
        self.requests += 1;
        self.graph_requests += 1;
        if let Some(t) = tenant.and_then(|t| self.tenants.get_mut(t)) {
            t.graph_requests += 1;
            *t.graph_by_status.entry(status).or_default() += 1;
        }
        match mailbox.and_then(|m| self.mailboxes.get_mut(m)) {
            Some(m) => {
                m.requests += 1;
                *m.by_endpoint
                    .entry(endpoint.to_string())
                    .or_default()
                    .entry(status)
                    .or_default() += 1;
                if status == 429 {
                    m.throttled += 1;
                }
            }
            None => self.unmatched_requests += 1,
        }
    }
}
