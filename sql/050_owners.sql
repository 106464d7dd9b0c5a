-- Which API key created each prediction (and batch): `owner` is the SHA-256 hex of the key
-- (service.upstream.ratelimit.key_hash), or 'admin' for the admin token. An API key sees,
-- cancels, lists and gets tokens only for its own predictions; the admin token sees all.
-- Shared by the predictions API, batches and the cache (service/db/owners.py).
CREATE TABLE prediction_owners (prediction_id text PRIMARY KEY, owner text NOT NULL, created_at timestamptz NOT NULL DEFAULT now());

-- 040_roles.sql grants only the tables that existed then: the service records and reads owners.
GRANT SELECT, INSERT ON prediction_owners TO relay_app;
