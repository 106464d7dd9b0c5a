-- relay_app: what the running service needs, and nothing more. It appends to the log and reads
-- it, but may not UPDATE, DELETE or TRUNCATE it: Postgres refuses those for lack of a grant
-- before the append-only trigger (001) is even reached, and only the tables' owner could drop
-- that trigger. Operators give their login role this one:
--     CREATE ROLE relay LOGIN PASSWORD '…' IN ROLE relay_app;   -- or GRANT relay_app TO relay;
-- and keep running `relay migrate` as the role that owns the tables.
--
-- Roles belong to the whole cluster, grants to one database: the role is created once (by an
-- owner with CREATEROLE, or in advance by an administrator), the grants below in every database.
-- A later migration that adds a table grants relay_app what the service needs on it.

DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'relay_app') THEN
        CREATE ROLE relay_app NOLOGIN;
    END IF;
EXCEPTION WHEN duplicate_object OR unique_violation THEN
    NULL;  -- another database's migration created it at the same moment
END $$;

GRANT USAGE ON SCHEMA public TO relay_app;

-- The log: appended and read; events.seq is an identity column, which needs no sequence grant.
GRANT SELECT, INSERT ON events TO relay_app;
REVOKE UPDATE, DELETE, TRUNCATE ON events FROM relay_app;

-- The projection is upserted in the same transaction as each append.
GRANT SELECT, INSERT, UPDATE ON predictions TO relay_app;
-- Per-key quotas: INSERT … ON CONFLICT DO UPDATE.
GRANT SELECT, INSERT, UPDATE ON api_rate_limits TO relay_app;
GRANT SELECT, INSERT ON budget_alerts TO relay_app;
-- Data keys are not the log: rotation re-wraps them, forgetting a prediction deletes its key.
GRANT SELECT, INSERT, UPDATE, DELETE ON data_keys TO relay_app;
-- Start-up and /readyz check that nothing is pending; only the owner applies migrations.
GRANT SELECT ON schema_migrations TO relay_app;

GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA public TO relay_app;
