-- calsync store, PostgreSQL: the same tables as SQLite's, with native types (timestamptz,
-- boolean, date, jsonb attendees, bigserial ids). Several replicas share these tables; a
-- mailbox is worked on only under its lease (lease_owner, lease_until), and every write of a
-- job is fenced on lease_owner under the mailbox row's lock.

CREATE TABLE mailboxes (
    id                   bigserial   PRIMARY KEY,
    tenant               text        NOT NULL,           -- tenant name from the config
    user_id              text        NOT NULL,           -- Graph user id or UPN
    source               text        NOT NULL DEFAULT 'config',
    enabled              boolean     NOT NULL DEFAULT true,
    window_start         timestamptz,                    -- the window the delta state covers
    window_end           timestamptz,
    delta_link           text,                           -- set when the last round completed
    next_link            text,                           -- set while a round is in progress
    round_id             bigint      NOT NULL DEFAULT 0,
    round_full           boolean     NOT NULL DEFAULT true, -- the round in progress reconciles at its end
    last_success_at      timestamptz,
    last_attempt_at      timestamptz,
    last_error           text,
    last_error_at        timestamptz,
    last_request_id      text,
    consecutive_failures integer     NOT NULL DEFAULT 0,
    next_run_at          timestamptz NOT NULL,
    lease_owner          text,
    lease_until          timestamptz,
    created_at           timestamptz NOT NULL,
    UNIQUE (tenant, user_id)
);
-- Due selection: enabled mailboxes whose next_run_at has come, oldest first.
CREATE INDEX mailboxes_due ON mailboxes (next_run_at, id) WHERE enabled;

CREATE TABLE events (
    mailbox_id        bigint      NOT NULL REFERENCES mailboxes (id) ON DELETE CASCADE,
    event_id          text        NOT NULL,
    ical_uid          text,
    change_key        text,
    etag              text,
    last_modified     timestamptz,
    subject           text,
    start_utc         timestamptz NOT NULL,
    end_utc           timestamptz NOT NULL,
    start_date        date,                              -- all-day events only
    end_date          date,                              -- all-day events only (exclusive)
    is_all_day        boolean     NOT NULL,
    is_cancelled      boolean     NOT NULL,
    show_as           text,
    sensitivity       text,
    event_type        text,                              -- singleInstance|occurrence|exception|seriesMaster
    series_master_id  text,
    organizer_name    text,
    organizer_address text,
    attendees         jsonb       NOT NULL,              -- [{"name","address","type","response"}]
    location          text,
    web_link          text,
    raw               text        NOT NULL,              -- the item exactly as Graph sent it (text, not jsonb, to keep it byte for byte)
    seen_round        bigint      NOT NULL,
    synced_at         timestamptz NOT NULL,
    PRIMARY KEY (mailbox_id, event_id)
);
CREATE INDEX events_by_start ON events (mailbox_id, start_utc);

CREATE TABLE sync_runs (
    id          bigserial   PRIMARY KEY,
    mailbox_id  bigint      NOT NULL REFERENCES mailboxes (id) ON DELETE CASCADE,
    started_at  timestamptz NOT NULL,
    finished_at timestamptz NOT NULL,
    outcome     text        NOT NULL,                    -- ok | failed | deadline_exceeded | deferred
    full_round  boolean     NOT NULL,
    pages       bigint      NOT NULL,
    upserted    bigint      NOT NULL,
    deleted     bigint      NOT NULL,
    error       text,
    request_id  text
);
CREATE INDEX sync_runs_by_mailbox ON sync_runs (mailbox_id, id);
