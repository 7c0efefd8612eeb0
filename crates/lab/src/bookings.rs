//! The application's side of two-way sync in the lab: appointments booked through calsync's
//! admin API as the application books them, and what became of each (its write's state, the
//! simulator's calendars, the store).

use std::collections::HashMap;

use anyhow::Context;
use chrono::{DateTime, Utc};
use reqwest::StatusCode;
use secrecy::{ExposeSecret, SecretString};
use serde::Serialize;
use serde_json::{json, Value};

use calsync_core::config::Settings;
use calsync_core::store::{MailboxId, MailboxRecord, Store, WriteState};
use calsync_sim::SimHandle;

/// Lets every tenant be written to and turns the admin API on with a fresh token; returns the
/// token, for [`AdminApi`].
pub fn enable_writes(settings: &mut Settings) -> SecretString {
    for tenant in &mut settings.tenants {
        tenant.writes = true;
    }
    let token: SecretString = format!(
        "lab-{}{}",
        uuid::Uuid::new_v4().simple(),
        uuid::Uuid::new_v4().simple()
    )
    .into();
    settings.api.token = Some(token.clone());
    token
}

/// The admin API of a service the lab runs on loopback.
pub struct AdminApi {
    http: reqwest::Client,
    base: String,
    token: SecretString,
}

/// An appointment the admin API accepted.
#[derive(Clone, Debug, Serialize)]
pub struct Booking {
    pub tenant: String,
    pub mailbox: String,
    pub mailbox_id: MailboxId,
    pub external_id: String,
    pub subject: String,
    pub write_id: String,
}

impl AdminApi {
    pub fn new(port: u16, token: SecretString) -> anyhow::Result<Self> {
        let http = reqwest::Client::builder()
            .timeout(std::time::Duration::from_secs(10))
            .build()
            .context("cannot build the admin API client")?;
        Ok(Self {
            http,
            base: format!("http://127.0.0.1:{port}/v1"),
            token,
        })
    }

    /// Books a half-hour appointment with `subject` at `start` in `mailbox`, as the application
    /// does: `POST /v1/mailboxes/{id}/events` with an `Idempotency-Key`.
    pub async fn book(
        &self,
        mailbox: &MailboxRecord,
        external_id: &str,
        subject: &str,
        start: DateTime<Utc>,
    ) -> anyhow::Result<Booking> {
        let at = |t: DateTime<Utc>| json!({"dateTime": t.format("%Y-%m-%dT%H:%M:%S").to_string(), "timeZone": "UTC"});
        let body = json!({
            "external_id": external_id,
            "subject": subject,
            "start": at(start),
            "end": at(start + chrono::Duration::minutes(30)),
            "attendees": [{"emailAddress": {"address": "student@contoso.edu", "name": "A Student"}}],
        });
        let response = self
            .http
            .post(format!("{}/mailboxes/{}/events", self.base, mailbox.id))
            .bearer_auth(self.token.expose_secret())
            .header("Idempotency-Key", uuid::Uuid::new_v4().to_string())
            .json(&body)
            .send()
            .await
            .with_context(|| format!("booking {external_id} in {}", mailbox.user_id))?;
        let status = response.status();
        let answer: Value = response.json().await.unwrap_or_default();
        if status != StatusCode::ACCEPTED {
            anyhow::bail!(
                "booking {external_id} in {}: the admin API answered {status}: {answer}",
                mailbox.user_id
            );
        }
        let write_id = answer["id"]
            .as_str()
            .context("the admin API accepted a booking without a write id")?;
        Ok(Booking {
            tenant: mailbox.tenant.clone(),
            mailbox: mailbox.user_id.clone(),
            mailbox_id: mailbox.id,
            external_id: external_id.to_string(),
            subject: subject.to_string(),
            write_id: write_id.to_string(),
        })
    }
}

/// What became of a booking, from the store and the simulator.
#[derive(Clone, Debug, Serialize)]
pub struct BookingOutcome {
    pub booking: Booking,
    pub state: WriteState,
    pub accepted_at: DateTime<Utc>,
    pub delivered_at: Option<DateTime<Utc>>,
    /// Events in the mailbox's calendar in the simulator with the booking's subject.
    pub in_outlook: usize,
}

impl BookingOutcome {
    /// Seconds from acceptance to delivery.
    pub fn latency_seconds(&self) -> Option<f64> {
        self.delivered_at
            .map(|d| (d - self.accepted_at).num_milliseconds() as f64 / 1000.0)
    }
}

/// The outcome of each booking (the simulator still running).
pub async fn outcomes(
    store: &Store,
    sim: &SimHandle,
    bookings: &[Booking],
) -> anyhow::Result<Vec<BookingOutcome>> {
    let mut subjects: HashMap<&str, HashMap<String, usize>> = HashMap::new();
    let mut out = Vec::with_capacity(bookings.len());
    for booking in bookings {
        let write = store
            .write_by_id(&booking.write_id)
            .await?
            .with_context(|| format!("write {} is not in the store", booking.write_id))?;
        let counts = subjects
            .entry(booking.mailbox.as_str())
            .or_insert_with(|| subject_counts(sim, &booking.mailbox));
        out.push(BookingOutcome {
            booking: booking.clone(),
            state: write.state,
            accepted_at: write.created_at,
            delivered_at: write.delivered_at,
            in_outlook: counts.get(&booking.subject).copied().unwrap_or(0),
        });
    }
    Ok(out)
}

/// How many events of the mailbox's calendar in the simulator carry each subject.
pub fn subject_counts(sim: &SimHandle, mailbox: &str) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for event in sim.truth(mailbox, None) {
        if let Some(subject) = event["subject"].as_str() {
            *counts.entry(subject.to_string()).or_default() += 1;
        }
    }
    counts
}
