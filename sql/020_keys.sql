-- Per-prediction data keys for payloads at rest, each wrapped (AES-256-GCM) by the
-- key-encryption key named by kek_id. The only table whose rows are deleted: deleting a
-- prediction's row is how it is forgotten (crypto-shredding); the event log is never edited.
CREATE TABLE data_keys (
    prediction_id text        PRIMARY KEY,
    kek_id        text        NOT NULL,
    wrapped       bytea       NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now()
);

-- Start-up checks and rotation look data keys up by the key that wraps them.
CREATE INDEX data_keys_kek ON data_keys (kek_id);
