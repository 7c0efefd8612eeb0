//! Two-way sync over real sockets against the simulator: the application's appointments are
//! checked, stored, delivered to Outlook exactly once (a lost answer, a reset, a kill -9 of
//! calsync between delivery and recording), in order, with conflicts recorded under each
//! policy, and read back.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use calsync::config::ConflictPolicy;
use calsync::sim::{Endpoint, FaultKind, FaultRule, SimConfig};
use reqwest::{Method, StatusCode};
use secrecy::SecretString;
use serde_json::{json, Value};
use tokio::process::Command;

use crate::helpers::api::{Api, Reply, TOKEN};
use crate::helpers::sim::{fast, sim_settings, start_sim, wait_for, world, SimApp};
use crate::helpers::{start_app, Jobs};

/// A simulator world of two tenants; the first allows writes, the second does not.
async fn writing_app(conflict: ConflictPolicy) -> (Api, SimApp) {
    let config = world(2, 2, 3);
    let sim = start_sim(config.clone()).await;
    let (settings, dir) = sim_settings(&sim, &config, |s| {
        fast(s);
        s.api.token = Some(SecretString::from(TOKEN));
        s.tenants[0].writes = true;
        s.writes.conflict_policy = conflict;
    });
    let running = start_app(settings.clone(), Jobs::ByTest).await;
    let app = SimApp {
        sim,
        settings,
        running,
        dir,
    };
    let api = Api::new(crate::helpers::start_app_sharing(&app.running));
    (api, app)
}

fn booking(external_id: &str, subject: &str) -> Value {
    json!({
        "external_id": external_id,
        "subject": subject,
        "start": {"dateTime": "2026-12-03T14:00:00", "timeZone": "UTC"},
        "end": {"dateTime": "2026-12-03T14:30:00", "timeZone": "UTC"},
        "attendees": [{"emailAddress": {"address": "student@contoso.edu", "name": "A Student"}}],
    })
}

async fn write(api: &Api, method: Method, path: &str, key: &str, body: Option<Value>) -> Reply {
    api.send_with(method, path, &[("Idempotency-Key", key)], body)
        .await
}

async fn mailbox_id(app: &SimApp, mailbox: &str) -> i64 {
    app.record(mailbox).await.id
}

/// The simulator's events of `mailbox` with this subject.
fn in_outlook(app: &SimApp, mailbox: &str, subject: &str) -> Vec<Value> {
    app.sim
        .truth(mailbox, None)
        .into_iter()
        .filter(|e| e["subject"] == subject)
        .collect()
}
