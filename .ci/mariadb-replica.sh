#!/usr/bin/env bash
# A MariaDB primary with binlog and GTIDs, and a replica of it, for the
# MariaDB replica tests.
#
#   .ci/mariadb-replica.sh    make sure both run and replicate; print, on stdout,
#
#     TEST_MYSQL_PRIMARY_DSN=mysql+pymysql://sparc@127.0.0.1:3316/test
#     TEST_MYSQL_REPLICA_DSN=mysql+pymysql://sparc@127.0.0.1:3317/test
#     TEST_MYSQL_REPLICA_ADMIN_DSN=mysql+pymysql://sparc_admin@127.0.0.1:3317/test
#
# one NAME=URL a line, nothing else (everything else goes to stderr).
#
# Both servers are new ones, each with its own data directory made by
# mariadb-install-db under $MARIADB_PAIR_ROOT (default
# /var/lib/sparc-sa-mariadb/{primary,replica}), its own socket, pid file and
# port (3316, 3317). They read no configuration file (--no-defaults): the
# machine's own server on 3306, its my.cnf and its data are never touched.
#
# Idempotent: servers that run are reused, stopped ones are started, a
# replica whose replication threads are stopped (a test may have stopped
# them) is started again, and a replica that cannot replicate is made again.
#
# `sparc` is the user the tests read and write with: no SUPER and no
# READ ONLY ADMIN (either would ignore the replica's read_only=1); it may
# read the replication status (SLAVE MONITOR). `sparc_admin` may do anything
# (stop replication, kill connections, shut the replica down) and is for the
# tests' fault injection only. Both have no password and exist on
# 127.0.0.1 only, where the servers listen.
set -euo pipefail

ROOT="${MARIADB_PAIR_ROOT:-/var/lib/sparc-sa-mariadb}"
PRIMARY_PORT="${MARIADB_PRIMARY_PORT:-3316}"
REPLICA_PORT="${MARIADB_REPLICA_PORT:-3317}"

log() { echo "mariadb-replica: $*" >&2; }
dir() { echo "$ROOT/$1"; }
port() { if [ "$1" = primary ]; then echo "$PRIMARY_PORT"; else echo "$REPLICA_PORT"; fi; }
sql() {  # name, statements -> tab-separated answer; fails if the server is not there
    mariadb --no-defaults --protocol=socket -S "$(dir "$1")/mysqld.sock" -uroot -N -B -e "$2"
}
up() { sql "$1" "SELECT 1" >/dev/null 2>&1; }
status() {  # the replica's SHOW SLAVE STATUS, a "Name: value" line each (empty: no primary set)
    mariadb --no-defaults --protocol=socket -S "$(dir replica)/mysqld.sock" -uroot -B \
        -e "SHOW SLAVE STATUS\G" 2>/dev/null
}

start() {  # name: start that server from its data directory and wait for it
    local name="$1" d
    d="$(dir "$1")"
    local -a options=(
        --no-defaults --user=mysql --datadir="$d/data" --socket="$d/mysqld.sock"
        --pid-file="$d/mysqld.pid" --log-error="$d/error.log"
        --port="$(port "$name")" --bind-address=127.0.0.1 --skip-name-resolve
        --gtid-strict-mode=1 --innodb-buffer-pool-size=32M --performance-schema=OFF
        --max-connections=200
    )
    if [ "$name" = primary ]; then
        options+=(--server-id=1 --log-bin="$d/data/binlog" --binlog-format=ROW)
    else
        options+=(--server-id=2 --read-only=1 --relay-log="$d/data/relay")
    fi
    log "starting the $name on port $(port "$name")"
    # Its own session, every descriptor away from ours: the caller's $(...)
    # must not wait for the server.
    setsid /usr/sbin/mariadbd "${options[@]}" </dev/null >>"$d/server.log" 2>&1 &
    for _ in $(seq 1 120); do up "$name" && return 0; sleep 0.5; done
    log "the $name did not come up; see $d/error.log"
    tail -n 20 "$d/error.log" >&2 || true
    exit 1
}

stop() {  # name: stop that server if it runs (its own pid file, nothing else)
    local d pid
    d="$(dir "$1")"
    [ -f "$d/mysqld.pid" ] || return 0
    pid="$(cat "$d/mysqld.pid")"
    if kill -0 "$pid" 2>/dev/null; then
        log "stopping the $1 (pid $pid)"
        kill "$pid"
        for _ in $(seq 1 60); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    fi
    rm -f "$d/mysqld.pid"
}

create() {  # name: a new data directory
    local d
    d="$(dir "$1")"
    stop "$1"
    rm -rf "$d"
    install -d -m 750 -o mysql -g mysql "$d"
    log "mariadb-install-db for the $1 in $d/data"
    mariadb-install-db --no-defaults --user=mysql --datadir="$d/data" \
        --auth-root-authentication-method=socket --skip-test-db >"$d/install.log" 2>&1 ||
        { tail -n 20 "$d/install.log" >&2; exit 1; }
}

ensure_primary() {
    if [ ! -d "$(dir primary)/data/mysql" ]; then
        create primary
    fi
    up primary || start primary
    # Binlogged, so that a replica made from nothing replays it.
    sql primary "CREATE DATABASE IF NOT EXISTS test;
        CREATE USER IF NOT EXISTS sparc@'127.0.0.1';
        GRANT ALL ON test.* TO sparc@'127.0.0.1';
        GRANT SLAVE MONITOR ON *.* TO sparc@'127.0.0.1';
        CREATE USER IF NOT EXISTS sparc_admin@'127.0.0.1';
        GRANT ALL ON *.* TO sparc_admin@'127.0.0.1' WITH GRANT OPTION;
        CREATE USER IF NOT EXISTS sparc_repl@'127.0.0.1';
        GRANT REPLICATION SLAVE ON *.* TO sparc_repl@'127.0.0.1'"
    [ "$(sql primary 'SELECT @@log_bin, @@server_id, @@gtid_strict_mode')" = "$(printf '1\t1\t1')" ] ||
        { log "the primary on $PRIMARY_PORT is not the one this script makes"; exit 1; }
}

replicating() {  # the replica's IO and SQL threads both run
    local status
    status="$(status)" || return 1
    grep -q 'Slave_IO_Running: Yes' <<<"$status" && grep -q 'Slave_SQL_Running: Yes' <<<"$status"
}

caught_up() {  # the replica has applied all the primary has binlogged
    local want
    want="$(sql primary 'SELECT @@gtid_binlog_pos')"
    for _ in $(seq 1 60); do
        [ "$(sql replica "SELECT MASTER_GTID_WAIT('$want', 1)" 2>/dev/null)" = 0 ] && return 0
    done
    return 1
}

ensure_replica() {
    if [ ! -d "$(dir replica)/data/mysql" ]; then
        create replica
    fi
    up replica || start replica
    if ! grep -q 'Master_Host: 127.0.0.1' <<<"$(status)"; then
        log "the replica follows the primary from its first GTID"
        sql replica "SET GLOBAL gtid_slave_pos = '';
            CHANGE MASTER TO MASTER_HOST='127.0.0.1', MASTER_PORT=$PRIMARY_PORT,
              MASTER_USER='sparc_repl', MASTER_CONNECT_RETRY=1, MASTER_USE_GTID=slave_pos;
            START SLAVE"
    elif ! replicating; then
        log "starting replication on the replica (it was stopped)"
        sql replica "START SLAVE" || true
    fi
    for _ in $(seq 1 40); do replicating && break; sleep 0.5; done
}

{
    ensure_primary
    ensure_replica
    if ! replicating || ! caught_up; then
        log "the replica does not replicate; making it again"
        grep -E 'Running|Error' <<<"$(status)" >&2 || true
        create replica
        ensure_replica
        replicating && caught_up || { log "the new replica does not replicate either"; exit 1; }
    fi
    # The primary's own writes land in the replica within moments.
    log "primary on $PRIMARY_PORT, replica on $REPLICA_PORT: replicating"
} >&2
echo "TEST_MYSQL_PRIMARY_DSN=mysql+pymysql://sparc@127.0.0.1:$PRIMARY_PORT/test"
echo "TEST_MYSQL_REPLICA_DSN=mysql+pymysql://sparc@127.0.0.1:$REPLICA_PORT/test"
echo "TEST_MYSQL_REPLICA_ADMIN_DSN=mysql+pymysql://sparc_admin@127.0.0.1:$REPLICA_PORT/test"
