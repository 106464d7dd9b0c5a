-- statuses.supersedes in SQL: a higher rank wins; an equal non-terminal rank (< 3) wins; the
-- first terminal state stays.
CREATE FUNCTION relay_supersedes(candidate smallint, stored smallint) RETURNS boolean
LANGUAGE sql IMMUTABLE AS 'SELECT candidate > stored OR (candidate = stored AND stored < 3)';

-- store.append: one group-committed batch in one statement, so the writer pays one round trip
-- per batch (it paid six: BEGIN, lock, insert, projection, notify, COMMIT). One row per
-- delivery comes back, `ord` being its 1-based position in the arrays.

CREATE FUNCTION relay_append(
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
    -- seq is assigned and made visible in one order: appends are serialised until COMMIT.
    PERFORM pg_advisory_xact_lock(seq_lock);

    -- The first copy of each webhook-id not already in the log becomes a row, in input order.
    WITH batch AS (
        SELECT DISTINCT ON (b.w) b.*
        FROM unnest(webhook_ids, prediction_ids, statuses, sources, bodies, encrypted_flags,
                    webhook_timestamps, received) WITH ORDINALITY AS b(w, p, s, src, body, enc, wt, ra, o)
        ORDER BY b.w, b.o
    ), inserted AS (
        INSERT INTO events (webhook_id, prediction_id, status, source, body, encrypted,
                            webhook_timestamp, received_at)
        SELECT w, p, s, src, body, enc, wt, ra FROM batch ORDER BY o
        ON CONFLICT (webhook_id) DO NOTHING
        RETURNING events.seq, events.webhook_id
    )
    SELECT array_agg(i.seq ORDER BY i.seq), array_agg(b.o ORDER BY i.seq) INTO new_seqs, new_ords
    FROM inserted i JOIN batch b ON b.w = i.webhook_id;

    IF new_seqs IS NOT NULL THEN
        -- One change per prediction, folding its new rows with relay_supersedes: the highest
        -- rank wins; among equal non-terminal ranks the newest, among terminal ones the first.
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
        -- The nudge carries the newest seq, never a payload; it is delivered at COMMIT.
        PERFORM pg_notify(channel, new_seqs[array_length(new_seqs, 1)]::text);
    END IF;

    IF coalesce(array_length(new_seqs, 1), 0) = array_length(webhook_ids, 1) THEN
        RETURN QUERY  -- no duplicates, the usual case: nothing to look up
        SELECT n.o, n.seq, false FROM unnest(new_seqs, new_ords) AS n(seq, o) ORDER BY n.o;
        RETURN;
    END IF;
    -- A duplicate reports the seq of the first row with its webhook-id. Dynamic SQL, so it is
    -- planned against the table as it is now: a plan cached while `events` was small scanned the
    -- whole table on every call (database CPU per row grew with the log; measured).
    RETURN QUERY EXECUTE
        'SELECT b.o, coalesce(n.seq, (SELECT e.seq FROM events e WHERE e.webhook_id = b.w)),
                n.seq IS NULL
         FROM unnest($1) WITH ORDINALITY AS b(w, o)
         LEFT JOIN unnest($2, $3) AS n(seq, o) ON n.o = b.o
         ORDER BY b.o'
        USING webhook_ids, new_seqs, new_ords;
END $$;
