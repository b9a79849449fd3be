#!/usr/bin/env bash
# The machine set-up of the README's test command: install (Debian packages) and start what the tests need
# and is missing, and do nothing where all is there.
#
#   PostgreSQL on 127.0.0.1:5432 (trust for loopback TCP, a `test` database), Redis on 6379, RabbitMQ on 5672,
#   Java 17+ and Maven (the OpenSearch node the tests start: workers/opensearch_node), Chromium (the page test).
#
# Runs as root (CI and the developers' machines) or through sudo. Each line it prints says what it did.
set -euo pipefail

say() { echo "services.sh: $*"; }
as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
  say "need root (or sudo) to run: $*"; exit 1; fi; }
up() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
wait_port() { # name port seconds
  local i
  for ((i = 0; i < $3 * 2; i++)); do up "$2" && return 0; sleep 0.5; done
  say "$1 did not come up on 127.0.0.1:$2 within $3 s"; return 1
}

# --- 1. packages -------------------------------------------------------------------------------------------
missing=()
command -v redis-server >/dev/null || missing+=(redis-server)
command -v rabbitmq-server >/dev/null || [ -x /usr/sbin/rabbitmq-server ] || missing+=(rabbitmq-server)
ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1 || missing+=(postgresql)
command -v chromium >/dev/null || missing+=(chromium)
command -v java >/dev/null || missing+=(openjdk-17-jdk-headless)
command -v mvn >/dev/null || missing+=(maven)
if [ ${#missing[@]} -gt 0 ]; then
  say "installing ${missing[*]} (Debian packages)"
  as_root apt-get update -q
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
else
  say "packages: all there"
fi

# --- 2. PostgreSQL: trust on loopback TCP, a `test` database ------------------------------------------------
pgver=$(ls /usr/lib/postgresql | sort -V | tail -1)
if [ ! -d "/etc/postgresql/$pgver/main" ]; then
  say "creating the PostgreSQL $pgver cluster main"
  as_root pg_createcluster "$pgver" main
fi
hba="/etc/postgresql/$pgver/main/pg_hba.conf"
if ! as_root grep -q "fusionrank-tests" "$hba"; then
  say "PostgreSQL: trust for 127.0.0.1 and ::1 (tests connect as postgres without a password)"
  as_root sh -c "{ echo '# fusionrank-tests: loopback TCP is trusted on this test machine'; \
    echo 'host all all 127.0.0.1/32 trust'; echo 'host all all ::1/128 trust'; cat '$hba'; } > '$hba.new' && mv '$hba.new' '$hba' && chown postgres:postgres '$hba'"
  if up 5432; then as_root pg_ctlcluster "$pgver" main reload; fi
fi
if ! up 5432; then
  say "starting PostgreSQL $pgver"
  as_root pg_ctlcluster --skip-systemctl-redirect "$pgver" main start
  wait_port PostgreSQL 5432 60
fi
if [ "$(psql -h 127.0.0.1 -U postgres -tAc "SELECT 1 FROM pg_database WHERE datname = 'test'")" != "1" ]; then
  say "creating the PostgreSQL database test"
  psql -h 127.0.0.1 -U postgres -qc "CREATE DATABASE test"
fi

# --- 3. Redis -------------------------------------------------------------------------------------------------
if ! up 6379; then
  say "starting Redis"
  as_root mkdir -p /var/lib/redis /var/log/redis
  as_root redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
    --dir /var/lib/redis --logfile /var/log/redis/ci.log
  wait_port Redis 6379 30
fi

# --- 4. RabbitMQ ----------------------------------------------------------------------------------------------
if ! up 5672; then
  say "starting RabbitMQ"
  as_root rabbitmq-server -detached
  wait_port RabbitMQ 5672 120
fi
say "PostgreSQL, Redis and RabbitMQ answer on 127.0.0.1"
