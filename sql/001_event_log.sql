-- The append-only log of deliveries and the per-prediction projection.

CREATE TABLE events (
    seq               bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    webhook_id        text        NOT NULL UNIQUE,
    prediction_id     text        NOT NULL,
    status            text        NOT NULL,
    source            text        NOT NULL CHECK (source IN ('webhook', 'reconcile', 'erasure')),
    body              bytea       NOT NULL,   -- the exact bytes received (ciphertext when encrypted)
    encrypted         boolean     NOT NULL DEFAULT false,
    webhook_timestamp timestamptz,            -- null for events Relay made itself
    received_at       timestamptz NOT NULL
);

CREATE INDEX events_prediction_seq ON events (prediction_id, seq);
CREATE INDEX events_status_seq ON events (status, seq);
CREATE INDEX events_source_seq ON events (source, seq);
CREATE INDEX events_received_at ON events (received_at, seq);

CREATE FUNCTION events_refuse_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'events is append-only: % is not allowed', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END $$;

CREATE TRIGGER events_no_update_delete BEFORE UPDATE OR DELETE ON events
    FOR EACH ROW EXECUTE FUNCTION events_refuse_change();
CREATE TRIGGER events_no_truncate BEFORE TRUNCATE ON events
    FOR EACH STATEMENT EXECUTE FUNCTION events_refuse_change();

-- Current state per prediction, updated in the same transaction as the insert.
-- state_seq points at the event whose body is the current state.
CREATE TABLE predictions (
    prediction_id  text        PRIMARY KEY,
    status         text        NOT NULL,
    status_rank    smallint    NOT NULL,
    state_seq      bigint      NOT NULL,
    first_seq      bigint      NOT NULL,
    last_seq       bigint      NOT NULL,
    event_count    bigint      NOT NULL,
    model          text,
    predict_time   double precision,
    first_received_at timestamptz NOT NULL,
    updated_at     timestamptz NOT NULL
);

CREATE INDEX predictions_updated_at ON predictions (updated_at DESC);
CREATE INDEX predictions_open ON predictions (updated_at) WHERE status_rank < 3;
