-- The log partitioned by month of received_at, so that retention (`relay retention`) drops whole
-- partitions instead of editing rows. Converts an existing log in place: its rows are copied,
-- unchanged (seq included), into the partitioned table, and the old table is dropped.
--
-- A unique index on a partitioned table must contain the partition key, so webhook_id
-- uniqueness moves to webhook_ids: one small row per delivery, claimed in the same statement as
-- the insert (relay_append) and kept when partitions are retired, so a very late retry of a
-- retired delivery is still a duplicate.

ALTER TABLE events RENAME TO events_unpartitioned;
ALTER TABLE events_unpartitioned RENAME CONSTRAINT events_pkey TO events_unpartitioned_pkey;
ALTER TABLE events_unpartitioned RENAME CONSTRAINT events_webhook_id_key TO events_unpartitioned_webhook_id_key;
ALTER INDEX events_prediction_seq RENAME TO events_unpartitioned_prediction_seq;
ALTER INDEX events_status_seq RENAME TO events_unpartitioned_status_seq;
ALTER INDEX events_source_seq RENAME TO events_unpartitioned_source_seq;
ALTER INDEX events_received_at RENAME TO events_unpartitioned_received_at;

-- seq keeps its meaning: strictly increasing, assigned under relay_append's advisory lock.
CREATE SEQUENCE events_seq AS bigint;
SELECT setval('events_seq', coalesce((SELECT max(seq) FROM events_unpartitioned), 0) + 1, false);

CREATE TABLE events (
    seq               bigint      NOT NULL DEFAULT nextval('events_seq'),
    webhook_id        text        NOT NULL,
    prediction_id     text        NOT NULL,
    status            text        NOT NULL,
    source            text        NOT NULL CHECK (source IN ('webhook', 'reconcile', 'erasure')),
    body              bytea       NOT NULL,
    encrypted         boolean     NOT NULL DEFAULT false,
    webhook_timestamp timestamptz,
    received_at       timestamptz NOT NULL,
    PRIMARY KEY (seq, received_at)
) PARTITION BY RANGE (received_at);
ALTER SEQUENCE events_seq OWNED BY events.seq;

-- Rows of a month that has no partition yet land here; partitions are made months ahead
-- (relay_create_partitions at migrate time and daily by the service), so it stays empty.
CREATE TABLE events_default PARTITION OF events DEFAULT;

CREATE INDEX events_prediction_seq ON events (prediction_id, seq);
CREATE INDEX events_status_seq ON events (status, seq);
CREATE INDEX events_source_seq ON events (source, seq);
CREATE INDEX events_received_at ON events (received_at, seq);
CREATE INDEX events_webhook_id ON events (webhook_id);

CREATE TRIGGER events_no_update_delete BEFORE UPDATE OR DELETE ON events
    FOR EACH ROW EXECUTE FUNCTION events_refuse_change();
CREATE TRIGGER events_no_truncate BEFORE TRUNCATE ON events
    FOR EACH STATEMENT EXECUTE FUNCTION events_refuse_change();

CREATE TABLE webhook_ids (
    webhook_id text   PRIMARY KEY,
    seq        bigint NOT NULL
);

-- The monthly partitions (UTC months) covering [first, last]; a month whose rows already sit in
-- the default partition is skipped (Postgres would refuse it), and says so. Owner's rights, so
-- the service's role (relay_app, which may not create tables) can keep partitions ahead.
CREATE FUNCTION relay_create_partitions(first timestamptz, last timestamptz) RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp AS $$
DECLARE
    month timestamptz := date_trunc('month', first AT TIME ZONE 'UTC') AT TIME ZONE 'UTC';
    name text;
    made integer := 0;
BEGIN
    WHILE month <= last LOOP
        name := 'events_' || to_char(month AT TIME ZONE 'UTC', 'YYYY_MM');
        IF to_regclass(name) IS NULL THEN
            IF EXISTS (SELECT 1 FROM events_default
                       WHERE received_at >= month AND received_at < month + interval '1 month') THEN
                RAISE NOTICE 'partition % skipped: its rows are in events_default', name;
            ELSE
                EXECUTE format('CREATE TABLE %I PARTITION OF events FOR VALUES FROM (%L) TO (%L)',
                               name, month, month + interval '1 month');
                made := made + 1;
            END IF;
        END IF;
        month := month + interval '1 month';
    END LOOP;
    RETURN made;
END $$;

SELECT relay_create_partitions(
    least(coalesce((SELECT min(received_at) FROM events_unpartitioned), now()), now()),
    now() + interval '3 months'
);

INSERT INTO events (seq, webhook_id, prediction_id, status, source, body, encrypted,
                    webhook_timestamp, received_at)
SELECT seq, webhook_id, prediction_id, status, source, body, encrypted, webhook_timestamp, received_at
FROM events_unpartitioned ORDER BY seq;
INSERT INTO webhook_ids (webhook_id, seq) SELECT webhook_id, seq FROM events_unpartitioned;
DROP TABLE events_unpartitioned;

-- relay_append (030) over the partitioned log: a webhook-id is claimed in webhook_ids, and only
-- claimed rows are inserted. Everything else (lock, projection, notify, duplicates) is unchanged.
CREATE OR REPLACE FUNCTION relay_append(
    webhook_ids text[], prediction_ids text[], statuses text[], sources text[], bodies bytea[],
    encrypted_flags boolean[], webhook_timestamps timestamptz[], received timestamptz[],
    ranks smallint[], models text[], predict_times double precision[],
    seq_lock bigint, channel text
) RETURNS TABLE (ord bigint, seq bigint, duplicate boolean)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    new_seqs bigint[];
    new_ords bigint[];
BEGIN
    PERFORM pg_advisory_xact_lock(seq_lock);

    -- Seqs are taken in input order (one materialised pass: nextval is volatile); a duplicate
    -- leaves a gap, as an identity column did.
    WITH batch AS (
        SELECT DISTINCT ON (b.w) b.*
        FROM unnest(webhook_ids, prediction_ids, statuses, sources, bodies, encrypted_flags,
                    webhook_timestamps, received) WITH ORDINALITY AS b(w, p, s, src, body, enc, wt, ra, o)
        ORDER BY b.w, b.o
    ), numbered AS (
        SELECT ordered.*, nextval('events_seq') AS seq
        FROM (SELECT * FROM batch ORDER BY o) ordered
    ), claimed AS (
        INSERT INTO webhook_ids AS w (webhook_id, seq)
        SELECT n.w, n.seq FROM numbered n ORDER BY n.o
        ON CONFLICT (webhook_id) DO NOTHING
        RETURNING w.webhook_id, w.seq
    ), inserted AS (
        INSERT INTO events (seq, webhook_id, prediction_id, status, source, body, encrypted,
                            webhook_timestamp, received_at)
        SELECT n.seq, n.w, n.p, n.s, n.src, n.body, n.enc, n.wt, n.ra
        FROM numbered n JOIN claimed c ON c.webhook_id = n.w
        ORDER BY n.o
    )
    SELECT array_agg(n.seq ORDER BY n.seq), array_agg(n.o ORDER BY n.seq) INTO new_seqs, new_ords
    FROM numbered n JOIN claimed c ON c.webhook_id = n.w;

    IF new_seqs IS NOT NULL THEN
        WITH new_rows AS (
            SELECT n.seq, n.o, prediction_ids[n.o] AS p, statuses[n.o] AS s, ranks[n.o] AS r,
                   models[n.o] AS m, predict_times[n.o] AS pt, received[n.o] AS ra
            FROM unnest(new_seqs, new_ords) AS n(seq, o)
        ), changes AS (
            SELECT DISTINCT ON (p) p, s, r, seq AS state_seq, pt, ra,
                   min(seq) OVER per AS first_seq, max(seq) OVER per AS last_seq,
                   count(*) OVER per AS n_events,
                   coalesce(m, first_value(m) OVER (PARTITION BY p ORDER BY m IS NULL, seq
                            ROWS BETWEEN UNBOUNDED PRECEDING AND UNBOUNDED FOLLOWING)) AS m
            FROM new_rows
            WINDOW per AS (PARTITION BY p)
            ORDER BY p, r DESC, CASE WHEN r < 3 THEN -seq ELSE seq END
        )
        INSERT INTO predictions AS pr (prediction_id, status, status_rank, state_seq, first_seq,
                                       last_seq, event_count, model, predict_time,
                                       first_received_at, updated_at)
        SELECT p, s, r, state_seq, first_seq, last_seq, n_events, m, pt, ra, ra FROM changes
        ON CONFLICT (prediction_id) DO UPDATE SET
            status = CASE WHEN relay_supersedes(excluded.status_rank, pr.status_rank)
                         THEN excluded.status ELSE pr.status END,
            status_rank = CASE WHEN relay_supersedes(excluded.status_rank, pr.status_rank)
                              THEN excluded.status_rank ELSE pr.status_rank END,
            state_seq = CASE WHEN relay_supersedes(excluded.status_rank, pr.status_rank)
                            THEN excluded.state_seq ELSE pr.state_seq END,
            predict_time = CASE WHEN relay_supersedes(excluded.status_rank, pr.status_rank)
                               THEN excluded.predict_time ELSE pr.predict_time END,
            model = coalesce(pr.model, excluded.model),
            last_seq = greatest(pr.last_seq, excluded.last_seq),
            event_count = pr.event_count + excluded.event_count,
            updated_at = excluded.updated_at;
        PERFORM pg_notify(channel, new_seqs[array_length(new_seqs, 1)]::text);
    END IF;

    IF coalesce(array_length(new_seqs, 1), 0) = array_length(webhook_ids, 1) THEN
        RETURN QUERY
        SELECT n.o, n.seq, false FROM unnest(new_seqs, new_ords) AS n(seq, o) ORDER BY n.o;
        RETURN;
    END IF;
    RETURN QUERY EXECUTE
        'SELECT b.o, coalesce(n.seq, (SELECT w.seq FROM webhook_ids w WHERE w.webhook_id = b.w)),
                n.seq IS NULL
         FROM unnest($1) WITH ORDINALITY AS b(w, o)
         LEFT JOIN unnest($2, $3) AS n(seq, o) ON n.o = b.o
         ORDER BY b.o'
        USING webhook_ids, new_seqs, new_ords;
END $$;

GRANT SELECT, INSERT ON events, webhook_ids TO relay_app;
REVOKE UPDATE, DELETE, TRUNCATE ON events, webhook_ids FROM relay_app;
GRANT USAGE ON SEQUENCE events_seq TO relay_app;
GRANT EXECUTE ON FUNCTION relay_create_partitions(timestamptz, timestamptz) TO relay_app;
