-- calsync store, SQLite. Timestamps are UTC text, fixed width: 2026-12-09T20:30:00.000Z,
-- so text order is time order. All-day event dates are YYYY-MM-DD.

CREATE TABLE mailboxes (
    id                   INTEGER PRIMARY KEY,
    tenant               TEXT    NOT NULL,          -- tenant name from the config
    user_id              TEXT    NOT NULL,          -- Graph user id or UPN
    source               TEXT    NOT NULL DEFAULT 'config',
    enabled              INTEGER NOT NULL DEFAULT 1,
    window_start         TEXT,                      -- the window the delta state covers
    window_end           TEXT,
    delta_link           TEXT,                      -- set when the last round completed
    next_link            TEXT,                      -- set while a round is in progress
    round_id             INTEGER NOT NULL DEFAULT 0,
    round_full           INTEGER NOT NULL DEFAULT 1, -- the round in progress reconciles at its end
    last_success_at      TEXT,
    last_attempt_at      TEXT,
    last_error           TEXT,
    last_error_at        TEXT,
    last_request_id      TEXT,
    consecutive_failures INTEGER NOT NULL DEFAULT 0,
    next_run_at          TEXT    NOT NULL,
    lease_owner          TEXT,
    lease_until          TEXT,
    created_at           TEXT    NOT NULL,
    UNIQUE (tenant, user_id)
);
CREATE INDEX mailboxes_due ON mailboxes (next_run_at) WHERE enabled = 1;

CREATE TABLE events (
    mailbox_id        INTEGER NOT NULL REFERENCES mailboxes (id) ON DELETE CASCADE,
    event_id          TEXT    NOT NULL,
    ical_uid          TEXT,
    change_key        TEXT,
    etag              TEXT,
    last_modified     TEXT,
    subject           TEXT,
    start_utc         TEXT    NOT NULL,
    end_utc           TEXT    NOT NULL,
    start_date        TEXT,                         -- all-day events only
    end_date          TEXT,                         -- all-day events only (exclusive)
    is_all_day        INTEGER NOT NULL,
    is_cancelled      INTEGER NOT NULL,
    show_as           TEXT,
    sensitivity       TEXT,
    event_type        TEXT,                         -- singleInstance|occurrence|exception|seriesMaster
    series_master_id  TEXT,
    organizer_name    TEXT,
    organizer_address TEXT,
    attendees         TEXT    NOT NULL,             -- JSON array
    location          TEXT,
    web_link          TEXT,
    raw               TEXT    NOT NULL,             -- the item as Graph sent it
    seen_round        INTEGER NOT NULL,
    synced_at         TEXT    NOT NULL,
    PRIMARY KEY (mailbox_id, event_id)
);
CREATE INDEX events_by_start ON events (mailbox_id, start_utc);

CREATE TABLE sync_runs (
    id          INTEGER PRIMARY KEY,
    mailbox_id  INTEGER NOT NULL REFERENCES mailboxes (id) ON DELETE CASCADE,
    started_at  TEXT    NOT NULL,
    finished_at TEXT    NOT NULL,
    outcome     TEXT    NOT NULL,                   -- ok | failed | deadline_exceeded | deferred
    full_round  INTEGER NOT NULL,
    pages       INTEGER NOT NULL,
    upserted    INTEGER NOT NULL,
    deleted     INTEGER NOT NULL,
    error       TEXT,
    request_id  TEXT
);
CREATE INDEX sync_runs_by_mailbox ON sync_runs (mailbox_id, id);
