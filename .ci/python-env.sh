#!/usr/bin/env bash
# Creates (or reuses) the Python virtual environment at .ci/.venv with fal's own client and pika (AMQP) from
# PyPI, pinned exactly with their dependencies, for tests/fal_client_compat.rs and the examples/ that
# tests/examples.rs runs. Idempotent: when the venv already holds these pins it returns at once. Prints
# nothing unless something fails.
#   bash .ci/python-env.sh            # then: .ci/.venv/bin/python -c 'import fal_client, pika'
set -euo pipefail
cd "$(dirname "$0")/.."
venv=.ci/.venv
stamp=$venv/.fleet-requirements
# fal-client 1.0.3 (PyPI, 2025) and the versions pip resolved for it, bump them together; pika (no
# dependencies) for examples/amqp_pika.py.
requirements='fal-client==1.0.3
aiofiles==25.1.0
anyio==4.16.0
asyncstdlib==3.14.0
certifi==2026.10.19.post1
h11==0.16.0
httpcore==1.0.9
httpx==0.28.1
httpx-sse==0.4.3
idna==3.20
msgpack==1.2.4
typing_extensions==4.16.0
websockets==17.4
pika==1.4.4'

if [ -x "$venv/bin/python" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$requirements" ]; then
  exit 0
fi

python=${PYTHON:-python3}
command -v "$python" >/dev/null 2>&1 || { echo "python-env: $python not found (install Python ≥ 3.8 with venv)" >&2; exit 1; }
log=$(mktemp)
trap 'rm -f "$log"' EXIT
fail() { echo "python-env: $1" >&2; cat "$log" >&2; exit 1; }
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv" >"$log" 2>&1 || fail "cannot create $venv"
req_file=$venv/requirements.txt
printf '%s\n' "$requirements" >"$req_file"
"$venv/bin/python" -m pip install --disable-pip-version-check --no-input -q -r "$req_file" >"$log" 2>&1 ||
  fail "pip install of the pinned fal-client and pika failed"
"$venv/bin/python" -c 'import fal_client, pika' >"$log" 2>&1 || fail "fal_client or pika does not import"
printf '%s' "$requirements" >"$stamp"
