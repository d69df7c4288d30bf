#!/usr/bin/env bash
# A PostgreSQL streaming replica of the test server, for the replica tests.
#
#   .ci/replica.sh            make sure it runs; print its URL on stdout
#
# Idempotent: a replica cluster that exists and follows the primary is
# reused (started if it is down); one that is broken is dropped and made
# again. The primary is only reloaded (never restarted: other runs use it)
# after a `replication` line is added to its pg_hba.conf. Debian's
# postgresql-common tools (pg_createcluster, pg_ctlcluster) do the work.
set -euo pipefail

VERSION="${PG_VERSION:-$(ls /etc/postgresql | sort -n | tail -1)}"
PRIMARY_PORT="${PG_PRIMARY_PORT:-5432}"
NAME="${PG_REPLICA_CLUSTER:-replica}"
PORT="${PG_REPLICA_PORT:-5433}"
HBA="/etc/postgresql/$VERSION/main/pg_hba.conf"
LINE="host replication all 127.0.0.1/32 trust"

log() { echo "replica: $*" >&2; }
as_postgres() { runuser -u postgres -- "$@"; }
answers() {  # port -> is the server there and in the state wanted (t: standby)
    [ "$(as_postgres psql -h 127.0.0.1 -p "$1" -U postgres -Atc 'select pg_is_in_recovery()' 2>/dev/null)" = "$2" ]
}

# Only the URL goes to stdout, because the caller reads it: the tools
# below talk there (pg_ctlcluster prints "Removed stale pid file." when a
# replica cluster left from an earlier boot starts again). No spare file
# descriptor is kept for the URL: the server started here would inherit
# it and hold the caller's $(...) open.
{
    if ! grep -qxF "$LINE" "$HBA"; then
        log "allowing replication connections from 127.0.0.1 on the primary (reload)"
        echo "$LINE" >>"$HBA"
        pg_ctlcluster --skip-systemctl-redirect "$VERSION" main reload
    fi

    if pg_lsclusters -h | awk -v v="$VERSION" -v n="$NAME" '$1==v && $2==n {f=1} END {exit !f}'; then
        if ! answers "$PORT" t; then
            pg_ctlcluster --skip-systemctl-redirect "$VERSION" "$NAME" start 2>/dev/null || true
            for _ in $(seq 1 20); do answers "$PORT" t && break; sleep 0.5; done
        fi
        if answers "$PORT" t; then
            log "reusing cluster $VERSION/$NAME on port $PORT"
        else
            log "cluster $VERSION/$NAME is broken; making it again"
            pg_dropcluster --stop "$VERSION" "$NAME" || true
        fi
    fi

    if ! answers "$PORT" t; then
        log "creating cluster $VERSION/$NAME on port $PORT from a base backup of port $PRIMARY_PORT"
        pg_createcluster "$VERSION" "$NAME" -p "$PORT" >/dev/null
        DATA="/var/lib/postgresql/$VERSION/$NAME"
        rm -rf "$DATA"
        install -d -m 700 -o postgres -g postgres "$DATA"
        as_postgres pg_basebackup -h 127.0.0.1 -p "$PRIMARY_PORT" -U postgres -D "$DATA" -R -X stream
        chown -R postgres:postgres "$DATA"
        # Clients reach the replica as they reach the primary.
        cp "$HBA" "/etc/postgresql/$VERSION/$NAME/pg_hba.conf"
        chmod 700 "$DATA"
        pg_ctlcluster --skip-systemctl-redirect "$VERSION" "$NAME" start
        for _ in $(seq 1 60); do answers "$PORT" t && break; sleep 0.5; done
        answers "$PORT" t || { log "the replica did not come up"; exit 1; }
    fi
    # A test that delayed replay may have been interrupted: start undelayed.
    as_postgres psql -h 127.0.0.1 -p "$PORT" -U postgres -qAtc \
        "alter system reset recovery_min_apply_delay" -c "select pg_reload_conf()" \
        -c "select case when pg_is_wal_replay_paused() then pg_wal_replay_resume() end" >/dev/null
} >&2
echo "postgresql+psycopg://postgres@127.0.0.1:$PORT/test"
