-- The stored JSON compressed with lz4 instead of pglz, where the server has it (PostgreSQL 14
-- and later, built with lz4, as the Debian, Ubuntu and Docker Hub builds are). A stored event's
-- row is ~2 KB, past PostgreSQL's threshold for compressing its largest value, so every upsert
-- compressed its raw JSON, and pglz was the server's largest single cost of a page write:
-- `calsync bench --replicas 1` spent about a sixth less of PostgreSQL's CPU per stored event
-- with lz4 (BENCHMARKS.md). Values already stored keep their pglz compression and read as
-- before; each is compressed with lz4 when it is next written.
-- The change is to the catalog only (no rewrite), under the table's lock for a moment. Without
-- lz4 (an older server, or one built without it) nothing changes. The statements are strings
-- run by EXECUTE: PL/pgSQL checks the syntax of its static statements before running any, and
-- a server older than 14 does not know SET COMPRESSION.
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_settings
               WHERE name = 'default_toast_compression' AND 'lz4' = ANY (enumvals)) THEN
        EXECUTE 'ALTER TABLE events ALTER COLUMN raw SET COMPRESSION lz4, '
                'ALTER COLUMN attendees SET COMPRESSION lz4';
        EXECUTE 'ALTER TABLE series_masters ALTER COLUMN raw SET COMPRESSION lz4';
        EXECUTE 'ALTER TABLE quarantine ALTER COLUMN raw SET COMPRESSION lz4';
    END IF;
END
$$;
