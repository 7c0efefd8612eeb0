-- An immediate sync asked for (admin API, change notification): the oldest request not yet
-- served by a job that started after it. Due mailboxes with a request are dispatched first.
ALTER TABLE mailboxes ADD COLUMN sync_requested_at TEXT;
