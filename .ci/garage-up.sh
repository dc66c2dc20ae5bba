#!/usr/bin/env bash
# Starts a throwaway single-node Garage (S3) on loopback and prints the export lines the tests read:
#   eval "$(bash .ci/garage-up.sh)"      # later: kill "$FLEET_GARAGE_PID"; rm -rf "$FLEET_GARAGE_DIR"
# Garage 2.5 creates its layout, the key and the bucket itself (--single-node --default-bucket).
# Diagnostics go to stderr; stdout carries only what the caller evals. On any failure stdout ends with
# `false`, so `eval "$(bash .ci/garage-up.sh)"` itself fails (exit 1) instead of exporting nothing.
set -euo pipefail
trap 'rc=$?; if [ "$rc" -ne 0 ]; then echo "echo \"garage-up.sh failed (exit $rc): no S3 settings exported\" >&2; false"; fi' EXIT
garage_bin=${GARAGE_BIN:-$(command -v garage || echo "$HOME/.cargo/bin/garage")}
if [ ! -x "$garage_bin" ]; then
  echo "garage not found: installing it (cargo install garage --locked --version 2.5.0; takes a while once)" >&2
  cargo install garage --locked --version 2.5.0 >&2
  garage_bin="$HOME/.cargo/bin/garage"
fi
[ -x "$garage_bin" ] || { echo "garage not found at $garage_bin after installing" >&2; exit 1; }
dir=$(mktemp -d /tmp/fleet-garage.XXXXXX)
read -r s3_port rpc_port admin_port < <(python3 - <<'PY'
import socket
socks = [socket.socket() for _ in range(3)]
for s in socks: s.bind(("127.0.0.1", 0))
print(*[s.getsockname()[1] for s in socks])
PY
)
hex() { python3 -c "import secrets,sys; print(secrets.token_hex(int(sys.argv[1])))" "$1"; }
cat > "$dir/garage.toml" <<TOML
metadata_dir = "$dir/meta"
data_dir = "$dir/data"
db_engine = "sqlite"
replication_factor = 1
rpc_bind_addr = "127.0.0.1:$rpc_port"
rpc_public_addr = "127.0.0.1:$rpc_port"
rpc_secret = "$(hex 32)"

[s3_api]
s3_region = "garage"
api_bind_addr = "127.0.0.1:$s3_port"
root_domain = ".s3.garage.localhost"

[admin]
api_bind_addr = "127.0.0.1:$admin_port"
TOML
export GARAGE_DEFAULT_ACCESS_KEY="GK$(hex 12)" GARAGE_DEFAULT_SECRET_KEY="$(hex 32)" GARAGE_DEFAULT_BUCKET="fleet-test"
"$garage_bin" -c "$dir/garage.toml" server --single-node --default-bucket >"$dir/garage.log" 2>&1 &
pid=$!
# Ready when the default bucket answers an S3 request (an unsigned GET is refused with 403, not a reset).
ready=no
for _ in $(seq 1 120); do
  code=$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$s3_port/$GARAGE_DEFAULT_BUCKET" || true)
  if [ "$code" = 403 ] || [ "$code" = 200 ]; then ready=yes; break; fi
  kill -0 "$pid" 2>/dev/null || { cat "$dir/garage.log" >&2; exit 1; }
  sleep 0.5
done
if [ "$ready" != yes ]; then
  echo "Garage did not answer on 127.0.0.1:$s3_port within 60 s; its log:" >&2
  cat "$dir/garage.log" >&2
  kill "$pid" 2>/dev/null || true
  exit 1
fi
cat <<OUT
export FLEET_GARAGE_PID=$pid FLEET_GARAGE_DIR=$dir
export FLEET_TEST_S3_ENDPOINT=http://127.0.0.1:$s3_port FLEET_TEST_S3_REGION=garage
export FLEET_TEST_S3_ACCESS_KEY=$GARAGE_DEFAULT_ACCESS_KEY FLEET_TEST_S3_SECRET_KEY=$GARAGE_DEFAULT_SECRET_KEY
export FLEET_TEST_S3_BUCKET=$GARAGE_DEFAULT_BUCKET
OUT
