-- Output archive: one job per output URL (found in the log), fetched once, stored by SHA-256.

-- One row per URL, keyed by the URL's SHA-256 so that the URL itself can be sealed under the
-- prediction's data key when encryption is on (an output URL is the prediction's content).
CREATE TABLE archive_jobs (
    url_hash      bytea       PRIMARY KEY,
    prediction_id text        NOT NULL,    -- the first prediction whose output carried the URL
    seq           bigint      NOT NULL,    -- the event it was found in
    url           bytea       NOT NULL,    -- UTF-8, or sealed (crypto.seal) when encrypted
    encrypted     boolean     NOT NULL,
    status        text        NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'stored', 'failed')),
    attempts      integer     NOT NULL DEFAULT 0,
    next_at       timestamptz NOT NULL DEFAULT now(),
    give_up_at    timestamptz NOT NULL,    -- about an hour after completion: Replicate deletes it then
    reason        text,                    -- the last failure, kept while retrying
    sha256        text,
    size          bigint,
    content_type  text,
    object_key    text,                    -- where the store keeps it (sha256, per prediction if sealed)
    created_at    timestamptz NOT NULL DEFAULT now(),
    finished_at   timestamptz
);

CREATE INDEX archive_jobs_due ON archive_jobs (next_at) WHERE status = 'pending';
CREATE INDEX archive_jobs_prediction ON archive_jobs (prediction_id);
CREATE INDEX archive_jobs_sha256 ON archive_jobs (sha256) WHERE sha256 IS NOT NULL;
CREATE INDEX archive_jobs_failed ON archive_jobs (finished_at) WHERE status = 'failed';

-- How far discovery has read the log (seq order is visibility order, so nothing is skipped).
-- It starts at the log's end: files of events older than the archive are gone from Replicate.
CREATE TABLE archive_cursor (
    only_row boolean PRIMARY KEY DEFAULT true CHECK (only_row),
    seq      bigint  NOT NULL
);
INSERT INTO archive_cursor (seq) SELECT coalesce(max(seq), 0) FROM events;

GRANT SELECT, INSERT, UPDATE, DELETE ON archive_jobs TO relay_app;
GRANT SELECT, UPDATE ON archive_cursor TO relay_app;
