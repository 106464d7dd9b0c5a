-- Requests per API key per fixed window, shared by every Relay instance on this database.
-- key_hash is a SHA-256 of the key: the keys themselves are never stored.
CREATE TABLE api_rate_limits (
    key_hash     text        NOT NULL,
    window_start timestamptz NOT NULL,
    used         integer     NOT NULL,
    PRIMARY KEY (key_hash, window_start)
);
