-- Batches: many predictions, at most `concurrency` unfinished at once (service/batches/).
-- Every scheduling step of a batch runs under a row lock on its `batches` row (SELECT … FOR
-- UPDATE), so instances sharing the database take turns per batch and never exceed concurrency.

CREATE TABLE batches (
    id            text        PRIMARY KEY,
    owner         text        NOT NULL,            -- key_hash(api key), or 'admin'
    path          text        NOT NULL,            -- the upstream create path
    target        jsonb       NOT NULL,            -- {"model": …} or {"version": …}
    events_filter text[]      NOT NULL,
    concurrency   int         NOT NULL CHECK (concurrency BETWEEN 1 AND 50),
    total         int         NOT NULL CHECK (total BETWEEN 1 AND 10000),
    status        text        NOT NULL DEFAULT 'running' CHECK (status IN ('running', 'succeeded', 'canceled')),
    cancel_requested boolean  NOT NULL DEFAULT false,
    hold_until    timestamptz,                     -- no new item before this (Retry-After, auth)
    hold_reason   text,                            -- why no new item starts now (shown to users)
    created_at    timestamptz NOT NULL DEFAULT now(),
    ended_at      timestamptz
);

CREATE INDEX batches_running ON batches (created_at) WHERE status = 'running';
CREATE INDEX batches_owner ON batches (owner, created_at DESC);

-- status: pending -> creating (intent durable, prediction id not known yet) -> submitted
-- (prediction id known) -> succeeded | failed | canceled | aborted (copied from the log's
-- projection); or pending -> failed (create refused) | canceled (batch canceled first).
CREATE TABLE batch_items (
    batch_id      text        NOT NULL REFERENCES batches (id),
    index         int         NOT NULL,
    status        text        NOT NULL DEFAULT 'pending',
    input         jsonb,                           -- dropped once the prediction exists
    prediction_id text,
    error         text,                            -- a create Replicate refused, or an unknown outcome
    error_code    text,
    cancel_sent   boolean     NOT NULL DEFAULT false,
    claimed_at    timestamptz,
    ended_at      timestamptz,
    PRIMARY KEY (batch_id, index)
);

-- The unfinished items of a batch (few: at most `concurrency`), and its pending ones in order.
CREATE INDEX batch_items_unfinished ON batch_items (batch_id) WHERE status IN ('creating', 'submitted');
CREATE INDEX batch_items_pending ON batch_items (batch_id, index) WHERE status = 'pending';
CREATE UNIQUE INDEX batch_items_prediction ON batch_items (prediction_id) WHERE prediction_id IS NOT NULL;

GRANT SELECT, INSERT, UPDATE ON batches, batch_items TO relay_app;
