//! The admin API's mailbox list: keyset pages by id, read from the store a page at a time.

use super::contract::*;
use super::{MailboxId, MailboxRecord, PgStore, SqliteStore, Store, StoreError};

impl Store {
    /// Enabled mailboxes with an id above `after` (of `tenant` only, if given), by id, at most
    /// `limit`. One indexed range read, however many mailboxes the store holds.
    pub async fn mailboxes_page(
        &self,
        tenant: Option<&str>,
        after: MailboxId,
        limit: u32,
    ) -> Result<Vec<MailboxRecord>, StoreError> {
        match self {
            Store::Sqlite(s) => s.mailboxes_page(tenant, after, limit).await,
            Store::Postgres(s) => s.mailboxes_page(tenant, after, limit).await,
        }
    }
}

impl MailboxPages for SqliteStore {
    async fn mailboxes_page(
        &self,
        tenant: Option<&str>,
        after: MailboxId,
        limit: u32,
    ) -> Result<Vec<MailboxRecord>, StoreError> {
        let rows = sqlx::query(concat!(
            "SELECT ",
            super::mailbox_columns!(),
            " FROM mailboxes
             WHERE enabled = 1 AND id > ?1 AND (?2 IS NULL OR tenant = ?2)
             ORDER BY id LIMIT ?3"
        ))
        .bind(after)
        .bind(tenant)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(super::sqlite::mailbox_from_row).collect()
    }
}

impl MailboxPages for PgStore {
    async fn mailboxes_page(
        &self,
        tenant: Option<&str>,
        after: MailboxId,
        limit: u32,
    ) -> Result<Vec<MailboxRecord>, StoreError> {
        let rows = sqlx::query(concat!(
            "SELECT ",
            super::mailbox_columns!(),
            " FROM mailboxes
             WHERE enabled AND id > $1 AND ($2::text IS NULL OR tenant = $2)
             ORDER BY id LIMIT $3"
        ))
        .bind(after)
        .bind(tenant.map(super::postgres::text))
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(super::postgres::mailbox_from_row).collect()
    }
}
