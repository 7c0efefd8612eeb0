//! SqliteStore: the outbox of two-way sync (writes and their appointments' links).
//!
//! Every write goes through the one writer connection in a `BEGIN IMMEDIATE` transaction, so
//! enqueues are serialised: the idempotency and link checks see every write stored before.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use sqlx::sqlite::SqliteRow;
use sqlx::Row;

use crate::store::contract::*;
use crate::store::writes::{attempts_of, op_of, reason_text, state_of, write_columns, Recorded};
use crate::store::{
    Enqueued, EventLink, Lease, MailboxId, NewWrite, PendingWrite, StoreError, WriteCounts,
    WriteOp, WriteRecord, WriteResult,
};
// The backend itself and its helpers (timestamps, text cleaning).
use super::*;

impl WriteStore for SqliteStore {
    async fn enqueue_write(&self, write: &NewWrite<'_>) -> Result<Enqueued, StoreError> {
        let now = ts(write.now);
        // Returning early drops the transaction: nothing of it is kept.
        let mut tx = self.writer.begin_with("BEGIN IMMEDIATE").await?;
        let enabled: Option<bool> =
            sqlx::query_scalar("SELECT enabled FROM mailboxes WHERE id = ?1")
                .bind(write.mailbox)
                .fetch_optional(&mut *tx)
                .await?;
        match enabled {
            None => return Ok(Enqueued::NoMailbox),
            Some(false) => return Ok(Enqueued::MailboxDisabled),
            Some(true) => {}
        }
        let earlier = sqlx::query(concat!(
            "SELECT request_hash, ",
            write_columns!(),
            " FROM writes WHERE mailbox_id = ?1 AND idempotency_key = ?2"
        ))
        .bind(write.mailbox)
        .bind(write.idempotency_key)
        .fetch_optional(&mut *tx)
        .await?;
        if let Some(row) = earlier {
            let same = row.try_get::<String, _>("request_hash")? == write.request_hash;
            let record = record_from_row(&row)?;
            return Ok(if same {
                Enqueued::Replay(record)
            } else {
                Enqueued::KeyReused(record)
            });
        }
        let cancelled: Option<bool> = sqlx::query_scalar(
            "SELECT cancelled FROM event_links WHERE mailbox_id = ?1 AND external_id = ?2",
        )
        .bind(write.mailbox)
        .bind(write.external_id)
        .fetch_optional(&mut *tx)
        .await?;
        // A queued cancel has marked its link already, so `cancelled` covers it.
        match (write.op, cancelled) {
            (WriteOp::Create, Some(_)) => return Ok(Enqueued::EventExists),
            (WriteOp::Create, None) => {
                sqlx::query(
                    "INSERT INTO event_links (mailbox_id, external_id, transaction_id, created_at,
                         updated_at)
                     VALUES (?1, ?2, ?3, ?4, ?4)",
                )
                .bind(write.mailbox)
                .bind(write.external_id)
                .bind(write.transaction_id)
                .bind(&now)
                .execute(&mut *tx)
                .await?;
            }
            (_, None) => return Ok(Enqueued::NoSuchEvent),
            (_, Some(true)) => return Ok(Enqueued::EventCancelled),
            (WriteOp::Update, Some(false)) => {}
            (WriteOp::Cancel, Some(false)) => {
                sqlx::query(
                    "UPDATE event_links SET cancelled = 1, updated_at = ?3
                     WHERE mailbox_id = ?1 AND external_id = ?2",
                )
                .bind(write.mailbox)
                .bind(write.external_id)
                .bind(&now)
                .execute(&mut *tx)
                .await?;
            }
        }
        let row = sqlx::query(concat!(
            "INSERT INTO writes (id, mailbox_id, external_id, op, idempotency_key, request_hash,
                 body, state, created_at, updated_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, 'queued', ?8, ?8)
             RETURNING ",
            write_columns!()
        ))
        .bind(write.id)
        .bind(write.mailbox)
        .bind(write.external_id)
        .bind(write.op.as_str())
        .bind(write.idempotency_key)
        .bind(write.request_hash)
        .bind(write.body)
        .bind(&now)
        .fetch_one(&mut *tx)
        .await?;
        // A sync request even if one is pending: the job that serves that one may have started
        // before this write, and keeps the mailbox due (see `finish_job`).
        sqlx::query(concat!(
            "UPDATE mailboxes SET sync_requested_at = COALESCE(sync_requested_at, ?2), next_run_at = ",
            crate::store::requested_next_run!(sqlite),
            " WHERE id = ?1"
        ))
        .bind(write.mailbox)
        .bind(&now)
        .execute(&mut *tx)
        .await?;
        let record = record_from_row(&row)?;
        tx.commit().await?;
        Ok(Enqueued::New(record))
    }

    async fn pending_writes(
        &self,
        mailbox: MailboxId,
        limit: u32,
    ) -> Result<Vec<PendingWrite>, StoreError> {
        let rows = sqlx::query(
            "SELECT w.id, w.seq, w.external_id, w.op, w.body, w.attempts, w.created_at,
                 l.transaction_id, l.graph_event_id, l.change_key, l.etag, l.fingerprint
             FROM writes w JOIN event_links l
                 ON l.mailbox_id = w.mailbox_id AND l.external_id = w.external_id
             WHERE w.mailbox_id = ?1 AND w.state = 'queued'
             ORDER BY w.seq LIMIT ?2",
        )
        .bind(mailbox)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                let op: String = row.try_get("op")?;
                let created: String = row.try_get("created_at")?;
                Ok(PendingWrite {
                    id: row.try_get("id")?,
                    seq: row.try_get("seq")?,
                    external_id: row.try_get("external_id")?,
                    op: op_of(&op)?,
                    body: row.try_get("body")?,
                    attempts: attempts_of(row.try_get("attempts")?),
                    created_at: parse_ts("created_at", &created)?,
                    transaction_id: row.try_get("transaction_id")?,
                    graph_event_id: row.try_get("graph_event_id")?,
                    change_key: row.try_get("change_key")?,
                    etag: row.try_get("etag")?,
                    fingerprint: row.try_get("fingerprint")?,
                })
            })
            .collect()
    }

    async fn record_write(
        &self,
        lease: &Lease,
        write_id: &str,
        result: &WriteResult,
        now: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        let mut tx = self.writer.begin_with("BEGIN IMMEDIATE").await?;
        let held = sqlx::query("SELECT 1 FROM mailboxes WHERE id = ?1 AND lease_owner = ?2")
            .bind(lease.mailbox)
            .bind(&lease.owner)
            .fetch_optional(&mut *tx)
            .await?;
        if held.is_none() {
            return Err(StoreError::LeaseLost(lease.mailbox));
        }
        let queued = sqlx::query(
            "SELECT op, external_id FROM writes
             WHERE id = ?1 AND mailbox_id = ?2 AND state = 'queued'",
        )
        .bind(write_id)
        .bind(lease.mailbox)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(queued) = queued else {
            // Recorded before (a job repeating itself): the first result stands.
            return Ok(());
        };
        let op = op_of(&queued.try_get::<String, _>("op")?)?;
        let external_id: String = queued.try_get("external_id")?;
        let recorded = Recorded::of(result, op);
        let now = ts(now);
        if recorded.changes_link() {
            sqlx::query(
                "UPDATE event_links SET graph_event_id = COALESCE(?3, graph_event_id),
                     change_key = COALESCE(?4, change_key), etag = COALESCE(?5, etag),
                     cancelled = COALESCE(?6, cancelled), updated_at = ?7,
                     fingerprint = COALESCE(?8, fingerprint)
                 WHERE mailbox_id = ?1 AND external_id = ?2",
            )
            .bind(lease.mailbox)
            .bind(&external_id)
            .bind(recorded.graph_event_id)
            .bind(recorded.change_key)
            .bind(recorded.etag)
            .bind(recorded.cancelled)
            .bind(&now)
            .bind(recorded.fingerprint)
            .execute(&mut *tx)
            .await?;
        }
        let ended = recorded.state.is_final();
        sqlx::query(
            "UPDATE writes SET state = ?2, attempts = attempts + ?3,
                 last_error = COALESCE(?4, last_error), conflict = COALESCE(?5, conflict),
                 note = COALESCE(?6, note),
                 graph_event_id = (SELECT l.graph_event_id FROM event_links l
                     WHERE l.mailbox_id = writes.mailbox_id AND l.external_id = writes.external_id),
                 body = CASE WHEN ?7 THEN '{}' ELSE body END,
                 delivered_at = CASE WHEN ?2 = 'delivered' THEN ?8 ELSE delivered_at END,
                 updated_at = ?8
             WHERE id = ?1",
        )
        .bind(write_id)
        .bind(recorded.state.as_str())
        .bind(recorded.attempts)
        .bind(reason_text(recorded.last_error))
        .bind(reason_text(recorded.conflict))
        .bind(reason_text(recorded.note))
        .bind(ended)
        .bind(&now)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn write_by_id(&self, id: &str) -> Result<Option<WriteRecord>, StoreError> {
        let row = sqlx::query(concat!(
            "SELECT ",
            write_columns!(),
            " FROM writes WHERE id = ?1"
        ))
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(record_from_row).transpose()
    }

    async fn event_link(
        &self,
        mailbox: MailboxId,
        external_id: &str,
    ) -> Result<Option<EventLink>, StoreError> {
        let row = sqlx::query(
            "SELECT mailbox_id, external_id, transaction_id, graph_event_id, change_key, etag,
                 cancelled, created_at, updated_at
             FROM event_links WHERE mailbox_id = ?1 AND external_id = ?2",
        )
        .bind(mailbox)
        .bind(external_id)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|row| {
            let created: String = row.try_get("created_at")?;
            let updated: String = row.try_get("updated_at")?;
            Ok(EventLink {
                mailbox_id: row.try_get("mailbox_id")?,
                external_id: row.try_get("external_id")?,
                transaction_id: row.try_get("transaction_id")?,
                graph_event_id: row.try_get("graph_event_id")?,
                change_key: row.try_get("change_key")?,
                etag: row.try_get("etag")?,
                cancelled: row.try_get("cancelled")?,
                created_at: parse_ts("created_at", &created)?,
                updated_at: parse_ts("updated_at", &updated)?,
            })
        })
        .transpose()
    }

    async fn prune_writes(&self, before: DateTime<Utc>) -> Result<u64, StoreError> {
        let done = sqlx::query("DELETE FROM writes WHERE state <> 'queued' AND updated_at < ?1")
            .bind(ts(before))
            .execute(&self.writer)
            .await?;
        Ok(done.rows_affected())
    }

    async fn write_counts(&self) -> Result<HashMap<String, WriteCounts>, StoreError> {
        // `state <> 'delivered'` as the partial index says it, so the index serves the scan.
        let rows = sqlx::query(
            "SELECT m.tenant,
                 SUM(w.state = 'queued') AS queued,
                 MIN(CASE WHEN w.state = 'queued' THEN w.created_at END) AS oldest_queued_at,
                 SUM(w.state = 'failed') AS failed,
                 SUM(w.state = 'conflict') AS conflict
             FROM writes w JOIN mailboxes m ON m.id = w.mailbox_id
             WHERE w.state <> 'delivered'
             GROUP BY m.tenant",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                let count = |column| crate::store::count_of(row, column);
                Ok((
                    row.try_get("tenant")?,
                    WriteCounts {
                        queued: count("queued")?,
                        oldest_queued_at: parse_opt_ts(row, "oldest_queued_at")?,
                        failed: count("failed")?,
                        conflict: count("conflict")?,
                    },
                ))
            })
            .collect()
    }

    async fn writes_of_event(
        &self,
        mailbox: MailboxId,
        external_id: &str,
        limit: u32,
    ) -> Result<Vec<WriteRecord>, StoreError> {
        let rows = sqlx::query(concat!(
            "SELECT ",
            write_columns!(),
            " FROM writes WHERE mailbox_id = ?1 AND external_id = ?2 ORDER BY seq DESC LIMIT ?3"
        ))
        .bind(mailbox)
        .bind(external_id)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(record_from_row).collect()
    }
}

fn record_from_row(row: &SqliteRow) -> Result<WriteRecord, StoreError> {
    let op: String = row.try_get("op")?;
    let state: String = row.try_get("state")?;
    let created: String = row.try_get("created_at")?;
    let updated: String = row.try_get("updated_at")?;
    Ok(WriteRecord {
        id: row.try_get("id")?,
        mailbox_id: row.try_get("mailbox_id")?,
        external_id: row.try_get("external_id")?,
        op: op_of(&op)?,
        state: state_of(&state)?,
        attempts: attempts_of(row.try_get("attempts")?),
        graph_event_id: row.try_get("graph_event_id")?,
        last_error: row.try_get("last_error")?,
        conflict: row.try_get("conflict")?,
        note: row.try_get("note")?,
        created_at: parse_ts("created_at", &created)?,
        updated_at: parse_ts("updated_at", &updated)?,
        delivered_at: parse_opt_ts(row, "delivered_at")?,
    })
}
