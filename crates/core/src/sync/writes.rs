//! Delivering the application's queued writes (create, update, cancel of its appointments) to
//! Graph, in order, at the start of the mailbox's sync job: the same lease, deadline, breaker,
//! rate limits and retry policy as the delta round that follows (which then reads back what
//! Outlook holds).
//!
//! Exactly once: a create carries the `transactionId` chosen when it was queued, so a create
//! whose answer was lost (timeout, reset, a crash of calsync) is sent again and Graph answers
//! with the event it already made. An update first reads the event and compares its content
//! (the properties calsync writes, as a fingerprint) with what calsync last wrote; the PATCH
//! then carries `If-Match` with the etag just read. The content, not the `changeKey`, decides
//! whether someone changed the event: Exchange moves an event's changeKey by itself (shortly
//! after a create, when an attendee answers), which is no one's edit. Write bodies hold
//! personal data: nothing here logs them, only ids and states.

use std::collections::{HashMap, HashSet};

use chrono::Utc;
use serde_json::{Map, Value};

use super::{call_graph, RoundContext, SyncError, SyncReport};
use crate::config::ConflictPolicy;
use crate::graph::{GraphClient, GraphError, GraphRequest, RequestIds};
use crate::store::{MailboxRecord, PendingWrite, WriteOp, WriteResult};

/// What the job needs to know about writing for this mailbox's tenant.
#[derive(Clone, Copy, Debug)]
pub struct WritePolicy {
    /// The tenant allows writes (`tenants[].writes`); a write queued before it stopped allowing
    /// them fails instead of being sent.
    pub allowed: bool,
    pub conflict: ConflictPolicy,
    /// Writes one job delivers at most.
    pub per_job: u32,
}

/// The properties whose change is someone's edit of the event (read with `$select` before an
/// update); the changeKey moves with them and also without them.
const CONTENT_SELECT: &str =
    "changeKey,subject,body,start,end,isAllDay,location,attendees,showAs,sensitivity,categories,importance,isReminderOn,reminderMinutesBeforeStart";
const CONTENT: [&str; 11] = [
    "subject",
    "body",
    "start",
    "end",
    "isAllDay",
    "location",
    "attendees",
    "showAs",
    "sensitivity",
    "categories",
    "importance",
];

/// The parts of an event Graph answers that the link keeps.
#[derive(Debug)]
struct EventVersion {
    id: String,
    change_key: Option<String>,
    etag: Option<String>,
    has_attendees: bool,
    fingerprint: String,
    /// The event as Graph answered it, to see whether it already holds an update.
    json: Value,
}

impl EventVersion {
    fn of(event: &Value) -> Option<Self> {
        let text = |name: &str| event[name].as_str().map(str::to_string);
        Some(Self {
            id: text("id")?,
            change_key: text("changeKey"),
            etag: text("@odata.etag"),
            has_attendees: event["attendees"].as_array().is_some_and(|a| !a.is_empty()),
            fingerprint: fingerprint(event),
            json: event.clone(),
        })
    }

    /// The event already holds every property `update` sets: an earlier attempt of this write
    /// reached Graph and its answer was lost. Conservative: a property whose Graph form cannot
    /// be compared (a start in another zone than UTC, an HTML body) counts as not held.
    fn holds(&self, update: &Value) -> bool {
        let Some(members) = update.as_object() else {
            return false;
        };
        let event = &self.json;
        members.iter().all(|(name, wanted)| match name.as_str() {
            "start" | "end" => {
                wanted["timeZone"] == "UTC"
                    && event[name]["timeZone"] == "UTC"
                    && same_instant(&wanted["dateTime"], &event[name]["dateTime"])
            }
            "body" => {
                wanted["contentType"] == event["body"]["contentType"]
                    && wanted["content"] == event["body"]["content"]
            }
            "location" => wanted["displayName"] == event["location"]["displayName"],
            "attendees" => attendee_keys(wanted) == attendee_keys(&event["attendees"]),
            _ => *wanted == event[name.as_str()],
        })
    }
}

/// Two Graph local date-times, e.g. `2026-12-03T15:00:00` and `2026-12-03T15:00:00.0000000`.
fn same_instant(a: &Value, b: &Value) -> bool {
    let at = |v: &Value| {
        v.as_str()
            .and_then(|t| chrono::NaiveDateTime::parse_from_str(t, "%Y-%m-%dT%H:%M:%S%.f").ok())
    };
    matches!((at(a), at(b)), (Some(a), Some(b)) if a == b)
}

/// Attendees as `address type`, sorted, addresses lower-cased: who is invited and how, not how
/// they answered (an answer is not an edit of the event).
fn attendee_keys(attendees: &Value) -> Vec<String> {
    let mut keys: Vec<String> = attendees
        .as_array()
        .map(|all| {
            all.iter()
                .map(|a| {
                    format!(
                        "{} {}",
                        a["emailAddress"]["address"]
                            .as_str()
                            .unwrap_or_default()
                            .to_ascii_lowercase(),
                        a["type"].as_str().unwrap_or_default()
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    keys.sort();
    keys
}

/// A digest of the event's content as Graph shows it: the same for two answers about an
/// unchanged event, whatever its changeKey. Attendees count by address and type only (their
/// responses are not an edit of the event).
fn fingerprint(event: &Value) -> String {
    let mut parts = Map::new();
    for name in CONTENT {
        let part = match name {
            "body" => event["body"]["content"].clone(),
            "location" => event["location"]["displayName"].clone(),
            "attendees" => Value::from(attendee_keys(&event["attendees"])),
            _ => event[name].clone(),
        };
        parts.insert(name.to_string(), part);
    }
    let digest = ring::digest::digest(
        &ring::digest::SHA256,
        Value::Object(parts).to_string().as_bytes(),
    );
    crate::hex(&digest.as_ref()[..16])
}

/// What the job knows of an appointment's Graph event, updated as its writes are delivered
/// (the queued writes were read with the link as it was before the first of them).
#[derive(Clone, Debug, Default)]
struct Known {
    graph_event_id: Option<String>,
    change_key: Option<String>,
    fingerprint: Option<String>,
}

impl Known {
    /// The event's content differs from what calsync last wrote or saw (by changeKey where no
    /// fingerprint was kept).
    fn changed_in(&self, current: &EventVersion) -> bool {
        match (&self.fingerprint, &self.change_key) {
            (Some(fingerprint), _) => *fingerprint != current.fingerprint,
            (None, Some(change_key)) => current.change_key.as_ref() != Some(change_key),
            (None, None) => false,
        }
    }
}

/// Delivers the mailbox's queued writes in order. A write Graph refuses for good is recorded
/// as failed and the next one goes on; a failure of Graph or of the tenant records the attempt
/// and stops the delivery with that error, so the writes wait, queued, for the mailbox's next
/// job (see [`SyncError::stops_the_job`] for whether its delta round still runs).
pub async fn deliver(
    ctx: &RoundContext<'_>,
    mailbox: &MailboxRecord,
    policy: &WritePolicy,
    report: &mut SyncReport,
) -> Result<(), SyncError> {
    // The claim said whether any are queued: an idle job does not look them up.
    if !mailbox.writes_queued {
        return Ok(());
    }
    let pending = ctx.store.pending_writes(mailbox.id, policy.per_job).await?;
    if pending.is_empty() {
        return Ok(());
    }
    let mut known: HashMap<String, Known> = HashMap::new();
    // Appointments whose write is to be tried again: their later writes wait behind it.
    let mut waiting: HashSet<String> = HashSet::new();
    for write in &pending {
        if waiting.contains(&write.external_id) {
            continue;
        }
        let link = known
            .entry(write.external_id.clone())
            .or_insert_with(|| Known {
                graph_event_id: write.graph_event_id.clone(),
                change_key: write.change_key.clone(),
                fingerprint: write.fingerprint.clone(),
            })
            .clone();
        let outcome = if policy.allowed {
            deliver_one(ctx, mailbox, policy.conflict, write, &link).await
        } else {
            Ok(WriteResult::Failed {
                reason: "the tenant no longer allows writes (tenants[].writes)".into(),
            })
        };
        let result = match outcome {
            Ok(result) => result,
            Err(stop) => {
                let result = WriteResult::Retry {
                    reason: crate::error_chain(&stop),
                };
                ctx.store
                    .record_write(ctx.lease, &write.id, &result, Utc::now())
                    .await?;
                crate::metrics::write_attempt_failed(ctx.tokens.tenant(), stop.reason_label());
                return Err(stop);
            }
        };
        ctx.store
            .record_write(ctx.lease, &write.id, &result, Utc::now())
            .await?;
        let state = match &result {
            WriteResult::Delivered {
                graph_event_id,
                change_key,
                fingerprint,
                ..
            } => {
                if write.op == WriteOp::Cancel {
                    known.remove(&write.external_id);
                } else {
                    known.insert(
                        write.external_id.clone(),
                        Known {
                            graph_event_id: graph_event_id.clone(),
                            change_key: change_key.clone(),
                            fingerprint: fingerprint.clone(),
                        },
                    );
                }
                report.writes_delivered += 1;
                "delivered"
            }
            WriteResult::Conflict {
                change_key,
                fingerprint,
                ..
            } => {
                if let Some(entry) = known.get_mut(&write.external_id) {
                    entry.change_key.clone_from(change_key);
                    entry.fingerprint.clone_from(fingerprint);
                }
                report.writes_conflicted += 1;
                "conflict"
            }
            WriteResult::Failed { .. } => {
                report.writes_failed += 1;
                "failed"
            }
            WriteResult::Retry { .. } => {
                waiting.insert(write.external_id.clone());
                "retry"
            }
        };
        tracing::info!(
            write = %write.id,
            op = write.op.as_str(),
            state,
            attempts = write.attempts + 1,
            "write to Outlook recorded"
        );
        if state != "retry" {
            crate::metrics::write_finished(ctx.tokens.tenant(), write.op.as_str(), state);
        }
    }
    if pending.len() >= policy.per_job as usize {
        // More are queued: the next job of this mailbox is due as soon as this one ends.
        ctx.store.request_sync(mailbox.id, Utc::now()).await?;
    }
    Ok(())
}

/// One write: `Ok` with what to record, or `Err` when the job must stop (the write stays
/// queued).
async fn deliver_one(
    ctx: &RoundContext<'_>,
    mailbox: &MailboxRecord,
    conflict: ConflictPolicy,
    write: &PendingWrite,
    known: &Known,
) -> Result<WriteResult, SyncError> {
    let body: Value = match serde_json::from_str(&write.body) {
        Ok(Value::Object(members)) => Value::Object(members),
        // Checked by the API before it was stored: only a damaged row gets here.
        _ => {
            return Ok(WriteResult::Failed {
                reason: "the stored write is not a JSON object".into(),
            })
        }
    };
    match write.op {
        WriteOp::Create => create(ctx, mailbox, write, body).await,
        WriteOp::Update => {
            let Some(event_id) = known.graph_event_id.as_deref() else {
                return Ok(WriteResult::Failed {
                    reason:
                        "the appointment's create was not delivered, so there is no event to update"
                            .into(),
                });
            };
            update(ctx, mailbox, conflict, event_id, known, body).await
        }
        WriteOp::Cancel => {
            let Some(event_id) = known.graph_event_id.as_deref() else {
                return Ok(delivered_note(
                    None,
                    "nothing to cancel: the appointment's create was never delivered",
                ));
            };
            cancel(ctx, mailbox, event_id, body).await
        }
    }
}

async fn create(
    ctx: &RoundContext<'_>,
    mailbox: &MailboxRecord,
    write: &PendingWrite,
    mut body: Value,
) -> Result<WriteResult, SyncError> {
    if let Value::Object(members) = &mut body {
        members.insert(
            "transactionId".into(),
            Value::String(write.transaction_id.clone()),
        );
    }
    let url = ctx.graph.url(&["users", &mailbox.user_id, "events"]);
    let answer = exchange(ctx, |graph| {
        graph
            .post(url.clone(), &[200, 201])
            .json(body.clone(), None)
    })
    .await;
    match answer {
        Ok((bytes, ids)) => version_of(&bytes, ids).map(|event| delivered(&event, None)),
        // An earlier attempt made the event and its answer was lost; Graph refuses the
        // transactionId now instead of answering with the event (as it may for a retry).
        Err(SyncError::Graph(GraphError::DuplicateTransaction {
            existing_event_id: Some(id),
            ..
        })) => match read_event(ctx, mailbox, &id, CONTENT_SELECT).await {
            Ok(Some(event)) => Ok(delivered(
                &event,
                Some("Graph had already made this event for the write's transactionId (an earlier attempt's answer was lost)"),
            )),
            Ok(None) => Ok(WriteResult::Failed {
                reason: "Graph had already made this event for the write's transactionId, and it is gone from Outlook now".into(),
            }),
            Err(e) => refused_or_stop(e),
        },
        Err(SyncError::Graph(GraphError::DuplicateTransaction {
            existing_event_id: None,
            ..
        })) => Ok(WriteResult::Failed {
            reason: "Graph says the write's transactionId already made an event but does not say which: it is in Outlook and will be synced, but calsync cannot link it to the appointment".into(),
        }),
        Err(e) => refused_or_stop(e),
    }
}

async fn update(
    ctx: &RoundContext<'_>,
    mailbox: &MailboxRecord,
    conflict: ConflictPolicy,
    event_id: &str,
    known: &Known,
    body: Value,
) -> Result<WriteResult, SyncError> {
    let mut overwrote = false;
    // A 412 means the event moved between the read and the PATCH (its content, or only its
    // changeKey): read it again and decide again, a few times at most.
    for _ in 0..3 {
        let current = match read_event(ctx, mailbox, event_id, CONTENT_SELECT).await {
            Ok(Some(current)) => current,
            Ok(None) => return Ok(gone_from_outlook()),
            Err(e) => return refused_or_stop(e),
        };
        if known.changed_in(&current) {
            if current.holds(&body) {
                // Our own update, applied by an attempt whose answer was lost (a timeout, a
                // reset, a job cut off): not someone's change.
                return Ok(delivered(
                    &current,
                    Some(
                        "the event already held this update (an earlier attempt's answer was lost)",
                    ),
                ));
            }
            match conflict {
                ConflictPolicy::OutlookWins => return Ok(conflict_with(&current)),
                ConflictPolicy::ApplicationWins => overwrote = true,
            }
        }
        let url = ctx
            .graph
            .url(&["users", &mailbox.user_id, "events", event_id]);
        let answer = exchange(ctx, |graph| {
            let request = graph.patch(url.clone(), &[200]).json(body.clone(), None);
            match &current.etag {
                Some(etag) => request.if_match(etag),
                None => request,
            }
        })
        .await;
        match answer {
            Ok((bytes, ids)) => {
                let note = overwrote.then_some(
                    "the event had been changed in Outlook; the application's version was written over it (writes.conflict_policy = application_wins)",
                );
                return version_of(&bytes, ids).map(|event| delivered(&event, note));
            }
            Err(SyncError::Graph(GraphError::Permanent { status: 412, .. })) => continue,
            Err(SyncError::Graph(GraphError::NotFound { .. })) => return Ok(gone_from_outlook()),
            Err(e) => return refused_or_stop(e),
        }
    }
    Ok(WriteResult::Retry {
        reason:
            "the event kept changing in Outlook while it was being updated (HTTP 412 three times)"
                .into(),
    })
}

fn gone_from_outlook() -> WriteResult {
    WriteResult::Failed {
        reason: "the event no longer exists in Outlook (deleted there)".into(),
    }
}

async fn cancel(
    ctx: &RoundContext<'_>,
    mailbox: &MailboxRecord,
    event_id: &str,
    body: Value,
) -> Result<WriteResult, SyncError> {
    let current = match read_event(ctx, mailbox, event_id, "changeKey,attendees").await {
        Ok(Some(current)) => current,
        Ok(None) => {
            return Ok(delivered_note(
                None,
                "the event was already gone from Outlook",
            ))
        }
        Err(e) => return refused_or_stop(e),
    };
    let comment = body
        .get("comment")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    let answer = if current.has_attendees {
        // The organizer's cancel tells the attendees, with the comment.
        let url = ctx
            .graph
            .url(&["users", &mailbox.user_id, "events", event_id, "cancel"]);
        let payload = serde_json::json!({ "comment": comment });
        exchange(ctx, |graph| {
            graph
                .post(url.clone(), &[200, 202, 204])
                .json(payload.clone(), None)
        })
        .await
    } else {
        let url = ctx
            .graph
            .url(&["users", &mailbox.user_id, "events", event_id]);
        exchange(ctx, |graph| graph.delete(url.clone(), &[200, 204])).await
    };
    match answer {
        Ok(_) => Ok(delivered_note(Some(event_id), "")),
        // Gone already (a retry after a lost answer, or deleted in Outlook): cancelled is done.
        Err(SyncError::Graph(GraphError::NotFound { .. })) => Ok(delivered_note(
            Some(event_id),
            "the event was already gone from Outlook",
        )),
        Err(e) => refused_or_stop(e),
    }
}

/// One Graph request of a write through [`call_graph`] (rate limits, breaker, a fresh token
/// after a 401, retries), built afresh by `request` for each attempt: the answer's body and
/// request ids.
async fn exchange(
    ctx: &RoundContext<'_>,
    request: impl Fn(&GraphClient) -> GraphRequest<'static>,
) -> Result<(Vec<u8>, RequestIds), SyncError> {
    let graph = ctx.graph;
    call_graph(ctx, |token| {
        let request = request(graph);
        async move {
            let answer = graph.send(request, &token).await?;
            Ok((answer.body, answer.ids))
        }
    })
    .await
}

/// `GET /users/{id}/events/{id}?$select=...`: `None` when the event is gone.
async fn read_event(
    ctx: &RoundContext<'_>,
    mailbox: &MailboxRecord,
    event_id: &str,
    select: &str,
) -> Result<Option<EventVersion>, SyncError> {
    let url = ctx
        .graph
        .url(&["users", &mailbox.user_id, "events", event_id])
        .with_query(&[("$select", select)]);
    match exchange(ctx, |graph| graph.get(url.clone())).await {
        Ok((bytes, ids)) => Ok(Some(version_of(&bytes, ids)?)),
        Err(SyncError::Graph(GraphError::NotFound { .. })) => Ok(None),
        Err(e) => Err(e),
    }
}

fn version_of(bytes: &[u8], ids: RequestIds) -> Result<EventVersion, SyncError> {
    serde_json::from_slice::<Value>(bytes)
        .ok()
        .as_ref()
        .and_then(EventVersion::of)
        .ok_or_else(|| {
            SyncError::Graph(GraphError::Malformed {
                reason: "an event answer that is not a JSON event with an `id`".into(),
                ids,
            })
        })
}

fn delivered(event: &EventVersion, note: Option<&str>) -> WriteResult {
    WriteResult::Delivered {
        graph_event_id: Some(event.id.clone()),
        change_key: event.change_key.clone(),
        etag: event.etag.clone(),
        fingerprint: Some(event.fingerprint.clone()),
        note: note.map(str::to_string),
    }
}

fn delivered_note(event_id: Option<&str>, note: &str) -> WriteResult {
    WriteResult::Delivered {
        graph_event_id: event_id.map(str::to_string),
        change_key: None,
        etag: None,
        fingerprint: None,
        note: (!note.is_empty()).then(|| note.to_string()),
    }
}

fn conflict_with(current: &EventVersion) -> WriteResult {
    WriteResult::Conflict {
        reason: "the event was changed in Outlook since calsync last wrote it; Outlook's version was kept (writes.conflict_policy = outlook_wins)".into(),
        change_key: current.change_key.clone(),
        etag: current.etag.clone(),
        fingerprint: Some(current.fingerprint.clone()),
    }
}

/// Graph refusing this write for good (a 4xx other than throttling and 401; a 404 for the
/// mailbox) fails the write; anything else stops the job with the write still queued.
fn refused_or_stop(error: SyncError) -> Result<WriteResult, SyncError> {
    match error {
        SyncError::Graph(GraphError::NotFound { code, .. }) => Ok(WriteResult::Failed {
            reason: format!("Graph has no such mailbox or event (HTTP 404 {code})"),
        }),
        SyncError::Graph(GraphError::Permanent {
            status,
            code,
            message,
            ..
        }) => Ok(WriteResult::Failed {
            reason: format!("Graph refused the write: HTTP {status} {code}: {message}"),
        }),
        other => Err(other),
    }
}
