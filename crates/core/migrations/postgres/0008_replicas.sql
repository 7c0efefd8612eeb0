-- The running calsync processes (replicas) sharing this store, so they can share Graph's
-- app-wide and per-tenant request rates: each heartbeats its row; a row whose heartbeat is older
-- than one lease period (sync.lease_ttl) is a dead replica's. keeps_share_of is what the replica
-- promises the others: from the time the row was written its requests stay within
-- limit / keeps_share_of in every 1-second window (NULL: it sends none at all).
CREATE TABLE replicas (
    replica_id     text        PRIMARY KEY,
    started_at     timestamptz NOT NULL,
    heartbeat_at   timestamptz NOT NULL,
    keeps_share_of integer
);
