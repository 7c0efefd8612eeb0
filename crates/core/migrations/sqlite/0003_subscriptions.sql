-- Graph change-notification subscriptions, one per mailbox. A row exists once calsync has
-- tried to subscribe; subscription_id is NULL until Graph accepted one (or after it was
-- removed). next_attempt_at doubles as a short claim, so one replica works on a row at a time.
CREATE TABLE subscriptions (
    mailbox_id           INTEGER PRIMARY KEY REFERENCES mailboxes (id) ON DELETE CASCADE,
    subscription_id      TEXT UNIQUE,
    client_state         TEXT,                      -- random per subscription; secret
    expires_at           TEXT,
    created_at           TEXT,
    renewed_at           TEXT,
    renew_requested      INTEGER NOT NULL DEFAULT 0, -- lifecycle reauthorizationRequired
    last_error           TEXT,
    last_error_at        TEXT,
    consecutive_failures INTEGER NOT NULL DEFAULT 0,
    next_attempt_at      TEXT    NOT NULL
);
CREATE INDEX subscriptions_expiry ON subscriptions (expires_at);
