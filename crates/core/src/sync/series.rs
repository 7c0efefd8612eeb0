//! Recurring series in a delta page. Graph's calendarView delta sends an occurrence as a stub
//! (id, seriesMasterId, start, end) and the series master as an event of its own, dated at its
//! first occurrence. Each stub is stored complete, filled in from its master; the masters are
//! kept apart (they are not calendar entries).
//!
//! A master is fetched (`GET /users/{id}/events/{id}`) only in a round where stubs of its
//! series appear without it, and at most once per round: the round's memory and the store's
//! `checked_round` both say it was already seen. Re-appearing stubs are the only sign a master
//! changed when Graph does not list it, so a master cached from an earlier round is never
//! trusted without fetching; its `changeKey` is compared after the fetch.

use foldhash::{HashMap, HashMapExt, HashSet};

use crate::graph::model::{self, RejectedItem, MASTER_SELECT};
use crate::graph::{DeltaItem, Event, GraphError, PageItem};
use crate::store::{Cursor, MailboxRecord, MasterWrite, StoredMaster};

use super::{call_graph, RoundContext, SyncError, SyncReport};

/// The masters a job has met in the round it works on.
#[derive(Default)]
pub(super) struct RoundMasters {
    round: String,
    known: HashMap<String, Event>,
    gone: HashSet<String>,
}

impl RoundMasters {
    /// Forgets what an earlier round met once the round changes.
    fn enter(&mut self, round: &str) {
        if self.round != round {
            self.round = round.to_string();
            self.known.clear();
            self.gone.clear();
        }
    }
}

/// A page ready for the store: complete events and removals in page order, and the masters and
/// gone series it writes.
pub(super) struct ResolvedPage {
    pub items: Vec<DeltaItem>,
    pub masters: Vec<MasterWrite>,
    pub gone_series: Vec<String>,
    pub round: String,
    /// Items of the page that could not be understood (an occurrence whose times its master
    /// cannot make sense of included): quarantined.
    pub rejected: Vec<RejectedItem>,
}

/// Fills in the page's occurrence stubs from their masters, fetching those the round has not
/// met yet. A failed fetch fails the page: nothing of it is written and the round resumes from
/// the same link later.
pub(super) async fn resolve_page(
    ctx: &RoundContext<'_>,
    mailbox: &MailboxRecord,
    cursor: &Cursor,
    items: Vec<PageItem>,
    mut rejected: Vec<RejectedItem>,
    memo: &mut RoundMasters,
    report: &mut SyncReport,
) -> Result<ResolvedPage, SyncError> {
    let round = cursor.round_marker();
    memo.enter(&round);

    let mut in_page: HashMap<&str, &Event> = HashMap::new();
    let mut wanted: Vec<&str> = Vec::new();
    for item in &items {
        match item {
            PageItem::Master(master) => {
                in_page.insert(&master.id, master);
            }
            PageItem::Occurrence(stub) => wanted.push(&stub.series_master_id),
            PageItem::Event(_) | PageItem::Removed { .. } => {}
        }
    }
    let mut to_fetch: Vec<&str> = wanted
        .into_iter()
        .filter(|id| !in_page.contains_key(id) && !memo.known.contains_key(*id))
        .filter(|id| !memo.gone.contains(*id))
        .collect();
    to_fetch.sort_unstable();
    to_fetch.dedup();

    let mut lookup: Vec<&str> = in_page
        .keys()
        .copied()
        .chain(to_fetch.iter().copied())
        .collect();
    lookup.sort_unstable();
    lookup.dedup();
    let stored = ctx.store.series_masters(mailbox.id, &lookup).await?;

    let mut masters: Vec<MasterWrite> = Vec::new();
    let mut gone_series: Vec<String> = Vec::new();
    for id in to_fetch {
        let stored_master = stored.get(id);
        if let Some(master) = stored_master
            .filter(|m| m.checked_round == round)
            .and_then(reparse)
        {
            // Fetched or seen earlier in this round by a job that stopped before its end.
            memo.known.insert(id.to_string(), master);
            continue;
        }
        match fetch_master(ctx, mailbox, id, report).await {
            Ok(master) => {
                masters.push(MasterWrite {
                    refill_occurrences: changed(stored_master, &master),
                    master: master.clone(),
                });
                memo.known.insert(id.to_string(), master);
            }
            Err(SyncError::Graph(GraphError::NotFound { .. })) => {
                tracing::info!(
                    mailbox = %mailbox.user_id,
                    series = id,
                    "series master is gone (404); removing the series"
                );
                memo.gone.insert(id.to_string());
                gone_series.push(id.to_string());
            }
            Err(e) => return Err(e),
        }
    }
    for (id, master) in in_page {
        let master = (*master).clone();
        masters.push(MasterWrite {
            refill_occurrences: changed(stored.get(id), &master),
            master: master.clone(),
        });
        memo.gone.remove(id);
        memo.known.insert(id.to_string(), master);
    }

    let mut out = Vec::with_capacity(items.len());
    for item in items {
        match item {
            PageItem::Event(event) => out.push(DeltaItem::Upsert(event)),
            PageItem::Removed { id } => out.push(DeltaItem::Removed { id }),
            PageItem::Master(_) => {}
            PageItem::Occurrence(stub) => {
                if memo.gone.contains(&stub.series_master_id) {
                    continue;
                }
                let hydrated = match memo.known.get(&stub.series_master_id) {
                    Some(master) => stub.hydrate(master).map_err(|e| e.0),
                    None => Err(format!(
                        "occurrence {}: no series master {} to fill it in from",
                        stub.id, stub.series_master_id
                    )),
                };
                match hydrated {
                    Ok(event) => out.push(DeltaItem::Upsert(Box::new(event))),
                    Err(reason) => rejected.push(RejectedItem {
                        id: Some(stub.id.clone()),
                        raw: stub.raw.clone(),
                        reason,
                    }),
                }
            }
        }
    }
    Ok(ResolvedPage {
        items: out,
        masters,
        gone_series,
        round,
        rejected,
    })
}

fn changed(stored: Option<&StoredMaster>, master: &Event) -> bool {
    stored.is_none_or(|s| s.change_key != master.change_key || s.change_key.is_none())
}

fn reparse(stored: &StoredMaster) -> Option<Event> {
    model::parse_event_text(&stored.raw).ok()
}

async fn fetch_master(
    ctx: &RoundContext<'_>,
    mailbox: &MailboxRecord,
    id: &str,
    report: &mut SyncReport,
) -> Result<Event, SyncError> {
    report.master_requests += 1;
    let graph = ctx.graph;
    let user = mailbox.user_id.as_str();
    let (master, ids) = call_graph(ctx, |token| async move {
        graph.fetch_event(user, id, MASTER_SELECT, &token).await
    })
    .await?;
    report.last_request_id = ids.request_id;
    Ok(master)
}
