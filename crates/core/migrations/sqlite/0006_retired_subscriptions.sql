-- Graph subscriptions of mailboxes that were removed or disabled: kept until Graph confirms
-- their deletion, so a removed mailbox does not go on being notified until its subscription
-- expires. next_attempt_at doubles as a short claim, as in subscriptions.
CREATE TABLE retired_subscriptions (
    subscription_id      TEXT    PRIMARY KEY,
    tenant               TEXT    NOT NULL,
    user_id              TEXT    NOT NULL,
    retired_at           TEXT    NOT NULL,
    last_error           TEXT,
    consecutive_failures INTEGER NOT NULL DEFAULT 0,
    next_attempt_at      TEXT    NOT NULL
);
