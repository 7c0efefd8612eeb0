-- Items of a delta page calsync cannot understand are set aside here, with the reason, while the
-- rest of the page is applied and the cursor moves on: one bad item never stops its mailbox.
CREATE TABLE quarantine (
    mailbox_id  INTEGER NOT NULL REFERENCES mailboxes (id) ON DELETE CASCADE,
    item_key    TEXT    NOT NULL,                   -- the Graph id, or sha256:<hex> of the item
    item_id     TEXT,                               -- the Graph id, when the item has one
    raw         TEXT    NOT NULL,                   -- the item as Graph sent it
    reason      TEXT    NOT NULL,
    first_seen  TEXT    NOT NULL,
    last_seen   TEXT    NOT NULL,
    times_seen  INTEGER NOT NULL DEFAULT 1,
    seen_round  INTEGER NOT NULL,
    PRIMARY KEY (mailbox_id, item_key)
);

-- A page that keeps failing the same way (not JSON, too large) at the same link: after
-- graph.page_failure_limit such failures in a row the mailbox starts a fresh round.
ALTER TABLE mailboxes ADD COLUMN failing_link TEXT;    -- digest of the link and the failure
ALTER TABLE mailboxes ADD COLUMN failing_link_count INTEGER NOT NULL DEFAULT 0;
ALTER TABLE mailboxes ADD COLUMN fresh_rounds_forced INTEGER NOT NULL DEFAULT 0;
