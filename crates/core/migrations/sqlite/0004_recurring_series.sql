-- Recurring series as Graph sends them in calendarView delta: occurrences arrive as stubs and are
-- stored complete, filled in from their series master; the masters are kept here, apart from the
-- calendar entries (a master is dated at its first occurrence, which may lie outside the window).
CREATE TABLE series_masters (
    mailbox_id    INTEGER NOT NULL REFERENCES mailboxes (id) ON DELETE CASCADE,
    master_id     TEXT    NOT NULL,
    change_key    TEXT,
    raw           TEXT    NOT NULL,                 -- the master as Graph sent it
    checked_round TEXT    NOT NULL,                 -- the delta round that last saw or fetched it
    synced_at     TEXT    NOT NULL,
    PRIMARY KEY (mailbox_id, master_id)
);
CREATE INDEX events_by_series ON events (mailbox_id, series_master_id)
    WHERE series_master_id IS NOT NULL;

ALTER TABLE events ADD COLUMN categories TEXT NOT NULL DEFAULT '[]'; -- JSON array of names

-- Repair a store written before occurrences were filled in: series masters stored as calendar
-- entries go, and every mailbox starts a full round (a moved window), whose reconciliation
-- rewrites each occurrence complete and removes what Graph no longer returns.
DELETE FROM events WHERE event_type = 'seriesMaster';
UPDATE mailboxes SET window_start = NULL, window_end = NULL, next_link = NULL, delta_link = NULL,
    round_full = 1;
