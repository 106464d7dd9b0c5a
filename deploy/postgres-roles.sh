#!/bin/sh
# Run once by the postgres image when it creates its volume (docker-entrypoint-initdb.d), as the
# owner (POSTGRES_USER): the service's login role `relay`, a member of relay_app. `relay migrate`
# (as the owner) then grants relay_app what the service needs (sql/040_roles.sql).
# With REPLICATION_PASSWORD set (compose's replica), also the `replicator` role a standby streams
# as, and the pg_hba.conf line that lets it connect.
set -eu
psql -v ON_ERROR_STOP=1 -v password="$RELAY_DB_PASSWORD" \
    --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" <<'SQL'
CREATE ROLE relay_app NOLOGIN;
CREATE ROLE relay LOGIN PASSWORD :'password' IN ROLE relay_app;
SQL
if [ -n "${REPLICATION_PASSWORD:-}" ]; then
    psql -v ON_ERROR_STOP=1 -v password="$REPLICATION_PASSWORD" \
        --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" <<'SQL'
CREATE ROLE replicator LOGIN REPLICATION PASSWORD :'password';
SQL
    echo "host replication replicator all scram-sha-256" >> "$PGDATA/pg_hba.conf"
fi
