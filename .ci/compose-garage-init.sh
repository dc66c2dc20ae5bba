#!/usr/bin/env bash
# Runs docker-compose's `garage-init` service against a real Garage, as compose runs it, without Docker:
#   bash .ci/compose-garage-init.sh GARAGE_CONFIG BUCKET
# GARAGE_CONFIG is the config of a running Garage (.ci/garage-up.sh writes one), BUCKET its default bucket.
# The dxflrs/garage image holds only the `/garage` binary (no shell), so the init is the command written in
# docker-compose.yml; this script reads that command from the resolved compose file and checks what the
# container needs around it, then runs it with the local garage binary:
#   1. garage-init mounts the volume that the garage service mounts at its config's metadata_dir (the CLI
#      reads the node key there) and the same config file, and shares garage's network namespace (the CLI
#      dials rpc_public_addr, 127.0.0.1:3901);
#   2. the command, with /garage → the local binary and /etc/garage.toml → GARAGE_CONFIG and the compose
#      bucket → BUCKET, exits 0 and names the bucket.
set -euo pipefail
cd "$(dirname "$0")/.."
config=${1:?usage: compose-garage-init.sh GARAGE_CONFIG BUCKET}
bucket=${2:?usage: compose-garage-init.sh GARAGE_CONFIG BUCKET}
garage_bin=${GARAGE_BIN:-$(command -v garage || echo "$HOME/.cargo/bin/garage")}
resolved=$(S3_BUCKET=compose-bucket docker-compose -f docker-compose.yml config)
argv_text=$(python3 - "$resolved" <<'PY'
import sys, tomllib, yaml
c = yaml.safe_load(sys.argv[1])["services"]
init, server = c["garage-init"], c["garage"]
def mounts(svc):
    out = {}
    for v in svc.get("volumes", []):
        if isinstance(v, str):
            src, dst = v.split(":")[:2]
        else:
            src, dst = v["source"], v["target"]
        out[dst] = src.rsplit("/", 1)[-1] if src.startswith("/") else src
    return out
cmd = init["command"]
cfg_path = cmd[cmd.index("-c") + 1]
meta_dir = tomllib.load(open("deploy/garage.toml", "rb"))["metadata_dir"]
m_init, m_server = mounts(init), mounts(server)
problems = []
if m_server.get(meta_dir) is None:
    problems.append(f"garage mounts nothing at its metadata_dir {meta_dir}")
elif m_init.get(meta_dir) != m_server[meta_dir]:
    problems.append(f"garage-init does not mount the garage metadata volume at {meta_dir} (the CLI needs the node key)")
if m_init.get(cfg_path) is None or m_init.get(cfg_path) != m_server.get(cfg_path):
    problems.append(f"garage-init does not mount garage's config at {cfg_path}")
if init.get("network_mode") != "service:garage":
    problems.append("garage-init does not share garage's network (network_mode: service:garage)")
if problems:
    sys.exit("docker-compose.yml garage-init: " + "; ".join(problems))
for a in cmd:
    print(a)
PY
)
mapfile -t argv <<<"$argv_text"
for i in "${!argv[@]}"; do
  case "${argv[$i]}" in
    /garage) argv[$i]=$garage_bin ;;
    /etc/garage.toml) argv[$i]=$config ;;
    compose-bucket) argv[$i]=$bucket ;;
  esac
done
echo "garage-init as compose runs it: ${argv[*]}" >&2
out=$("${argv[@]}" 2>&1) || { echo "$out" >&2; echo "garage-init failed" >&2; exit 1; }
grep -q "$bucket" <<<"$out" || { echo "$out" >&2; echo "garage-init output does not name bucket $bucket" >&2; exit 1; }
echo "garage-init: ok (bucket $bucket)" >&2
