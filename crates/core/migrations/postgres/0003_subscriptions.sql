-- Graph change-notification subscriptions, one per mailbox. A row exists once calsync has
-- tried to subscribe; subscription_id is NULL until Graph accepted one (or after it was
-- removed). next_attempt_at doubles as a short claim, so one replica works on a row at a time.
CREATE TABLE subscriptions (
    mailbox_id           bigint      PRIMARY KEY REFERENCES mailboxes (id) ON DELETE CASCADE,
    subscription_id      text        UNIQUE,
    client_state         text,                           -- random per subscription; secret
    expires_at           timestamptz,
    created_at           timestamptz,
    renewed_at           timestamptz,
    renew_requested      boolean     NOT NULL DEFAULT false, -- lifecycle reauthorizationRequired
    last_error           text,
    last_error_at        timestamptz,
    consecutive_failures integer     NOT NULL DEFAULT 0,
    next_attempt_at      timestamptz NOT NULL
);
CREATE INDEX subscriptions_expiry ON subscriptions (expires_at);
