-- Usage and cost: when each prediction reached its terminal state, and budget alerts sent.

-- received_at of the event that made the prediction terminal; null while it is still open.
ALTER TABLE predictions ADD COLUMN terminal_at timestamptz;

UPDATE predictions p SET terminal_at = e.received_at
FROM events e
WHERE p.status_rank = 3 AND e.seq = p.state_seq;

-- Set in the ingest transaction, on the upsert that first makes a prediction terminal; the
-- projection keeps the first terminal state, so this never moves afterwards.
CREATE FUNCTION predictions_set_terminal_at() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.status_rank = 3 AND NEW.terminal_at IS NULL THEN
        NEW.terminal_at := NEW.updated_at;
    END IF;
    RETURN NEW;
END $$;

CREATE TRIGGER predictions_terminal_at BEFORE INSERT OR UPDATE ON predictions
    FOR EACH ROW EXECUTE FUNCTION predictions_set_terminal_at();

-- A prediction is counted at one instant: its terminal time, or its first event while open.
CREATE INDEX predictions_usage_at ON predictions ((coalesce(terminal_at, first_received_at)))
    INCLUDE (terminal_at, first_received_at, model, status, status_rank, predict_time);

-- One row per (month, threshold) alert sent: the first instance to insert it logs it.
CREATE TABLE budget_alerts (
    month      date        NOT NULL,
    threshold  smallint    NOT NULL,
    spend_usd  double precision NOT NULL,
    budget_usd double precision NOT NULL,
    fired_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (month, threshold)
);
