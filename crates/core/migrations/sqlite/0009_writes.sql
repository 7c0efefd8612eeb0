-- Two-way sync (issue 14): the application's appointments, written to Outlook through calsync.
-- event_links holds one row per appointment (the application's external_id): the Graph
-- transactionId chosen at its create, the Graph event it became and the last changeKey/etag
-- calsync wrote or saw. writes is the durable outbox: each accepted create, update or cancel,
-- delivered in seq order by the mailbox's sync job. A write's body is what to write (personal
-- data); it is replaced by '{}' once the write has ended (delivered, failed or conflict).
CREATE TABLE event_links (
    mailbox_id     INTEGER NOT NULL REFERENCES mailboxes (id) ON DELETE CASCADE,
    external_id    TEXT    NOT NULL,                -- the application's id of the appointment
    transaction_id TEXT    NOT NULL,                -- Graph transactionId, fixed at the create
    graph_event_id TEXT,                            -- set when the create is delivered
    change_key     TEXT,
    etag           TEXT,
    fingerprint    TEXT,                            -- the event's content as calsync last wrote or saw it
    cancelled      INTEGER NOT NULL DEFAULT 0,      -- set when its cancel is queued
    created_at     TEXT    NOT NULL,
    updated_at     TEXT    NOT NULL,
    PRIMARY KEY (mailbox_id, external_id)
);
CREATE INDEX event_links_by_graph_id ON event_links (mailbox_id, graph_event_id);

CREATE TABLE writes (
    seq             INTEGER PRIMARY KEY AUTOINCREMENT, -- the delivery order
    id              TEXT    NOT NULL UNIQUE,        -- the write's id shown by the API
    mailbox_id      INTEGER NOT NULL REFERENCES mailboxes (id) ON DELETE CASCADE,
    external_id     TEXT    NOT NULL,
    op              TEXT    NOT NULL CHECK (op IN ('create', 'update', 'cancel')),
    idempotency_key TEXT    NOT NULL,
    request_hash    TEXT    NOT NULL,
    body            TEXT    NOT NULL,               -- JSON to write; '{}' once the write ended
    state           TEXT    NOT NULL DEFAULT 'queued'
                            CHECK (state IN ('queued', 'delivered', 'failed', 'conflict')),
    attempts        INTEGER NOT NULL DEFAULT 0,     -- tries that will be retried
    last_error      TEXT,
    conflict        TEXT,                           -- why Outlook's version was kept
    note            TEXT,                           -- what delivery remarked (e.g. already gone)
    graph_event_id  TEXT,
    created_at      TEXT    NOT NULL,
    updated_at      TEXT    NOT NULL,
    delivered_at    TEXT,
    UNIQUE (mailbox_id, idempotency_key),
    FOREIGN KEY (mailbox_id, external_id)
        REFERENCES event_links (mailbox_id, external_id) ON DELETE CASCADE
);
-- A mailbox's queued writes in delivery order; only queued rows are indexed.
CREATE INDEX writes_queued ON writes (mailbox_id, seq) WHERE state = 'queued';
-- The counts for metrics and health skip the delivered writes, the bulk of the table.
CREATE INDEX writes_not_delivered ON writes (mailbox_id) WHERE state <> 'delivered';
CREATE INDEX writes_of_event ON writes (mailbox_id, external_id, seq);

-- A wait Graph imposed on the mailbox (Retry-After): until then no sync request, change
-- notification or write brings its next run forward (calsync's own waits, an open breaker's
-- probe time or a rate limit, are not held: a job run sooner is simply deferred again). Set by the end of each
-- job (NULL when the job ended without one).
ALTER TABLE mailboxes ADD COLUMN hold_until TEXT;
