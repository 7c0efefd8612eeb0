//! PgStore: delta rounds (pages with their cursor, series masters, quarantine, events).

use std::borrow::Cow;
use std::collections::HashMap;

use chrono::{DateTime, Utc};
use sqlx::postgres::PgRow;
use sqlx::Row;

use crate::graph::model::RejectedItem;
use crate::graph::{Attendees, DeltaItem, Event, PageLink, Window};
use crate::store::contract::*;
use crate::store::{
    last_of_each_key, link_parts, Cursor, Lease, MailboxId, MasterWrite, PageApplied, PageWrite,
    QuarantinedItem, StoreError, StoredMaster,
};
// The backend itself and its helpers (timestamps, text cleaning).
use super::*;

impl RoundStore for PgStore {
    async fn start_full_round(&self, lease: &Lease, window: &Window) -> Result<i64, StoreError> {
        let row = sqlx::query(
            "UPDATE mailboxes SET round_id = round_id + 1, round_full = true, next_link = NULL,
                 delta_link = NULL, window_start = $1, window_end = $2
             WHERE id = $3 AND lease_owner = $4 RETURNING round_id",
        )
        .bind(window.start)
        .bind(window.end)
        .bind(lease.mailbox)
        .bind(&lease.owner)
        .fetch_optional(&self.pool)
        .await?
        .ok_or(StoreError::LeaseLost(lease.mailbox))?;
        Ok(row.try_get("round_id")?)
    }

    async fn apply_page(
        &self,
        lease: &Lease,
        cursor: &Cursor,
        page: PageWrite<'_>,
        link: &PageLink,
        now: DateTime<Utc>,
    ) -> Result<PageApplied, StoreError> {
        write_page(&self.pool, lease, cursor, &page, link, now).await
    }

    async fn note_page_failure(
        &self,
        lease: &Lease,
        signature: &str,
        limit: u32,
    ) -> Result<(u32, bool), StoreError> {
        let mut tx = self.pool.begin().await?;
        let row = sqlx::query(
            "UPDATE mailboxes SET failing_link_count = CASE WHEN failing_link = $1
                     THEN failing_link_count + 1 ELSE 1 END,
                 failing_link = $1
             WHERE id = $2 AND lease_owner = $3 RETURNING failing_link_count",
        )
        .bind(signature)
        .bind(lease.mailbox)
        .bind(&lease.owner)
        .fetch_optional(&mut *tx)
        .await?
        .ok_or(StoreError::LeaseLost(lease.mailbox))?;
        let count: i32 = row.try_get("failing_link_count")?;
        let count = u32::try_from(count).unwrap_or(0);
        let reset = count >= limit;
        if reset {
            sqlx::query(
                "UPDATE mailboxes SET window_start = NULL, window_end = NULL, next_link = NULL,
                     delta_link = NULL, round_full = true, failing_link = NULL,
                     failing_link_count = 0, fresh_rounds_forced = fresh_rounds_forced + 1
                 WHERE id = $1",
            )
            .bind(lease.mailbox)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok((count, reset))
    }

    async fn series_masters(
        &self,
        mailbox: MailboxId,
        ids: &[&str],
    ) -> Result<HashMap<String, StoredMaster>, StoreError> {
        let ids: Vec<Cow<'_, str>> = ids.iter().map(|id| text(id)).collect();
        let rows = sqlx::query(
            "SELECT master_id, change_key, checked_round, raw FROM series_masters
             WHERE mailbox_id = $1 AND master_id = ANY($2)",
        )
        .bind(mailbox)
        .bind(&ids)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                let master = StoredMaster {
                    master_id: row.try_get("master_id")?,
                    change_key: row.try_get("change_key")?,
                    checked_round: row.try_get("checked_round")?,
                    raw: row.try_get("raw")?,
                };
                Ok((master.master_id.clone(), master))
            })
            .collect()
    }

    async fn events(&self, mailbox: MailboxId) -> Result<Vec<Event>, StoreError> {
        let rows = sqlx::query(concat!(
            "SELECT ",
            crate::store::event_columns!(),
            " FROM events WHERE mailbox_id = $1 ORDER BY start_utc, event_id"
        ))
        .bind(mailbox)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(event_from_row).collect()
    }

    async fn events_between(
        &self,
        mailbox: MailboxId,
        start: DateTime<Utc>,
        end: DateTime<Utc>,
    ) -> Result<Vec<Event>, StoreError> {
        let rows = sqlx::query(concat!(
            "SELECT ",
            crate::store::event_columns!(),
            " FROM events WHERE mailbox_id = $1 AND start_utc < $3
                 AND (end_utc > $2 OR start_utc >= $2)
             ORDER BY start_utc, event_id"
        ))
        .bind(mailbox)
        .bind(start)
        .bind(end)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(event_from_row).collect()
    }

    async fn event_by_id(
        &self,
        mailbox: MailboxId,
        event_id: &str,
    ) -> Result<Option<Event>, StoreError> {
        let row = sqlx::query(concat!(
            "SELECT ",
            crate::store::event_columns!(),
            " FROM events WHERE mailbox_id = $1 AND event_id = $2"
        ))
        .bind(mailbox)
        .bind(event_id)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(event_from_row).transpose()
    }

    async fn event_counts(&self) -> Result<HashMap<MailboxId, u64>, StoreError> {
        rows_per_mailbox(
            &self.pool,
            "SELECT mailbox_id, COUNT(*) AS n FROM events GROUP BY mailbox_id",
        )
        .await
    }

    async fn quarantined(
        &self,
        mailbox: MailboxId,
        limit: u32,
    ) -> Result<Vec<QuarantinedItem>, StoreError> {
        let rows = sqlx::query(
            "SELECT item_key, item_id, reason, first_seen, last_seen, times_seen, raw
             FROM quarantine WHERE mailbox_id = $1 ORDER BY last_seen DESC, item_key
             LIMIT $2",
        )
        .bind(mailbox)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                Ok(QuarantinedItem {
                    item_key: row.try_get("item_key")?,
                    item_id: row.try_get("item_id")?,
                    reason: row.try_get("reason")?,
                    first_seen: row.try_get("first_seen")?,
                    last_seen: row.try_get("last_seen")?,
                    times_seen: row.try_get::<i64, _>("times_seen")?.max(0) as u64,
                    raw: row.try_get("raw")?,
                })
            })
            .collect()
    }
}

/// A page's items reduced to one operation per event id, with the counts applying them one
/// by one in page order would give: one statement cannot touch a row twice, and all its parts
/// see the rows as they were before it.
#[derive(Default)]
struct NetPage<'a> {
    /// The last version of each event whose last item is an upsert (or a removal that left it,
    /// being outside the window).
    upserts: Vec<&'a Event>,
    /// Events upserted by this page, then removed inside the window: gone, whatever was stored.
    dropped: Vec<Cow<'a, str>>,
    /// Ids whose first item is a removal, which meets the stored event: deleted (and counted)
    /// if it is inside the window. An id also in `upserts` is replaced instead, but counted.
    removed_stored: Vec<Cow<'a, str>>,
    /// Every removed id (a removed series master is forgotten).
    removed: Vec<Cow<'a, str>>,
    /// Every item's id (an item understood now leaves quarantine).
    ids: Vec<Cow<'a, str>>,
    /// Upsert items, duplicates included, as the contract counts them.
    upserted: u64,
    /// Removals of an event this page had upserted inside the window.
    deleted_in_page: u64,
}

/// What one id's items amount to so far, applied in order.
enum NetItem<'a> {
    /// Only removals so far: they act on the stored event, if any.
    Stored,
    Upsert(&'a Event),
    Dropped,
}

impl<'a> NetPage<'a> {
    fn of(items: &'a [DeltaItem], window: &Window) -> Self {
        // The stored precision (sqlx truncates to microseconds), so the window test here
        // agrees with the one the statement makes on stored rows.
        let (window_start, window_end) = (
            window.start.timestamp_micros(),
            window.end.timestamp_micros(),
        );
        let inside = |e: &Event| {
            e.start_utc.timestamp_micros() < window_end
                && e.end_utc.timestamp_micros() >= window_start
        };
        let mut net = Self::default();
        // Keyed as stored (NUL replaced), in order of first appearance.
        let mut index: HashMap<Cow<'a, str>, usize> = HashMap::with_capacity(items.len());
        // Per id: what its items amount to, whether a removal met the stored event, whether
        // any item removed it.
        let mut per_id: Vec<(Cow<'a, str>, NetItem<'a>, bool, bool)> =
            Vec::with_capacity(items.len());
        for item in items {
            let id = text(item.id());
            let slot = *index.entry(id.clone()).or_insert_with(|| {
                per_id.push((id, NetItem::Stored, false, false));
                per_id.len() - 1
            });
            let (_, state, removes_stored, removed) = &mut per_id[slot];
            match item {
                DeltaItem::Upsert(event) => {
                    net.upserted += 1;
                    *state = NetItem::Upsert(event);
                }
                DeltaItem::Removed { .. } => {
                    *removed = true;
                    match state {
                        NetItem::Stored => *removes_stored = true,
                        // Graph also reports changes outside the window as removals: only an
                        // event held inside this window is deleted.
                        NetItem::Upsert(event) if inside(event) => {
                            net.deleted_in_page += 1;
                            *state = NetItem::Dropped;
                        }
                        NetItem::Upsert(_) | NetItem::Dropped => {}
                    }
                }
            }
        }
        for (id, state, removes_stored, removed) in per_id {
            if removes_stored {
                net.removed_stored.push(id.clone());
            }
            if removed {
                net.removed.push(id.clone());
            }
            match state {
                NetItem::Stored => {}
                NetItem::Upsert(event) => net.upserts.push(event),
                NetItem::Dropped => net.dropped.push(id.clone()),
            }
            net.ids.push(id);
        }
        net
    }
}

/// Whether a stored event (its columns prefixed by `$prefix`) is left alone by the page's
/// items: not upserted again (`$15`), not upserted and then removed (`$10`), not removed inside
/// the window (`$11`).
macro_rules! untouched_by_items {
    ($prefix:literal) => {
        concat!(
            $prefix,
            "event_id <> ALL($15) AND ",
            $prefix,
            "event_id <> ALL($10) AND NOT (",
            $prefix,
            "event_id = ANY($11) AND ",
            $prefix,
            "start_utc < $8 AND ",
            $prefix,
            "end_utc >= $7)"
        )
    };
}

/// Whether master `$id` is left without an event when a round-ending page (`$9`) has been
/// applied: none of the page's upserts is in its series (`$14`) and none of its stored events
/// that were seen this round survives the page (re-upserted ones are judged by their new
/// version, in `$14`). Evaluated for stored masters and for the page's own, on one snapshot.
macro_rules! orphaned {
    ($id:literal) => {
        concat!(
            "($9 AND ",
            $id,
            " <> ALL($14) AND NOT EXISTS (SELECT 1 FROM events e
                 WHERE e.mailbox_id = $1 AND e.series_master_id = ",
            $id,
            " AND e.seen_round = $3 AND ",
            untouched_by_items!("e."),
            "))"
        )
    };
}

/// Not in a series the page reports gone (`$56`): those events are deleted first.
macro_rules! not_gone {
    () => {
        "NOT COALESCE(series_master_id = ANY($56), false)"
    };
}

/// Writes a whole page and moves the cursor past it in ONE statement, so one round trip and
/// its own transaction: the cursor update is the fence (it takes the mailbox row's lock and
/// matches only while `lease` holds the round), and every other part runs only if it matched,
/// so a page of a lost lease changes nothing.
///
/// The page's parts end as applying them one by one would leave them (the order SQLite's
/// backend runs): the series masters and their occurrences' refill, the gone series, the
/// quarantine, the items in order, then a round-ending page's reconciliation. Data-modifying
/// CTEs share one snapshot and may not touch a row twice, so the order is kept by exclusions
/// instead: a part leaves alone the rows a later part replaces or deletes (an occurrence the
/// page upserts is not refilled, a master the page removes is not written, an item rejected
/// and then understood is not quarantined), and the counts are taken on the snapshot. Each
/// optional part is gated by a parameter-only condition, so a plan made for any page skips
/// the parts it does not need. (PostgreSQL still plans it afresh per page, its custom plans
/// looking cheaper than the generic one: about a millisecond of its CPU a page, the next thing
/// to save here.)
async fn write_page(
    pool: &sqlx::PgPool,
    lease: &Lease,
    cursor: &Cursor,
    page: &PageWrite<'_>,
    link: &PageLink,
    now: DateTime<Utc>,
) -> Result<PageApplied, StoreError> {
    let window = cursor
        .window
        .ok_or_else(|| StoreError::Corrupt("cursor without a window".into()))?;
    let net = NetPage::of(&page.items, &window);
    let (next_link, delta_link) = link_parts(link);
    // A deltaLink that ends a full round: what the round did not return goes.
    let reconcile = delta_link.is_some() && cursor.full;
    let events = &net.upserts;
    let texts = |f: fn(&Event) -> &Option<String>| each(events, |e| opt_text(f(e)));
    let series: Vec<Cow<'_, str>> = events
        .iter()
        .filter_map(|e| opt_text(&e.series_master_id))
        .collect();
    let (masters, refills) = MasterWrite::last_of_each(page.masters, |w| text(&w.master.id));
    let master_texts =
        |f: fn(&Event) -> &Option<String>| each(&refills, |w| opt_text(f(&w.master)));
    let gone: Vec<Cow<'_, str>> = page.gone_series.iter().map(|s| text(s)).collect();
    let quarantined = Quarantined::of(page.quarantined);
    let row = sqlx::query(concat!(
        "WITH moved AS (
             UPDATE mailboxes SET next_link = $5, delta_link = COALESCE($6, delta_link),
                 round_full = round_full AND $6 IS NULL, failing_link = NULL,
                 failing_link_count = 0
             WHERE id = $1 AND lease_owner = $2 AND round_id = $3
             RETURNING id
         ), masters_written AS (
             INSERT INTO series_masters (mailbox_id, master_id, change_key, raw, checked_round,
                 synced_at)
             SELECT $1, w.master_id, w.change_key, w.raw, $41, $4
             FROM UNNEST($38::text[], $39::text[], $40::text[]) AS w(master_id, change_key, raw)
             WHERE EXISTS (SELECT 1 FROM moved) AND w.master_id <> ALL($12)
                 AND w.master_id <> ALL($56) AND NOT ",
        orphaned!("w.master_id"),
        "
             ON CONFLICT (mailbox_id, master_id) DO UPDATE SET
                 change_key = EXCLUDED.change_key, raw = EXCLUDED.raw,
                 checked_round = EXCLUDED.checked_round, synced_at = EXCLUDED.synced_at
         ), refilled AS (
             UPDATE events SET change_key = r.change_key, last_modified = r.last_modified,
                 subject = r.subject, is_all_day = r.is_all_day,
                 start_date = CASE WHEN r.is_all_day
                     THEN (events.start_utc AT TIME ZONE 'UTC')::date END,
                 end_date = CASE WHEN r.is_all_day
                     THEN (events.end_utc AT TIME ZONE 'UTC')::date END,
                 is_cancelled = r.is_cancelled, show_as = r.show_as,
                 sensitivity = r.sensitivity, organizer_name = r.organizer_name,
                 organizer_address = r.organizer_address, attendees = r.attendees::jsonb,
                 location = r.location, categories = r.categories, web_link = r.web_link,
                 synced_at = $4
             FROM UNNEST($42::text[], $43::text[], $44::timestamptz[], $45::text[],
                 $46::boolean[], $47::boolean[], $48::text[], $49::text[], $50::text[],
                 $51::text[], $52::text[], $53::text[], $54::jsonb[], $55::text[])
                 AS r(master_id, change_key, last_modified, subject, is_all_day, is_cancelled,
                     show_as, sensitivity, organizer_name, organizer_address, attendees,
                     location, categories, web_link)
             WHERE events.mailbox_id = $1 AND EXISTS (SELECT 1 FROM moved)
                 AND events.series_master_id = r.master_id AND events.event_type = 'occurrence'
                 AND r.master_id <> ALL($56) AND NOT ($9 AND events.seen_round <> $3) AND ",
        untouched_by_items!("events."),
        "
         ), gone_counted AS (
             SELECT COUNT(*) AS n FROM events WHERE mailbox_id = $1
                 AND series_master_id = ANY($56)
         ), gone_events AS (
             DELETE FROM events WHERE mailbox_id = $1 AND EXISTS (SELECT 1 FROM moved)
                 AND series_master_id = ANY($56) AND event_id <> ALL($15)
         ), gone_masters AS (
             DELETE FROM series_masters WHERE mailbox_id = $1 AND master_id = ANY($56)
                 AND EXISTS (SELECT 1 FROM moved)
         ), quarantined AS (
             INSERT INTO quarantine (mailbox_id, item_key, item_id, raw, reason, first_seen,
                 last_seen, times_seen, seen_round)
             SELECT $1, q.item_key, q.item_id, q.raw, q.reason, $4, $4, q.times_seen, $3
             FROM UNNEST($57::text[], $58::text[], $59::text[], $60::text[], $61::bigint[])
                 AS q(item_key, item_id, raw, reason, times_seen)
             WHERE EXISTS (SELECT 1 FROM moved) AND q.item_key <> ALL($13)
             ON CONFLICT (mailbox_id, item_key) DO UPDATE SET item_id = EXCLUDED.item_id,
                 raw = EXCLUDED.raw, reason = EXCLUDED.reason, last_seen = EXCLUDED.last_seen,
                 times_seen = quarantine.times_seen + EXCLUDED.times_seen,
                 seen_round = EXCLUDED.seen_round
         ), upserted AS (
             INSERT INTO events (mailbox_id, event_id, ical_uid, change_key, etag, last_modified,
                 subject, start_utc, end_utc, start_date, end_date, is_all_day, is_cancelled,
                 show_as, sensitivity, event_type, series_master_id, organizer_name,
                 organizer_address, attendees, location, categories, web_link, raw, seen_round,
                 synced_at)
             SELECT $1, p.event_id, p.ical_uid, p.change_key, p.etag, p.last_modified, p.subject,
                 p.start_utc, p.end_utc, p.start_date, p.end_date, p.is_all_day, p.is_cancelled,
                 p.show_as, p.sensitivity, p.event_type, p.series_master_id, p.organizer_name,
                 p.organizer_address, p.attendees::jsonb, p.location, p.categories, p.web_link,
                 p.raw, $3, $4
             FROM UNNEST($15::text[], $16::text[], $17::text[], $18::text[],
                 $19::timestamptz[], $20::text[], $21::timestamptz[], $22::timestamptz[],
                 $23::date[], $24::date[], $25::boolean[], $26::boolean[], $27::text[],
                 $28::text[], $29::text[], $30::text[], $31::text[], $32::text[], $33::text[],
                 $34::text[], $35::jsonb[], $36::text[], $37::text[])
                 AS p(event_id, ical_uid, change_key, etag, last_modified, subject, start_utc,
                     end_utc, start_date, end_date, is_all_day, is_cancelled, show_as,
                     sensitivity, event_type, series_master_id, organizer_name,
                     organizer_address, attendees, location, categories, web_link, raw)
             WHERE EXISTS (SELECT 1 FROM moved)
             ON CONFLICT (mailbox_id, event_id) DO UPDATE SET
                 ical_uid = EXCLUDED.ical_uid, change_key = EXCLUDED.change_key,
                 etag = EXCLUDED.etag, last_modified = EXCLUDED.last_modified,
                 subject = EXCLUDED.subject, start_utc = EXCLUDED.start_utc,
                 end_utc = EXCLUDED.end_utc, start_date = EXCLUDED.start_date,
                 end_date = EXCLUDED.end_date, is_all_day = EXCLUDED.is_all_day,
                 is_cancelled = EXCLUDED.is_cancelled, show_as = EXCLUDED.show_as,
                 sensitivity = EXCLUDED.sensitivity, event_type = EXCLUDED.event_type,
                 series_master_id = EXCLUDED.series_master_id,
                 organizer_name = EXCLUDED.organizer_name,
                 organizer_address = EXCLUDED.organizer_address,
                 attendees = EXCLUDED.attendees, location = EXCLUDED.location,
                 categories = EXCLUDED.categories, web_link = EXCLUDED.web_link,
                 raw = EXCLUDED.raw, seen_round = EXCLUDED.seen_round,
                 synced_at = EXCLUDED.synced_at
         ), stored_removed AS (
             SELECT COUNT(*) AS n FROM events WHERE mailbox_id = $1 AND event_id = ANY($11)
                 AND start_utc < $8 AND end_utc >= $7 AND ",
        not_gone!(),
        "
         ), removed AS (
             DELETE FROM events WHERE mailbox_id = $1 AND EXISTS (SELECT 1 FROM moved)
                 AND (event_id = ANY($10) OR (event_id = ANY($11) AND event_id <> ALL($15)
                     AND start_utc < $8 AND end_utc >= $7))
         ), reconciled AS (
             DELETE FROM events WHERE mailbox_id = $1 AND $9 AND EXISTS (SELECT 1 FROM moved)
                 AND seen_round <> $3 AND ",
        untouched_by_items!(""),
        " AND ",
        not_gone!(),
        "
             RETURNING 1
         ), masters_removed AS (
             DELETE FROM series_masters WHERE mailbox_id = $1 AND master_id = ANY($12)
                 AND EXISTS (SELECT 1 FROM moved)
         ), masters_orphaned AS (
             DELETE FROM series_masters m WHERE m.mailbox_id = $1
                 AND EXISTS (SELECT 1 FROM moved) AND m.master_id <> ALL($12) AND ",
        orphaned!("m.master_id"),
        "
         ), unquarantined AS (
             DELETE FROM quarantine WHERE mailbox_id = $1 AND item_key = ANY($13)
                 AND EXISTS (SELECT 1 FROM moved)
         ), quarantine_reconciled AS (
             DELETE FROM quarantine WHERE mailbox_id = $1 AND $9
                 AND EXISTS (SELECT 1 FROM moved) AND seen_round <> $3 AND item_key <> ALL($13)
                 AND item_key <> ALL($57)
         )
         SELECT EXISTS (SELECT 1 FROM moved) AS held,
             (SELECT n FROM gone_counted) + (SELECT n FROM stored_removed)
                 + (SELECT COUNT(*) FROM reconciled) AS deleted"
    ))
    .bind(lease.mailbox) // $1
    .bind(&lease.owner)
    .bind(cursor.round_id)
    .bind(now)
    .bind(next_link.map(text)) // $5
    .bind(delta_link.map(text))
    .bind(window.start)
    .bind(window.end)
    .bind(reconcile)
    .bind(&net.dropped) // $10
    .bind(&net.removed_stored)
    .bind(&net.removed)
    .bind(&net.ids)
    .bind(&series)
    .bind(each(events, |e| text(&e.id))) // $15
    .bind(texts(|e| &e.ical_uid))
    .bind(texts(|e| &e.change_key))
    .bind(texts(|e| &e.etag))
    .bind(each(events, |e| e.last_modified))
    .bind(texts(|e| &e.subject)) // $20
    .bind(each(events, |e| e.start_utc))
    .bind(each(events, |e| e.end_utc))
    .bind(each(events, |e| e.start_date))
    .bind(each(events, |e| e.end_date))
    .bind(each(events, |e| e.is_all_day)) // $25
    .bind(each(events, |e| e.is_cancelled))
    .bind(texts(|e| &e.show_as))
    .bind(texts(|e| &e.sensitivity))
    .bind(texts(|e| &e.event_type))
    .bind(texts(|e| &e.series_master_id)) // $30
    .bind(texts(|e| &e.organizer_name))
    .bind(texts(|e| &e.organizer_address))
    .bind(each(events, attendees_json))
    .bind(texts(|e| &e.location))
    .bind(each(events, |e| categories_json(&e.categories))) // $35
    .bind(texts(|e| &e.web_link))
    .bind(each(events, |e| text(&e.raw)))
    .bind(each(&masters, |w| text(&w.master.id)))
    .bind(each(&masters, |w| opt_text(&w.master.change_key)))
    .bind(each(&masters, |w| text(&w.master.raw))) // $40
    .bind(text(page.round))
    .bind(each(&refills, |w| text(&w.master.id)))
    .bind(master_texts(|m| &m.change_key))
    .bind(each(&refills, |w| w.master.last_modified))
    .bind(master_texts(|m| &m.subject)) // $45
    .bind(each(&refills, |w| w.master.is_all_day))
    .bind(each(&refills, |w| w.master.is_cancelled))
    .bind(master_texts(|m| &m.show_as))
    .bind(master_texts(|m| &m.sensitivity))
    .bind(master_texts(|m| &m.organizer_name)) // $50
    .bind(master_texts(|m| &m.organizer_address))
    .bind(each(&refills, |w| attendees_json(&w.master)))
    .bind(master_texts(|m| &m.location))
    .bind(each(&refills, |w| categories_json(&w.master.categories)))
    .bind(master_texts(|m| &m.web_link)) // $55
    .bind(&gone)
    .bind(&quarantined.keys)
    .bind(&quarantined.ids)
    .bind(&quarantined.raws)
    .bind(&quarantined.reasons) // $60
    .bind(&quarantined.times_seen)
    .fetch_one(pool)
    .await?;
    if !row.try_get::<bool, _>("held")? {
        return Err(StoreError::LeaseLost(lease.mailbox));
    }
    let deleted = u64::try_from(row.try_get::<i64, _>("deleted")?).unwrap_or(0);
    Ok(PageApplied {
        upserted: net.upserted,
        deleted: deleted + net.deleted_in_page,
    })
}

/// One column of a multi-row statement: `f` of each row, in order.
fn each<'a, T: ?Sized, U>(rows: &[&'a T], f: impl Fn(&'a T) -> U) -> Vec<U> {
    rows.iter().map(|row| f(row)).collect()
}

/// A page's rejected items as bound: one row per key (as stored, NUL replaced) in order of
/// first appearance, with its last item's id, raw and reason and how many times the page had
/// it, which is what counting them one by one would leave.
struct Quarantined<'a> {
    keys: Vec<String>,
    ids: Vec<Option<Cow<'a, str>>>,
    raws: Vec<Cow<'a, str>>,
    reasons: Vec<Cow<'a, str>>,
    times_seen: Vec<i64>,
}

impl<'a> Quarantined<'a> {
    fn of(items: &'a [RejectedItem]) -> Self {
        let rows = last_of_each_key(items, |item| text(&item.key()).into_owned());
        Self {
            ids: rows.iter().map(|(_, item, _)| opt_text(&item.id)).collect(),
            raws: rows.iter().map(|(_, item, _)| text(&item.raw)).collect(),
            reasons: rows.iter().map(|(_, item, _)| text(&item.reason)).collect(),
            times_seen: rows
                .iter()
                .map(|(_, _, n)| i64::try_from(*n).unwrap_or(i64::MAX))
                .collect(),
            keys: rows.into_iter().map(|(key, _, _)| key).collect(),
        }
    }
}

/// An event's (or master's) attendees as bound: JSON text, cast to jsonb by the statement.
fn attendees_json(event: &Event) -> String {
    let text = event.attendees.as_json();
    // jsonb cannot hold NUL: only text that has one (escaped) is rewritten without it.
    if text.contains("\\u0000") {
        json_without_nul(&event.attendees.to_value()).to_string()
    } else {
        text.to_string()
    }
}

fn categories_json(categories: &[String]) -> serde_json::Value {
    serde_json::Value::Array(
        categories
            .iter()
            .map(|c| serde_json::Value::String(text(c).into_owned()))
            .collect(),
    )
}

fn event_from_row(row: &PgRow) -> Result<Event, StoreError> {
    let categories: serde_json::Value = row.try_get("categories")?;
    Ok(Event {
        id: row.try_get("event_id")?,
        ical_uid: row.try_get("ical_uid")?,
        change_key: row.try_get("change_key")?,
        etag: row.try_get("etag")?,
        last_modified: row.try_get("last_modified")?,
        subject: row.try_get("subject")?,
        start_utc: row.try_get("start_utc")?,
        end_utc: row.try_get("end_utc")?,
        start_date: row.try_get("start_date")?,
        end_date: row.try_get("end_date")?,
        is_all_day: row.try_get("is_all_day")?,
        is_cancelled: row.try_get("is_cancelled")?,
        show_as: row.try_get("show_as")?,
        sensitivity: row.try_get("sensitivity")?,
        event_type: row.try_get("event_type")?,
        series_master_id: row.try_get("series_master_id")?,
        organizer_name: row.try_get("organizer_name")?,
        organizer_address: row.try_get("organizer_address")?,
        attendees: Attendees::from_value(&row.try_get::<serde_json::Value, _>("attendees")?),
        location: row.try_get("location")?,
        categories: serde_json::from_value(categories)
            .map_err(|e| StoreError::Corrupt(format!("categories: {e}")))?,
        web_link: row.try_get("web_link")?,
        raw: row.try_get("raw")?,
    })
}

/// `(mailbox_id, n)` rows of a per-mailbox `COUNT(*)` query, as a map.
async fn rows_per_mailbox(
    pool: &sqlx::PgPool,
    sql: &'static str,
) -> Result<std::collections::HashMap<MailboxId, u64>, StoreError> {
    let rows = sqlx::query(sql).fetch_all(pool).await?;
    rows.iter()
        .map(|row| {
            Ok((
                row.try_get("mailbox_id")?,
                u64::try_from(row.try_get::<i64, _>("n")?).unwrap_or(0),
            ))
        })
        .collect()
}
