#!/usr/bin/env bash
# Install (Debian's postgresql), start a PostgreSQL server on loopback and create the test role and database.
# Idempotent. Prints the SQLAlchemy URL as its last line: export RLHF_TEST_POSTGRES_URL=$(bash .ci/postgres.sh | tail -1)
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
if ! command -v pg_ctlcluster >/dev/null; then
  apt-get update -qq >&2
  apt-get install -y -qq postgresql >&2
fi
version=$(ls /usr/lib/postgresql | sort -V | tail -1)
if ! pg_lsclusters -h | awk '{print $1" "$2}' | grep -qx "$version main"; then
  pg_createcluster "$version" main >&2
fi
if ! pg_lsclusters -h | grep "^$version main" | grep -q online; then
  pg_ctlcluster "$version" main start >&2
fi
port=$(pg_lsclusters -h | awk -v v="$version" '$1==v && $2=="main" {print $3}')
as_postgres() { su postgres -c "psql -p $port -v ON_ERROR_STOP=1 -tAc \"$1\""; }
if [ "$(as_postgres "SELECT 1 FROM pg_roles WHERE rolname='rlhf'")" != "1" ]; then
  as_postgres "CREATE ROLE rlhf LOGIN PASSWORD 'rlhf' CREATEDB" >&2
fi
if [ "$(as_postgres "SELECT 1 FROM pg_database WHERE datname='rlhf'")" != "1" ]; then
  as_postgres "CREATE DATABASE rlhf OWNER rlhf" >&2
fi
echo "postgresql+psycopg2://rlhf:rlhf@127.0.0.1:$port/rlhf"
