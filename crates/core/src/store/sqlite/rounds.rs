//! SqliteStore: delta rounds (pages with their cursor, series masters, quarantine, events).

use std::borrow::Cow;
use std::sync::OnceLock;

use chrono::{DateTime, Utc};
use sqlx::sqlite::{SqliteArguments, SqliteRow};
use sqlx::{Arguments, Row};

use crate::graph::model::RejectedItem;
use crate::graph::{Attendees, DeltaItem, Event, PageLink, Window};
use crate::store::contract::*;
use crate::store::{
    link_parts, Cursor, Lease, MailboxId, MasterWrite, PageApplied, PageWrite, QuarantinedItem,
    StoreError, StoredMaster,
};
// The backend itself and its helpers (timestamps, text cleaning).
use super::*;

impl RoundStore for SqliteStore {
    /// Begins a full round over `window`: the old delta state is dropped and events not seen
    /// by the time the round completes are deleted then. Returns the new round id.
    async fn start_full_round(&self, lease: &Lease, window: &Window) -> Result<i64, StoreError> {
        let row = sqlx::query(
            "UPDATE mailboxes SET round_id = round_id + 1, round_full = 1, next_link = NULL,
                 delta_link = NULL, window_start = ?1, window_end = ?2
             WHERE id = ?3 AND lease_owner = ?4 RETURNING round_id",
        )
        .bind(ts(window.start))
        .bind(ts(window.end))
        .bind(lease.mailbox)
        .bind(&lease.owner)
        .fetch_optional(&self.writer)
        .await?
        .ok_or(StoreError::LeaseLost(lease.mailbox))?;
        Ok(row.try_get("round_id")?)
    }

    /// Applies one page and moves the cursor past it, atomically. With a deltaLink that ends a
    /// full round, events the round did not return are deleted (reconciliation).
    async fn apply_page(
        &self,
        lease: &Lease,
        cursor: &Cursor,
        page: PageWrite<'_>,
        link: &PageLink,
        now: DateTime<Utc>,
    ) -> Result<PageApplied, StoreError> {
        let window = cursor
            .window
            .ok_or_else(|| StoreError::Corrupt("cursor without a window".into()))?;
        let (next_link, delta_link) = link_parts(link);
        // The cursor moves in the same statement that checks the fence: the mailbox's row
        // changes only while this lease holds it in this round. A page with items moves it
        // first, in the page's transaction, and learns in the same round trip to the writer's
        // thread whether the mailbox has items in quarantine; a lost lease rolls it all back.
        macro_rules! move_cursor {
            () => {
                "UPDATE mailboxes SET next_link = ?1, delta_link = COALESCE(?2, delta_link),
                     round_full = CASE WHEN ?2 IS NULL THEN round_full ELSE 0 END,
                     failing_link = NULL, failing_link_count = 0
                 WHERE id = ?3 AND lease_owner = ?4 AND round_id = ?5"
            };
        }
        if page.is_empty() && !(delta_link.is_some() && cursor.full) {
            // Nothing to write but the cursor (an idle round's page): one statement, atomic
            // without a transaction around it.
            let moved = sqlx::query(move_cursor!())
                .bind(next_link)
                .bind(delta_link)
                .bind(lease.mailbox)
                .bind(&lease.owner)
                .bind(cursor.round_id)
                .execute(&self.writer)
                .await?;
            return match moved.rows_affected() {
                1 => Ok(PageApplied::default()),
                _ => Err(StoreError::LeaseLost(lease.mailbox)),
            };
        }
        let mut tx = self.writer.begin_with("BEGIN IMMEDIATE").await?;
        let fenced = sqlx::query(concat!(
            move_cursor!(),
            " RETURNING EXISTS (SELECT 1 FROM quarantine WHERE mailbox_id = ?3) AS quarantined"
        ))
        .bind(next_link)
        .bind(delta_link)
        .bind(lease.mailbox)
        .bind(&lease.owner)
        .bind(cursor.round_id)
        // Stepped to its end (one row or none), so that the update is complete when the
        // statement is reset, not only begun.
        .fetch_all(&mut *tx)
        .await?
        .into_iter()
        .next()
        .ok_or(StoreError::LeaseLost(lease.mailbox))?;
        let mut applied = PageApplied::default();
        let synced_at = ts(now);
        upsert_masters(&mut tx, lease.mailbox, page.masters, page.round, &synced_at).await?;
        for series in page.gone_series {
            let done =
                sqlx::query("DELETE FROM events WHERE mailbox_id = ?1 AND series_master_id = ?2")
                    .bind(lease.mailbox)
                    .bind(series)
                    .execute(&mut *tx)
                    .await?;
            applied.deleted += done.rows_affected();
            sqlx::query("DELETE FROM series_masters WHERE mailbox_id = ?1 AND master_id = ?2")
                .bind(lease.mailbox)
                .bind(series)
                .execute(&mut *tx)
                .await?;
        }
        for rejected in page.quarantined {
            quarantine(
                &mut tx,
                lease.mailbox,
                rejected,
                cursor.round_id,
                &synced_at,
            )
            .await?;
        }
        // An item that is understood now leaves quarantine (looked for only when the mailbox
        // has any, from before or from this page: a page is otherwise one statement per run
        // of items, not one per item).
        let any_quarantined = !page.quarantined.is_empty()
            || fenced
                .try_get::<i64, _>("quarantined")
                .map_or(true, |n| n != 0);
        if any_quarantined && !page.items.is_empty() {
            let ids: Vec<&str> = page.items.iter().map(DeltaItem::id).collect();
            sqlx::query(
                "DELETE FROM quarantine WHERE mailbox_id = ?1
                   AND item_key IN (SELECT value FROM json_each(?2))",
            )
            .bind(lease.mailbox)
            .bind(json_list(&ids))
            .execute(&mut *tx)
            .await?;
        }
        // Runs of upserts go in multi-row statements; a removal flushes the run before it, so
        // the page is applied in its order.
        let mut run: Vec<Box<Event>> = Vec::new();
        for item in page.items {
            match item {
                DeltaItem::Upsert(event) => run.push(event),
                DeltaItem::Removed { id } => {
                    applied.upserted += upsert_events(
                        &mut tx,
                        lease.mailbox,
                        std::mem::take(&mut run),
                        cursor.round_id,
                        &synced_at,
                    )
                    .await?;
                    // Graph also reports changes outside the window as removals: only an event
                    // held inside this window is deleted.
                    let done = sqlx::query(
                        "DELETE FROM events WHERE mailbox_id = ?1 AND event_id = ?2
                           AND start_utc < ?3 AND end_utc >= ?4",
                    )
                    .bind(lease.mailbox)
                    .bind(&id)
                    .bind(ts(window.end))
                    .bind(ts(window.start))
                    .execute(&mut *tx)
                    .await?;
                    applied.deleted += done.rows_affected();
                    // A removed master is only forgotten: its occurrences go by their own
                    // removals, and a later stub of the series fetches it again.
                    sqlx::query(
                        "DELETE FROM series_masters WHERE mailbox_id = ?1 AND master_id = ?2",
                    )
                    .bind(lease.mailbox)
                    .bind(id)
                    .execute(&mut *tx)
                    .await?;
                }
            }
        }
        applied.upserted +=
            upsert_events(&mut tx, lease.mailbox, run, cursor.round_id, &synced_at).await?;
        if delta_link.is_some() && cursor.full {
            let done = sqlx::query("DELETE FROM events WHERE mailbox_id = ?1 AND seen_round <> ?2")
                .bind(lease.mailbox)
                .bind(cursor.round_id)
                .execute(&mut *tx)
                .await?;
            applied.deleted += done.rows_affected();
            sqlx::query(
                "DELETE FROM series_masters WHERE mailbox_id = ?1 AND NOT EXISTS (
                     SELECT 1 FROM events e WHERE e.mailbox_id = ?1
                       AND e.series_master_id = series_masters.master_id)",
            )
            .bind(lease.mailbox)
            .execute(&mut *tx)
            .await?;
            // What the full round did not return any more is no longer in quarantine either.
            sqlx::query("DELETE FROM quarantine WHERE mailbox_id = ?1 AND seen_round <> ?2")
                .bind(lease.mailbox)
                .bind(cursor.round_id)
                .execute(&mut *tx)
                .await?;
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
        let mut tx = self.writer.begin_with("BEGIN IMMEDIATE").await?;
        let row = sqlx::query(
            "UPDATE mailboxes SET failing_link_count = CASE WHEN failing_link = ?1
                     THEN failing_link_count + 1 ELSE 1 END,
                 failing_link = ?1
             WHERE id = ?2 AND lease_owner = ?3 RETURNING failing_link_count",
        )
        .bind(signature)
        .bind(lease.mailbox)
        .bind(&lease.owner)
        .fetch_optional(&mut *tx)
        .await?
        .ok_or(StoreError::LeaseLost(lease.mailbox))?;
        let count: i64 = row.try_get("failing_link_count")?;
        let count = u32::try_from(count).unwrap_or(u32::MAX);
        let reset = count >= limit;
        if reset {
            sqlx::query(
                "UPDATE mailboxes SET window_start = NULL, window_end = NULL, next_link = NULL,
                     delta_link = NULL, round_full = 1, failing_link = NULL,
                     failing_link_count = 0, fresh_rounds_forced = fresh_rounds_forced + 1
                 WHERE id = ?1",
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
    ) -> Result<std::collections::HashMap<String, StoredMaster>, StoreError> {
        let mut out = std::collections::HashMap::new();
        if ids.is_empty() {
            return Ok(out);
        }
        // The ids as one JSON array: one statement whatever their number.
        let rows = sqlx::query(
            "SELECT master_id, change_key, checked_round, raw FROM series_masters
             WHERE mailbox_id = ?1 AND master_id IN (SELECT value FROM json_each(?2))",
        )
        .bind(mailbox)
        .bind(json_list(ids))
        .fetch_all(&self.pool)
        .await?;
        for row in rows {
            let master = StoredMaster {
                master_id: row.try_get("master_id")?,
                change_key: row.try_get("change_key")?,
                checked_round: row.try_get("checked_round")?,
                raw: row.try_get("raw")?,
            };
            out.insert(master.master_id.clone(), master);
        }
        Ok(out)
    }

    async fn events(&self, mailbox: MailboxId) -> Result<Vec<Event>, StoreError> {
        let rows = sqlx::query(concat!(
            "SELECT ",
            crate::store::event_columns!(),
            " FROM events WHERE mailbox_id = ?1 ORDER BY start_utc, event_id"
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
            " FROM events WHERE mailbox_id = ?1 AND start_utc < ?3
                 AND (end_utc > ?2 OR start_utc >= ?2)
             ORDER BY start_utc, event_id"
        ))
        .bind(mailbox)
        .bind(ts(start))
        .bind(ts(end))
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
            " FROM events WHERE mailbox_id = ?1 AND event_id = ?2"
        ))
        .bind(mailbox)
        .bind(event_id)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(event_from_row).transpose()
    }

    async fn event_counts(&self) -> Result<std::collections::HashMap<MailboxId, u64>, StoreError> {
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
             FROM quarantine WHERE mailbox_id = ?1 ORDER BY last_seen DESC, item_key
             LIMIT ?2",
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
                    first_seen: parse_ts("first_seen", &row.try_get::<String, _>("first_seen")?)?,
                    last_seen: parse_ts("last_seen", &row.try_get::<String, _>("last_seen")?)?,
                    times_seen: row.try_get::<i64, _>("times_seen")?.max(0) as u64,
                    raw: row.try_get("raw")?,
                })
            })
            .collect()
    }
}

/// Most rows per multi-row upsert: 26 parameters each, far below SQLite's 32766-variable limit.
const UPSERT_CHUNK: usize = 100;
const EVENT_COLUMNS: usize = 26;

/// The row counts a run of `n` upserts is written in: hundreds, then a multiple of ten, then
/// the rest. Each row count is its own prepared statement, so keeping to 19 of them (10, 20 ..
/// 100 and 1 .. 9) lets the connection's statement cache keep them all: any other split would
/// prepare a new 2,600-parameter statement for most pages.
fn statement_sizes(mut n: usize) -> impl Iterator<Item = usize> {
    std::iter::from_fn(move || {
        let rows = match n {
            0 => return None,
            n if n >= UPSERT_CHUNK => UPSERT_CHUNK,
            n if n >= 10 => n / 10 * 10,
            n => n,
        };
        n -= rows;
        Some(rows)
    })
}

/// A multi-row statement's text for each row count, built once per process. A 100-row upsert
/// is ~8 KB of SQL: building it again for every statement cost ~350 instructions per stored
/// event.
struct TextByRows([OnceLock<String>; UPSERT_CHUNK + 1]);

impl TextByRows {
    const fn new() -> Self {
        Self([const { OnceLock::new() }; UPSERT_CHUNK + 1])
    }

    /// The text for `rows` rows, from `build` the first time. [`statement_sizes`] never asks
    /// for more than [`UPSERT_CHUNK`]; a larger count would still get its text, built anew.
    fn get(&self, rows: usize, build: fn(usize) -> String) -> Cow<'_, str> {
        match self.0.get(rows) {
            Some(cell) => Cow::Borrowed(cell.get_or_init(|| build(rows))),
            None => Cow::Owned(build(rows)),
        }
    }
}

/// `items` in runs of [`statement_sizes`], in order.
fn statement_chunks<T>(items: &[T]) -> impl Iterator<Item = &[T]> {
    let mut rest = items;
    statement_sizes(items.len()).map(move |rows| {
        let (chunk, after) = rest.split_at(rows);
        rest = after;
        chunk
    })
}

/// Upserts `events` (in order: a later duplicate wins) in multi-row statements; returns how
/// many rows were written. The events' text moves into the statements' arguments: sqlx would
/// copy each borrowed value once more to hand it to its connection thread.
// Boxed as the page's items hold them: unboxing would copy each event once more.
#[allow(clippy::vec_box)]
async fn upsert_events(
    tx: &mut sqlx::Transaction<'_, sqlx::Sqlite>,
    mailbox: MailboxId,
    events: Vec<Box<Event>>,
    round_id: i64,
    synced_at: &str,
) -> Result<u64, StoreError> {
    let written = events.len();
    let mut events = events.into_iter();
    for rows in statement_sizes(written) {
        let sql = UPSERT_EVENTS.get(rows, upsert_events_sql);
        // Sized once: binding 2,600 values one by one grows sqlx's argument vector a dozen
        // times, copying it each time (~2 % of a stored event's instructions).
        let mut args = SqliteArguments::default();
        args.reserve(rows * EVENT_COLUMNS, 0);
        // Each field moves out of its box: the event itself is not copied.
        for e in events.by_ref().take(rows) {
            add(&mut args, mailbox)?;
            add(&mut args, e.id)?;
            add(&mut args, e.ical_uid)?;
            add(&mut args, e.change_key)?;
            add(&mut args, e.etag)?;
            add(&mut args, e.last_modified.map(ts))?;
            add(&mut args, e.subject)?;
            add(&mut args, ts(e.start_utc))?;
            add(&mut args, ts(e.end_utc))?;
            add(&mut args, e.start_date.map(|d| d.to_string()))?;
            add(&mut args, e.end_date.map(|d| d.to_string()))?;
            add(&mut args, e.is_all_day)?;
            add(&mut args, e.is_cancelled)?;
            add(&mut args, e.show_as)?;
            add(&mut args, e.sensitivity)?;
            add(&mut args, e.event_type)?;
            add(&mut args, e.series_master_id)?;
            add(&mut args, e.organizer_name)?;
            add(&mut args, e.organizer_address)?;
            add(&mut args, e.attendees.into_json())?;
            add(&mut args, e.location)?;
            add(&mut args, categories_json(&e.categories))?;
            add(&mut args, e.web_link)?;
            add(&mut args, e.raw)?;
            add(&mut args, round_id)?;
            add(&mut args, synced_at)?;
        }
        sqlx::query_with(&sql, args).execute(&mut **tx).await?;
    }
    Ok(written as u64)
}

static UPSERT_EVENTS: TextByRows = TextByRows::new();

/// The events' multi-row upsert for `rows` rows of [`EVENT_COLUMNS`] parameters.
fn upsert_events_sql(rows: usize) -> String {
    let row = format!("({})", vec!["?"; EVENT_COLUMNS].join(", "));
    format!(
        "INSERT INTO events (mailbox_id, event_id, ical_uid, change_key, etag, last_modified, subject,
                 start_utc, end_utc, start_date, end_date, is_all_day, is_cancelled, show_as, sensitivity,
                 event_type, series_master_id, organizer_name, organizer_address, attendees, location,
                 categories, web_link, raw, seen_round, synced_at)
             VALUES {}
             ON CONFLICT (mailbox_id, event_id) DO UPDATE SET
                 ical_uid = excluded.ical_uid, change_key = excluded.change_key, etag = excluded.etag,
                 last_modified = excluded.last_modified, subject = excluded.subject,
                 start_utc = excluded.start_utc, end_utc = excluded.end_utc,
                 start_date = excluded.start_date, end_date = excluded.end_date,
                 is_all_day = excluded.is_all_day, is_cancelled = excluded.is_cancelled,
                 show_as = excluded.show_as, sensitivity = excluded.sensitivity,
                 event_type = excluded.event_type, series_master_id = excluded.series_master_id,
                 organizer_name = excluded.organizer_name, organizer_address = excluded.organizer_address,
                 attendees = excluded.attendees, location = excluded.location,
                 categories = excluded.categories, web_link = excluded.web_link, raw = excluded.raw,
                 seen_round = excluded.seen_round, synced_at = excluded.synced_at",
        vec![row; rows].join(", ")
    )
}

/// Adds one value to a statement's arguments; an encoding error is the statement's error.
fn add<'q, T>(args: &mut SqliteArguments<'q>, value: T) -> Result<(), StoreError>
where
    T: sqlx::Encode<'q, sqlx::Sqlite> + sqlx::Type<sqlx::Sqlite> + 'q,
{
    args.add(value)
        .map_err(|e| StoreError::from(sqlx::Error::Encode(e)))
}

/// Keeps (or counts again) an item that could not be understood.
async fn quarantine(
    tx: &mut sqlx::Transaction<'_, sqlx::Sqlite>,
    mailbox: MailboxId,
    item: &RejectedItem,
    round_id: i64,
    now: &str,
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO quarantine (mailbox_id, item_key, item_id, raw, reason, first_seen,
             last_seen, times_seen, seen_round)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?6, 1, ?7)
         ON CONFLICT (mailbox_id, item_key) DO UPDATE SET item_id = excluded.item_id,
             raw = excluded.raw, reason = excluded.reason, last_seen = excluded.last_seen,
             times_seen = quarantine.times_seen + 1, seen_round = excluded.seen_round",
    )
    .bind(mailbox)
    .bind(item.key())
    .bind(&item.id)
    .bind(&item.raw)
    .bind(&item.reason)
    .bind(now)
    .bind(round_id)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

fn categories_json(categories: &[String]) -> String {
    serde_json::to_string(categories).unwrap_or_else(|_| "[]".into())
}

/// Keeps the page's series masters and, for each that changed, gives every stored occurrence
/// of its series the master's fields again (their own id, times and stub stay): one
/// multi-row statement for the masters and one for the occurrences, not two per master.
async fn upsert_masters(
    tx: &mut sqlx::Transaction<'_, sqlx::Sqlite>,
    mailbox: MailboxId,
    writes: &[MasterWrite],
    round: &str,
    synced_at: &str,
) -> Result<(), StoreError> {
    let (masters, refills) = MasterWrite::last_of_each(writes, |w| w.master.id.as_str());
    for chunk in statement_chunks(&masters) {
        let sql = UPSERT_MASTERS.get(chunk.len(), upsert_masters_sql);
        let mut query = sqlx::query(&sql);
        for write in chunk {
            let m = &write.master;
            query = query
                .bind(mailbox)
                .bind(&m.id)
                .bind(&m.change_key)
                .bind(&m.raw)
                .bind(round)
                .bind(synced_at);
        }
        query.execute(&mut **tx).await?;
    }
    for chunk in statement_chunks(&refills) {
        let sql = REFILLS.get(chunk.len(), refill_sql);
        let mut query = sqlx::query(&sql);
        for write in chunk {
            let m = &write.master;
            query = query
                .bind(&m.id)
                .bind(&m.change_key)
                .bind(m.last_modified.map(ts))
                .bind(&m.subject)
                .bind(m.is_all_day)
                .bind(m.is_cancelled)
                .bind(&m.show_as)
                .bind(&m.sensitivity)
                .bind(&m.organizer_name)
                .bind(&m.organizer_address)
                .bind(m.attendees.as_json())
                .bind(&m.location)
                .bind(categories_json(&m.categories))
                .bind(&m.web_link);
        }
        query
            .bind(mailbox)
            .bind(synced_at)
            .execute(&mut **tx)
            .await?;
    }
    Ok(())
}

static UPSERT_MASTERS: TextByRows = TextByRows::new();
static REFILLS: TextByRows = TextByRows::new();

/// The series masters' multi-row upsert for `rows` masters.
fn upsert_masters_sql(rows: usize) -> String {
    format!(
        "INSERT INTO series_masters (mailbox_id, master_id, change_key, raw, checked_round, synced_at)
         VALUES {}
         ON CONFLICT (mailbox_id, master_id) DO UPDATE SET change_key = excluded.change_key,
             raw = excluded.raw, checked_round = excluded.checked_round,
             synced_at = excluded.synced_at",
        vec!["(?, ?, ?, ?, ?, ?)"; rows].join(", ")
    )
}

/// The refill of the occurrences of `masters` changed series, one VALUES row of 14 per
/// master (`column1` its id), then the mailbox and the time. The same fields
/// `OccurrenceStub::hydrate` takes from the master; an all-day series keeps its occurrences'
/// dates (their times are midnights). The occurrences are found first, master by master
/// through `events_by_series` (the CROSS JOIN keeps that order, MATERIALIZED keeps SQLite from
/// folding it into the update), then updated by rowid: left to itself, SQLite walked all of
/// the mailbox's events and compared each with every master.
fn refill_sql(masters: usize) -> String {
    format!(
        "WITH x AS MATERIALIZED (
             SELECT e.rowid AS rid, m.* FROM (VALUES {}) AS m CROSS JOIN events AS e
             WHERE e.mailbox_id = ? AND e.series_master_id = m.column1
               AND e.event_type = 'occurrence')
         UPDATE events SET change_key = x.column2, last_modified = x.column3,
             subject = x.column4, is_all_day = x.column5,
             start_date = CASE WHEN x.column5 THEN substr(events.start_utc, 1, 10) END,
             end_date = CASE WHEN x.column5 THEN substr(events.end_utc, 1, 10) END,
             is_cancelled = x.column6, show_as = x.column7, sensitivity = x.column8,
             organizer_name = x.column9, organizer_address = x.column10,
             attendees = x.column11, location = x.column12, categories = x.column13,
             web_link = x.column14, synced_at = ?
         FROM x WHERE events.rowid = x.rid",
        vec!["(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"; masters].join(", ")
    )
}

fn event_from_row(row: &SqliteRow) -> Result<Event, StoreError> {
    let start: String = row.try_get("start_utc")?;
    let end: String = row.try_get("end_utc")?;
    let json = |column: &str| -> Result<serde_json::Value, StoreError> {
        let text: String = row.try_get(column)?;
        serde_json::from_str(&text).map_err(|e| StoreError::Corrupt(format!("{column}: {e}")))
    };
    let categories = serde_json::from_value(json("categories")?)
        .map_err(|e| StoreError::Corrupt(format!("categories: {e}")))?;
    Ok(Event {
        id: row.try_get("event_id")?,
        ical_uid: row.try_get("ical_uid")?,
        change_key: row.try_get("change_key")?,
        etag: row.try_get("etag")?,
        last_modified: parse_opt_ts(row, "last_modified")?,
        subject: row.try_get("subject")?,
        start_utc: parse_ts("start_utc", &start)?,
        end_utc: parse_ts("end_utc", &end)?,
        start_date: parse_opt_date(row, "start_date")?,
        end_date: parse_opt_date(row, "end_date")?,
        is_all_day: row.try_get("is_all_day")?,
        is_cancelled: row.try_get("is_cancelled")?,
        show_as: row.try_get("show_as")?,
        sensitivity: row.try_get("sensitivity")?,
        event_type: row.try_get("event_type")?,
        series_master_id: row.try_get("series_master_id")?,
        organizer_name: row.try_get("organizer_name")?,
        organizer_address: row.try_get("organizer_address")?,
        attendees: Attendees::from_json(&row.try_get::<String, _>("attendees")?)
            .map_err(|e| StoreError::Corrupt(format!("attendees: {e}")))?,
        location: row.try_get("location")?,
        categories,
        web_link: row.try_get("web_link")?,
        raw: row.try_get("raw")?,
    })
}

/// `(mailbox_id, n)` rows of a per-mailbox `COUNT(*)` query, as a map.
async fn rows_per_mailbox(
    pool: &sqlx::SqlitePool,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_of_upserts_is_split_into_few_distinct_statement_sizes() {
        let mut sizes = std::collections::BTreeSet::new();
        for n in 0..=1000 {
            let split: Vec<usize> = statement_sizes(n).collect();
            assert_eq!(split.iter().sum::<usize>(), n, "{n}: {split:?}");
            assert!(split.len() <= n / UPSERT_CHUNK + 2, "{n}: {split:?}");
            sizes.extend(split);
        }
        let expected: std::collections::BTreeSet<usize> =
            (1..10).chain((10..=UPSERT_CHUNK).step_by(10)).collect();
        assert_eq!(sizes, expected);
        assert_eq!(statement_sizes(97).collect::<Vec<_>>(), [90, 7]);
    }

    /// Each row count's text is built once and then handed out as the same string; a count
    /// past the cache still gets the right text.
    #[test]
    fn a_statements_text_is_built_once_per_row_count() {
        let cache = TextByRows::new();
        let first = cache.get(3, upsert_events_sql);
        let again = cache.get(3, upsert_events_sql);
        assert!(matches!(again, Cow::Borrowed(_)));
        assert_eq!(first.as_ptr(), again.as_ptr(), "built twice");
        assert_eq!(first, upsert_events_sql(3));
        assert_eq!(first.matches('?').count(), 3 * EVENT_COLUMNS);
        assert_ne!(cache.get(4, upsert_events_sql), first);
        let past = cache.get(UPSERT_CHUNK + 1, upsert_masters_sql);
        assert!(matches!(past, Cow::Owned(_)));
        assert_eq!(past.matches('?').count(), (UPSERT_CHUNK + 1) * 6);
    }

    /// A refill looks up each changed master's occurrences through `events_by_series` and
    /// touches only those rows: it never walks the mailbox's other events.
    #[tokio::test]
    async fn a_refill_finds_occurrences_by_series_not_by_walking_the_mailbox() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = super::super::migrated_store(&dir.path().join("r.db"), 1).await;
        let plan: Vec<(i64, i64, i64, String)> =
            sqlx::query_as(&format!("EXPLAIN QUERY PLAN {}", refill_sql(3)))
                .fetch_all(&store.pool)
                .await
                .expect("plan");
        let steps: Vec<&str> = plan.iter().map(|(_, _, _, step)| step.as_str()).collect();
        assert!(
            steps.contains(
                &"SEARCH e USING INDEX events_by_series (mailbox_id=? AND series_master_id=?)"
            ),
            "{steps:?}"
        );
        assert!(
            steps.contains(&"SEARCH events USING INTEGER PRIMARY KEY (rowid=?)"),
            "{steps:?}"
        );
        assert!(!steps.iter().any(|s| s.starts_with("SCAN e")), "{steps:?}");
        assert!(
            !steps.iter().any(|s| s.starts_with("SCAN events")),
            "{steps:?}"
        );
        store.close().await;
    }
}
