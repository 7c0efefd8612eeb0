-- Graph subscriptions of mailboxes that were removed or disabled: kept until Graph confirms
-- their deletion, so a removed mailbox does not go on being notified until its subscription
-- expires. next_attempt_at doubles as a short claim, as in subscriptions.
CREATE TABLE retired_subscriptions (
    subscription_id      text        PRIMARY KEY,
    tenant               text        NOT NULL,
    user_id              text        NOT NULL,
    retired_at           timestamptz NOT NULL,
    last_error           text,
    consecutive_failures integer     NOT NULL DEFAULT 0,
    next_attempt_at      timestamptz NOT NULL
);
