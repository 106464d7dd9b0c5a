-- Destinations: backends that receive every matching event of the log, signed, in order per
-- prediction, with retries. The log is the outbox; these tables hold only each destination's
-- position and the events it still owes.

CREATE TABLE destinations (
    id              text        PRIMARY KEY,
    url             text        NOT NULL,
    -- The whsec_ secret: in clear (kek_id null), or sealed by the key-encryption key kek_id.
    secret          bytea       NOT NULL,
    kek_id          text,
    filter          jsonb       NOT NULL DEFAULT '{}',
    -- Every matching event with seq <= cursor was delivered, or is owed in destination_events.
    cursor          bigint      NOT NULL,
    paused          boolean     NOT NULL DEFAULT false,
    created_at      timestamptz NOT NULL DEFAULT now(),
    last_success_at timestamptz,
    last_error      text,
    last_error_at   timestamptz,
    -- Set by the first failure after a success, cleared by the next success.
    failing_since   timestamptz
);

-- Events a destination owes: retried on the schedule (`owed`), or given up (`exhausted`) until
-- `retry`. Only the lowest owed seq of a prediction is sent; the later ones wait behind it.
CREATE TABLE destination_events (
    destination_id text        NOT NULL REFERENCES destinations (id) ON DELETE CASCADE,
    seq            bigint      NOT NULL,
    prediction_id  text        NOT NULL,
    state          text        NOT NULL CHECK (state IN ('owed', 'exhausted')),
    attempts       integer     NOT NULL DEFAULT 0,
    next_at        timestamptz NOT NULL DEFAULT now(),
    last_error     text,
    PRIMARY KEY (destination_id, seq)
);

CREATE INDEX destination_events_heads ON destination_events (destination_id, state, prediction_id, seq);

GRANT SELECT, INSERT, UPDATE, DELETE ON destinations, destination_events TO relay_app;
