-- The API surface (issue 19): bare version ids Relay has learned, and the opt-in prediction cache.

-- Version id -> model, learned from Replicate's answers to creates and gets made through Relay
-- (each names both `model` and `version`), so a bare `version` id of a model whose input Relay
-- validates is validated too (service/upstream/versions.py).
CREATE TABLE model_versions (
    version_id text        PRIMARY KEY,
    model      text        NOT NULL,
    learned_at timestamptz NOT NULL DEFAULT now()
);

-- Predictions created with "cache": true, by scope (the SHA-256 of the API key, or 'admin'),
-- target (the pinned version id, else owner/name) and SHA-256 of the input's canonical JSON.
-- Whether one may answer is decided when it is read, from the projection: succeeded, within
-- RELAY_CACHE_TTL of its terminal time, never erased (service/cache/store.py).
CREATE TABLE prediction_cache (
    scope         text        NOT NULL,
    target        text        NOT NULL,
    input_sha256  text        NOT NULL,
    prediction_id text        NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (scope, target, input_sha256, prediction_id)
);
CREATE INDEX prediction_cache_prediction ON prediction_cache (prediction_id);

-- One row per answer given from the cache: what usage reports as saved.
CREATE TABLE cache_answers (
    answered_at   timestamptz      NOT NULL DEFAULT now(),
    scope         text             NOT NULL,
    prediction_id text             NOT NULL,
    model         text,
    predict_time  double precision
);
CREATE INDEX cache_answers_at ON cache_answers (answered_at);

-- Forgetting a prediction (privacy/erasure.py) deletes its data key, in the transaction that
-- appends the erasure event; that deletion also removes the prediction from the cache, so a
-- forgotten prediction can never answer and its input's hash goes with it. (On data_keys, not on
-- events: the log is re-created partitioned by a later migration, and a key is deleted only to forget.)
CREATE FUNCTION prediction_cache_forget() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM prediction_cache WHERE prediction_id = OLD.prediction_id;
    RETURN NULL;
END $$;

CREATE TRIGGER data_keys_forget_cache AFTER DELETE ON data_keys
    FOR EACH ROW EXECUTE FUNCTION prediction_cache_forget();

GRANT SELECT, INSERT ON model_versions TO relay_app;
GRANT SELECT, INSERT, DELETE ON prediction_cache TO relay_app;
GRANT SELECT, INSERT ON cache_answers TO relay_app;
GRANT EXECUTE ON FUNCTION prediction_cache_forget() TO relay_app;
