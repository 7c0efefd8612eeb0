-- Items of a delta page calsync cannot understand are set aside here, with the reason, while the
-- rest of the page is applied and the cursor moves on: one bad item never stops its mailbox.
CREATE TABLE quarantine (
    mailbox_id  bigint      NOT NULL REFERENCES mailboxes (id) ON DELETE CASCADE,
    item_key    text        NOT NULL,                -- the Graph id, or sha256:<hex> of the item
    item_id     text,                                -- the Graph id, when the item has one
    raw         text        NOT NULL,                -- the item as Graph sent it
    reason      text        NOT NULL,
    first_seen  timestamptz NOT NULL,
    last_seen   timestamptz NOT NULL,
    times_seen  bigint      NOT NULL DEFAULT 1,
    seen_round  bigint      NOT NULL,
    PRIMARY KEY (mailbox_id, item_key)
);

-- A page that keeps failing the same way (not JSON, too large) at the same link: after
-- graph.page_failure_limit such failures in a row the mailbox starts a fresh round.
ALTER TABLE mailboxes ADD COLUMN failing_link text;    -- digest of the link and the failure
ALTER TABLE mailboxes ADD COLUMN failing_link_count integer NOT NULL DEFAULT 0;
ALTER TABLE mailboxes ADD COLUMN fresh_rounds_forced bigint NOT NULL DEFAULT 0;
