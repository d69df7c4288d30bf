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
ask() {  # port, query -> the answer, empty if the server is not there
    as_postgres psql -h 127.0.0.1 -p "$1" -U postgres -Atc "$2" 2>/dev/null || true
}
# A hot standby must have these at least as high as its primary, or it
# pauses replay for good ("insufficient parameter settings") while still
# answering as a standby: .ci/run raises max_prepared_transactions on the
# primary, maybe after this replica was made.
HOT="'max_connections','max_prepared_transactions','max_locks_per_transaction',\
'max_worker_processes','max_wal_senders'"
settings() {  # port -> "name = value" lines of the settings above
    ask "$1" "select name || ' = ' || setting from pg_settings where name in ($HOT) order by name"
}
standby() { [ "$(ask "$PORT" 'select pg_is_in_recovery()')" = t ]; }
sound() { standby && [ "$(settings "$PORT")" = "$(settings "$PRIMARY_PORT")" ]; }
match_primary() {  # the replica's configuration takes the primary's values
    settings "$PRIMARY_PORT" >"/etc/postgresql/$VERSION/$NAME/conf.d/primary.conf"
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
        if [ "$(ask "$PORT" 'select pg_is_in_recovery()')" = f ]; then
            # Promoted (a test does that): it can never follow the primary
            # again, so it is made again at once, without a restart first.
            log "cluster $VERSION/$NAME was promoted; making it again"
            pg_dropcluster --stop "$VERSION" "$NAME" || true
        else
            if ! sound; then
                log "cluster $VERSION/$NAME: (re)starting it with the primary's settings"
                match_primary
                pg_ctlcluster --skip-systemctl-redirect "$VERSION" "$NAME" stop 2>/dev/null || true
                pg_ctlcluster --skip-systemctl-redirect "$VERSION" "$NAME" start 2>/dev/null || true
                for _ in $(seq 1 20); do sound && break; sleep 0.5; done
            fi
            if sound; then
                log "reusing cluster $VERSION/$NAME on port $PORT"
            else
                log "cluster $VERSION/$NAME is broken; making it again"
                pg_dropcluster --stop "$VERSION" "$NAME" || true
            fi
        fi
    fi

    if ! sound; then
        log "creating cluster $VERSION/$NAME on port $PORT from a base backup of port $PRIMARY_PORT"
        pg_createcluster "$VERSION" "$NAME" -p "$PORT" >/dev/null
        DATA="/var/lib/postgresql/$VERSION/$NAME"
        rm -rf "$DATA"
        install -d -m 700 -o postgres -g postgres "$DATA"
        # -c fast: the backup starts after an immediate checkpoint, not a
        # spread one, which under the tests' writes took up to two minutes.
        as_postgres pg_basebackup -h 127.0.0.1 -p "$PRIMARY_PORT" -U postgres -D "$DATA" -R -X stream -c fast
        chown -R postgres:postgres "$DATA"
        # Clients reach the replica as they reach the primary.
        cp "$HBA" "/etc/postgresql/$VERSION/$NAME/pg_hba.conf"
        chmod 700 "$DATA"
        match_primary
        pg_ctlcluster --skip-systemctl-redirect "$VERSION" "$NAME" start
        for _ in $(seq 1 60); do sound && break; sleep 0.5; done
        sound || { log "the replica did not come up"; exit 1; }
    fi
    # A test that delayed replay may have been interrupted: start undelayed.
    as_postgres psql -h 127.0.0.1 -p "$PORT" -U postgres -qAtc \
        "alter system reset recovery_min_apply_delay" -c "select pg_reload_conf()" \
        -c "select case when pg_is_wal_replay_paused() then pg_wal_replay_resume() end" >/dev/null
} >&2
echo "postgresql+psycopg://postgres@127.0.0.1:$PORT/test"
