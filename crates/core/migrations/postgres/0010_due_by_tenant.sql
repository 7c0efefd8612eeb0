-- Due selection per tenant, from an index: the dispatcher takes at most a few due mailboxes of
-- each tenant, and with the old index (next_run_at alone) it had to read and sort every due
-- mailbox to find them. After an outage every mailbox is due at once, and with 100,000 of them
-- that was about a quarter of a second per dispatch, one dispatch per finished job.
-- A mailbox is in exactly one of the two indexes (a pending sync request or not), so each
-- write touches one index, as before.
DROP INDEX mailboxes_due;
CREATE INDEX mailboxes_due_by_tenant ON mailboxes (tenant, next_run_at, id)
    WHERE enabled AND sync_requested_at IS NULL;
CREATE INDEX mailboxes_requested_by_tenant ON mailboxes (tenant, next_run_at, id)
    WHERE enabled AND sync_requested_at IS NOT NULL;
