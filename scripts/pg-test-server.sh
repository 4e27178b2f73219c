#!/usr/bin/env bash
# A throwaway PostgreSQL server for tests: initdb into a fresh temp dir, listen on 127.0.0.1
# at a free port (and a unix socket in the same dir), trust auth, fsync off. Not for data
# you want to keep.
#
#   eval "$(scripts/pg-test-server.sh start)"   # exports IDEALRT_TEST_POSTGRES_URL, IDEALRT_PG_TEST_DIR
#   pytest -m postgres
#   scripts/pg-test-server.sh stop "$IDEALRT_PG_TEST_DIR"
#   (also: pause DIR / resume DIR to stop and restart it on the same port; find)
#
# Binaries: $PG_BIN if set, else pg_ctl/initdb on PATH, else the newest
# /usr/lib/postgresql/*/bin (Debian/Ubuntu `apt-get install -y postgresql`), else
# /usr/pgsql-*/bin (RHEL). PostgreSQL refuses to run as root; as root the server runs as the
# `postgres` user if it exists, else `nobody`.
#
# Exit status: 0 ok; 3 no PostgreSQL binaries found (callers may skip); anything else is a
# real failure (the log is printed to stderr).
set -euo pipefail

die() { echo "pg-test-server: $*" >&2; exit 1; }

find_bin() {
  if [[ -n "${PG_BIN:-}" ]]; then
    [[ -x "$PG_BIN/pg_ctl" && -x "$PG_BIN/initdb" ]] || die "PG_BIN=$PG_BIN lacks pg_ctl/initdb"
    echo "$PG_BIN"; return
  fi
  if command -v pg_ctl >/dev/null && command -v initdb >/dev/null; then
    dirname "$(readlink -f "$(command -v pg_ctl)")"; return
  fi
  local d
  for d in $(ls -d /usr/lib/postgresql/*/bin /usr/pgsql-*/bin 2>/dev/null | sort -V -r); do
    if [[ -x "$d/pg_ctl" && -x "$d/initdb" ]]; then echo "$d"; return; fi
  done
  echo "pg-test-server: no PostgreSQL binaries (initdb, pg_ctl); install them, e.g." \
    "apt-get install -y postgresql, or set PG_BIN" >&2
  exit 3
}

# Run a command as the server's user (ourselves unless we are root).
as_owner() {
  if [[ "$(id -u)" -ne 0 ]]; then "$@"; return; fi
  local user=nobody
  id postgres >/dev/null 2>&1 && user=postgres
  if command -v runuser >/dev/null; then runuser -u "$user" -- "$@"
  else setpriv --reuid="$user" --regid="$(id -g "$user")" --clear-groups -- "$@"
  fi
}

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

start() {
  local bin dir port attempt
  bin="$(find_bin)"
  dir="$(mktemp -d "${TMPDIR:-/tmp}/idealrt-pg.XXXXXX")"
  chmod 755 "$dir"
  if [[ "$(id -u)" -eq 0 ]]; then
    if id postgres >/dev/null 2>&1; then chown postgres "$dir"; else chown nobody "$dir"; fi
  fi
  as_owner "$bin/initdb" -D "$dir/data" -U postgres -A trust -E UTF8 --no-sync \
    >"$dir/initdb.log" 2>&1 || { cat "$dir/initdb.log" >&2; rm -rf "$dir"; die "initdb failed"; }
  for attempt in 1 2 3 4 5; do
    port="$(free_port)"
    if as_owner "$bin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 start \
        -o "-h 127.0.0.1 -p $port -k $dir -F -c max_connections=200" >/dev/null 2>&1; then
      echo "$port" >"$dir/port"
      echo "export IDEALRT_TEST_POSTGRES_URL='postgresql://postgres@127.0.0.1:$port/postgres'"
      echo "export IDEALRT_PG_TEST_DIR='$dir'"
      return 0
    fi
    grep -q "could not bind\|Address already in use" "$dir/server.log" 2>/dev/null || break
  done
  cat "$dir/server.log" >&2 || true
  rm -rf "$dir"
  die "the server did not start"
}

stop() {
  local dir="${1:-${IDEALRT_PG_TEST_DIR:-}}" bin
  [[ -n "$dir" && -d "$dir/data" ]] || die "usage: $0 stop DIR (the IDEALRT_PG_TEST_DIR that start printed)"
  bin="$(find_bin)"
  as_owner "$bin/pg_ctl" -D "$dir/data" -m fast -w stop >/dev/null 2>&1 || true
  rm -rf "$dir"
}

# pause: stop the server but keep its data; resume: start it again on the same port.
# (Tests use them to check what clients see while the database is away.)
pause() {
  local dir="$1" bin
  [[ -f "$dir/port" ]] || die "usage: $0 pause DIR"
  bin="$(find_bin)"
  as_owner "$bin/pg_ctl" -D "$dir/data" -m fast -w stop >/dev/null
}

resume() {
  local dir="$1" bin port
  [[ -f "$dir/port" ]] || die "usage: $0 resume DIR"
  bin="$(find_bin)"
  port="$(cat "$dir/port")"
  as_owner "$bin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 start \
    -o "-h 127.0.0.1 -p $port -k $dir -F -c max_connections=200" >/dev/null \
    || { tail -20 "$dir/server.log" >&2; die "the server did not restart"; }
}

case "${1:-}" in
  start) start ;;
  stop) stop "${2:-}" ;;
  pause) pause "${2:-}" ;;
  resume) resume "${2:-}" ;;
  find) find_bin ;;
  *) echo "usage: $0 start | stop DIR | pause DIR | resume DIR | find" >&2; exit 2 ;;
esac
