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
    link_parts, Cursor, Lease, MailboxId, MasterWrite, PageApplied, PageWrite, QuarantinedItem,
    StoreError, StoredMaster,
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
        page: &PageWrite<'_>,
        link: &PageLink,
        now: DateTime<Utc>,
    ) -> Result<PageApplied, StoreError> {
        let window = cursor
            .window
            .ok_or_else(|| StoreError::Corrupt("cursor without a window".into()))?;
        let mut tx = self.pool.begin().await?;
        // The fence: the row lock is held to commit, so a claim by another replica either
        // committed before (and this page is refused) or waits until this page has committed.
        let fence = sqlx::query(
            "SELECT 1 FROM mailboxes WHERE id = $1 AND lease_owner = $2 AND round_id = $3
             FOR UPDATE",
        )
        .bind(lease.mailbox)
        .bind(&lease.owner)
        .bind(cursor.round_id)
        .fetch_optional(&mut *tx)
        .await?;
        if fence.is_none() {
            return Err(StoreError::LeaseLost(lease.mailbox));
        }
        let mut applied = PageApplied::default();
        for write in page.masters {
            upsert_master(&mut tx, lease.mailbox, write, page.round, now).await?;
        }
        if !page.gone_series.is_empty() {
            let gone: Vec<Cow<'_, str>> = page.gone_series.iter().map(|s| text(s)).collect();
            let done = sqlx::query(
                "DELETE FROM events WHERE mailbox_id = $1 AND series_master_id = ANY($2)",
            )
            .bind(lease.mailbox)
            .bind(&gone)
            .execute(&mut *tx)
            .await?;
            applied.deleted += done.rows_affected();
            sqlx::query("DELETE FROM series_masters WHERE mailbox_id = $1 AND master_id = ANY($2)")
                .bind(lease.mailbox)
                .bind(&gone)
                .execute(&mut *tx)
                .await?;
        }
        for rejected in page.quarantined {
            quarantine(&mut tx, lease.mailbox, rejected, cursor.round_id, now).await?;
        }
        if !page.items.is_empty() {
            // An item that is understood now leaves quarantine.
            let ids: Vec<Cow<'_, str>> = page.items.iter().map(|i| text(i.id())).collect();
            sqlx::query("DELETE FROM quarantine WHERE mailbox_id = $1 AND item_key = ANY($2)")
                .bind(lease.mailbox)
                .bind(&ids)
                .execute(&mut *tx)
                .await?;
        }
        // One statement per run of consecutive upserts or removals (a round trip per item made
        // a page five times slower than on SQLite); runs keep the page's order between them.
        for run in page.items.chunk_by(|a, b| is_removal(a) == is_removal(b)) {
            let removals: Vec<Cow<'_, str>> = run
                .iter()
                .filter_map(|item| match item {
                    DeltaItem::Removed { id } => Some(text(id)),
                    DeltaItem::Upsert(_) => None,
                })
                .collect();
            if removals.is_empty() {
                let events: Vec<&Event> = run
                    .iter()
                    .filter_map(|item| match item {
                        DeltaItem::Upsert(event) => Some(event.as_ref()),
                        DeltaItem::Removed { .. } => None,
                    })
                    .collect();
                upsert_events(&mut tx, lease.mailbox, &events, cursor.round_id, now).await?;
                applied.upserted += events.len() as u64;
            } else {
                // Graph also reports changes outside the window as removals: only an event
                // held inside this window is deleted.
                let done = sqlx::query(
                    "DELETE FROM events WHERE mailbox_id = $1 AND event_id = ANY($2)
                       AND start_utc < $3 AND end_utc >= $4",
                )
                .bind(lease.mailbox)
                .bind(&removals)
                .bind(window.end)
                .bind(window.start)
                .execute(&mut *tx)
                .await?;
                applied.deleted += done.rows_affected();
                // A removed master is only forgotten: its occurrences go by their own
                // removals, and a later stub of the series fetches it again.
                sqlx::query(
                    "DELETE FROM series_masters WHERE mailbox_id = $1 AND master_id = ANY($2)",
                )
                .bind(lease.mailbox)
                .bind(&removals)
                .execute(&mut *tx)
                .await?;
            }
        }
        let (next_link, delta_link) = link_parts(link);
        if delta_link.is_some() && cursor.full {
            let done = sqlx::query("DELETE FROM events WHERE mailbox_id = $1 AND seen_round <> $2")
                .bind(lease.mailbox)
                .bind(cursor.round_id)
                .execute(&mut *tx)
                .await?;
            applied.deleted += done.rows_affected();
            sqlx::query(
                "DELETE FROM series_masters m WHERE m.mailbox_id = $1 AND NOT EXISTS (
                     SELECT 1 FROM events e WHERE e.mailbox_id = $1
                       AND e.series_master_id = m.master_id)",
            )
            .bind(lease.mailbox)
            .execute(&mut *tx)
            .await?;
            // What the full round did not return any more is no longer in quarantine either.
            sqlx::query("DELETE FROM quarantine WHERE mailbox_id = $1 AND seen_round <> $2")
                .bind(lease.mailbox)
                .bind(cursor.round_id)
                .execute(&mut *tx)
                .await?;
        }
        match (next_link, delta_link) {
            (Some(next), _) => {
                sqlx::query(
                    "UPDATE mailboxes SET next_link = $1, failing_link = NULL,
                         failing_link_count = 0 WHERE id = $2",
                )
                .bind(text(next))
                .bind(lease.mailbox)
                .execute(&mut *tx)
                .await?;
            }
            (None, delta) => {
                sqlx::query(
                    "UPDATE mailboxes SET next_link = NULL, delta_link = $1, round_full = false,
                         failing_link = NULL, failing_link_count = 0
                     WHERE id = $2",
                )
                .bind(delta.map(text))
                .bind(lease.mailbox)
                .execute(&mut *tx)
                .await?;
            }
        }
        tx.commit().await?;
        Ok(applied)
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

    async fn event_counts(&self) -> Result<HashMap<MailboxId, u64>, StoreError> {
        rows_per_mailbox(
            &self.pool,
            "SELECT mailbox_id, COUNT(*) AS n FROM events GROUP BY mailbox_id",
        )
        .await
    }

    async fn quarantine_counts(&self) -> Result<HashMap<MailboxId, u64>, StoreError> {
        rows_per_mailbox(
            &self.pool,
            "SELECT mailbox_id, COUNT(*) AS n FROM quarantine GROUP BY mailbox_id",
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

fn is_removal(item: &DeltaItem) -> bool {
    matches!(item, DeltaItem::Removed { .. })
}

/// Upserts `events` in one statement over arrays. An id repeated within them keeps its last
/// version, as one-by-one upserts would (one statement cannot update a row twice).
async fn upsert_events(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    mailbox: MailboxId,
    events: &[&Event],
    round_id: i64,
    synced_at: DateTime<Utc>,
) -> Result<(), StoreError> {
    let mut seen = std::collections::HashSet::new();
    let mut latest: Vec<&Event> = events
        .iter()
        .rev()
        .filter(|e| seen.insert(text(&e.id)))
        .copied()
        .collect();
    latest.reverse();
    let texts = |f: fn(&Event) -> &Option<String>| -> Vec<Option<String>> {
        latest
            .iter()
            .map(|e| opt_text(f(e)).map(Cow::into_owned))
            .collect()
    };
    sqlx::query(
        "INSERT INTO events (mailbox_id, event_id, ical_uid, change_key, etag, last_modified,
             subject, start_utc, end_utc, start_date, end_date, is_all_day, is_cancelled, show_as,
             sensitivity, event_type, series_master_id, organizer_name, organizer_address,
             attendees, location, categories, web_link, raw, seen_round, synced_at)
         SELECT $1, page.*, $25, $26 FROM UNNEST($2::text[], $3::text[], $4::text[],
             $5::text[], $6::timestamptz[], $7::text[], $8::timestamptz[], $9::timestamptz[],
             $10::date[], $11::date[], $12::boolean[], $13::boolean[], $14::text[], $15::text[],
             $16::text[], $17::text[], $18::text[], $19::text[], $20::jsonb[], $21::text[],
             $22::jsonb[], $23::text[], $24::text[]) AS page
         ON CONFLICT (mailbox_id, event_id) DO UPDATE SET
             ical_uid = EXCLUDED.ical_uid, change_key = EXCLUDED.change_key, etag = EXCLUDED.etag,
             last_modified = EXCLUDED.last_modified, subject = EXCLUDED.subject,
             start_utc = EXCLUDED.start_utc, end_utc = EXCLUDED.end_utc,
             start_date = EXCLUDED.start_date, end_date = EXCLUDED.end_date,
             is_all_day = EXCLUDED.is_all_day, is_cancelled = EXCLUDED.is_cancelled,
             show_as = EXCLUDED.show_as, sensitivity = EXCLUDED.sensitivity,
             event_type = EXCLUDED.event_type, series_master_id = EXCLUDED.series_master_id,
             organizer_name = EXCLUDED.organizer_name, organizer_address = EXCLUDED.organizer_address,
             attendees = EXCLUDED.attendees, location = EXCLUDED.location,
             categories = EXCLUDED.categories, web_link = EXCLUDED.web_link, raw = EXCLUDED.raw,
             seen_round = EXCLUDED.seen_round, synced_at = EXCLUDED.synced_at",
    )
    .bind(mailbox)
    .bind(
        latest
            .iter()
            .map(|e| text(&e.id).into_owned())
            .collect::<Vec<_>>(),
    )
    .bind(texts(|e| &e.ical_uid))
    .bind(texts(|e| &e.change_key))
    .bind(texts(|e| &e.etag))
    .bind(latest.iter().map(|e| e.last_modified).collect::<Vec<_>>())
    .bind(texts(|e| &e.subject))
    .bind(latest.iter().map(|e| e.start_utc).collect::<Vec<_>>())
    .bind(latest.iter().map(|e| e.end_utc).collect::<Vec<_>>())
    .bind(latest.iter().map(|e| e.start_date).collect::<Vec<_>>())
    .bind(latest.iter().map(|e| e.end_date).collect::<Vec<_>>())
    .bind(latest.iter().map(|e| e.is_all_day).collect::<Vec<_>>())
    .bind(latest.iter().map(|e| e.is_cancelled).collect::<Vec<_>>())
    .bind(texts(|e| &e.show_as))
    .bind(texts(|e| &e.sensitivity))
    .bind(texts(|e| &e.event_type))
    .bind(texts(|e| &e.series_master_id))
    .bind(texts(|e| &e.organizer_name))
    .bind(texts(|e| &e.organizer_address))
    .bind(
        latest
            .iter()
            .map(|e| json_without_nul(&e.attendees.to_value()))
            .collect::<Vec<_>>(),
    )
    .bind(texts(|e| &e.location))
    .bind(
        latest
            .iter()
            .map(|e| categories_json(&e.categories))
            .collect::<Vec<_>>(),
    )
    .bind(texts(|e| &e.web_link))
    .bind(
        latest
            .iter()
            .map(|e| text(&e.raw).into_owned())
            .collect::<Vec<_>>(),
    )
    .bind(round_id)
    .bind(synced_at)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Keeps (or counts again) an item that could not be understood.
async fn quarantine(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    mailbox: MailboxId,
    item: &RejectedItem,
    round_id: i64,
    now: DateTime<Utc>,
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO quarantine (mailbox_id, item_key, item_id, raw, reason, first_seen,
             last_seen, times_seen, seen_round)
         VALUES ($1, $2, $3, $4, $5, $6, $6, 1, $7)
         ON CONFLICT (mailbox_id, item_key) DO UPDATE SET item_id = EXCLUDED.item_id,
             raw = EXCLUDED.raw, reason = EXCLUDED.reason, last_seen = EXCLUDED.last_seen,
             times_seen = quarantine.times_seen + 1, seen_round = EXCLUDED.seen_round",
    )
    .bind(mailbox)
    .bind(text(&item.key()).into_owned())
    .bind(opt_text(&item.id))
    .bind(text(&item.raw))
    .bind(text(&item.reason))
    .bind(now)
    .bind(round_id)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

fn categories_json(categories: &[String]) -> serde_json::Value {
    serde_json::Value::Array(
        categories
            .iter()
            .map(|c| serde_json::Value::String(text(c).into_owned()))
            .collect(),
    )
}

/// Keeps a series master and, when it changed, gives every stored occurrence of its series the
/// master's fields again (their own id, times and stub stay).
async fn upsert_master(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    mailbox: MailboxId,
    write: &MasterWrite,
    round: &str,
    synced_at: DateTime<Utc>,
) -> Result<(), StoreError> {
    let m = &write.master;
    sqlx::query(
        "INSERT INTO series_masters (mailbox_id, master_id, change_key, raw, checked_round, synced_at)
         VALUES ($1, $2, $3, $4, $5, $6)
         ON CONFLICT (mailbox_id, master_id) DO UPDATE SET change_key = EXCLUDED.change_key,
             raw = EXCLUDED.raw, checked_round = EXCLUDED.checked_round,
             synced_at = EXCLUDED.synced_at",
    )
    .bind(mailbox)
    .bind(text(&m.id))
    .bind(opt_text(&m.change_key))
    .bind(text(&m.raw))
    .bind(round)
    .bind(synced_at)
    .execute(&mut **tx)
    .await?;
    if !write.refill_occurrences {
        return Ok(());
    }
    // The same fields `OccurrenceStub::hydrate` takes from the master; an all-day series keeps
    // its occurrences' dates (their times are midnights).
    sqlx::query(
        "UPDATE events SET change_key = $3, last_modified = $4, subject = $5, is_all_day = $6,
             start_date = CASE WHEN $6 THEN (start_utc AT TIME ZONE 'UTC')::date END,
             end_date = CASE WHEN $6 THEN (end_utc AT TIME ZONE 'UTC')::date END,
             is_cancelled = $7, show_as = $8, sensitivity = $9, organizer_name = $10,
             organizer_address = $11, attendees = $12, location = $13, categories = $14,
             web_link = $15, synced_at = $16
         WHERE mailbox_id = $1 AND series_master_id = $2 AND event_type = 'occurrence'",
    )
    .bind(mailbox)
    .bind(text(&m.id))
    .bind(opt_text(&m.change_key))
    .bind(m.last_modified)
    .bind(opt_text(&m.subject))
    .bind(m.is_all_day)
    .bind(m.is_cancelled)
    .bind(opt_text(&m.show_as))
    .bind(opt_text(&m.sensitivity))
    .bind(opt_text(&m.organizer_name))
    .bind(opt_text(&m.organizer_address))
    .bind(json_without_nul(&m.attendees.to_value()))
    .bind(opt_text(&m.location))
    .bind(categories_json(&m.categories))
    .bind(opt_text(&m.web_link))
    .bind(synced_at)
    .execute(&mut **tx)
    .await?;
    Ok(())
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
