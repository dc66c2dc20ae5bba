#!/bin/bash
# One GPU-machine call for the speed work (bench/README.md): run from the repository root there.
# Carry: .gpu (sana-bench.xz, gpu-check.xz: stripped, xz-compressed release binaries (.gz also read); whl/ diffusers 0.42.1).
# STEPS (default "harness check profile bench"), any of:
#   harness   bench/kernel_harness.py: each .cu kernel against torch at real shapes (CuPy, no Rust build)
#   check     gpu-check: fused ops vs portable path, real-size forward/decode fused vs portable, tiny e2e
#             against diffusers, torch randn bit-exactness
#   profile   ncu per-kernel tables of one transformer forward and one DC-AE decode → $OUT/*.md, *.csv.gz
#             (PROFILE="fwd decode gemma sprint" picks the components; gemma: one 510-token Gemma-2 pass;
#             sprint: one whole Sprint 1024² request)
#   diffusers diffusers eager (all cases) → $OUT/diffusers_reference.json
#   compiled  diffusers torch.compile, 1024² cases → $OUT/diffusers_compiled.json
#   bench     sana-bench (ours) with whichever diffusers JSONs exist → $OUT/results.json + table
set -o pipefail
START=$(date +%s)
STEPS=${STEPS:-harness check profile bench}
exec > >(tee -a "$OUT/round.log") 2>&1
has() { [[ " $STEPS " == *" $1 "* ]]; }
left() { echo $(( ${ROUND_LIMIT_S:-590} - ($(date +%s) - START) )); }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
SP=$(python3 -c "import nvidia,os;print(os.path.dirname(nvidia.__path__[0]))")
export LD_LIBRARY_PATH=$(ls -d $SP/nvidia/*/lib | tr '\n' ':')$LD_LIBRARY_PATH
export PYTHONUNBUFFERED=1
for b in sana-bench gpu-check; do
  # xz: the working tree and .gpu travel in 64 MiB; two gzipped binaries (16 MB each) no longer fit beside it.
  [ -f .gpu/$b.xz ] && xz -dc .gpu/$b.xz > /tmp/$b && chmod +x /tmp/$b
  [ -f .gpu/$b.gz ] && gunzip -c .gpu/$b.gz > /tmp/$b && chmod +x /tmp/$b
done
S=$(mktemp -d); pip install -q --no-index --no-deps --target "$S" .gpu/whl/*.whl && export PYTHONPATH=$S
if has harness; then echo "== harness ($(left) s left)"; timeout 120 python3 bench/kernel_harness.py 2>&1 | grep -v Deprecation | grep -v "launch(f"; fi
if has check || has profile || has bench || has diffusers || has compiled; then
  if [ ! -d /tmp/sana_real ]; then
    echo "== checkpoints ($(left) s left)"
    timeout 200 python3 bench/make_real_random_checkpoints.py /tmp/sana_real /tmp/sana_sprint_real; echo "checkpoints exit $?"
  fi
fi
if has check; then
  echo "== gpu-check ($(left) s left)"
  mkdir -p /tmp/randn_live; python3 bench/torch_randn_extra.py /tmp/randn_live 2>&1 | tail -1
  # Host-sync counter (bench/sync_count.c): built here if gcc exists, else carried prebuilt in .gpu/.
  SHIM=.gpu/libsync_count.so; command -v gcc >/dev/null && gcc -O2 -shared -fPIC -o /tmp/libsync_count.so bench/sync_count.c -ldl && SHIM=/tmp/libsync_count.so
  PRE=""; [ -f "$SHIM" ] && PRE="$(realpath $SHIM)"; echo "sync shim: ${PRE:-none}"
  LD_PRELOAD="$PRE" timeout 240 /tmp/gpu-check . /tmp/randn_live /tmp/sana_real /tmp/sana_sprint_real > "$OUT/gpu_check.log" 2>&1; echo "gpu-check exit $?"
  sed -n '/^## gpu-check/,$p' "$OUT/gpu_check.log"
fi
if has profile; then
  for w in ${PROFILE:-fwd decode}; do
    echo "== ncu $w ($(left) s left)"
    SANA_BENCH_PROFILE=$w timeout 200 ncu --profile-from-start off --clock-control none \
      --metrics gpu__time_duration.sum --csv /tmp/sana-bench /tmp/sana_real /tmp/sana_sprint_real > /tmp/ncu_$w.csv 2>/tmp/ncu_$w.err
    echo "ncu $w exit $?"; tail -3 /tmp/ncu_$w.err
    grep -m1 "profiled one" /tmp/ncu_$w.csv
    python3 bench/ncu_table.py /tmp/ncu_$w.csv "after: $w" > "$OUT/profile_$w.md" && head -30 "$OUT/profile_$w.md"
    gzip -c /tmp/ncu_$w.csv > "$OUT/ncu_$w.csv.gz"
  done
fi
if has diffusers; then echo "== diffusers eager ($(left) s left)"; timeout 260 python3 bench/diffusers_reference_bench.py; echo "diffusers exit $?"; fi
if has compiled; then
  echo "== diffusers compiled ($(left) s left)"
  COMPILE=1 JSON_NAME=diffusers_compiled.json ONLY="${COMPILED_ONLY:-base 1024x1024 18 steps|sprint 1024x1024 2 steps|dc-ae decode|transformer fwd}" \
    timeout 300 python3 bench/diffusers_reference_bench.py; echo "compiled exit $?"
fi
if has bench; then
  echo "== sana-bench ($(left) s left)"
  # Diffusers figures of this call; DIFFUSERS_JSON / COMPILED_JSON name an earlier call's (a quick round
  # between kernel changes; the committed results always come from one call that ran both).
  D="${DIFFUSERS_JSON:-}"; [ -f "$OUT/diffusers_reference.json" ] && D="$OUT/diffusers_reference.json"
  C="${COMPILED_JSON:-}"; [ -f "$OUT/diffusers_compiled.json" ] && C="$OUT/diffusers_compiled.json"
  [ -z "$D" ] && [ -n "$C" ] && D=/dev/null
  SANA_BENCH_JSON="$OUT/results.json" SANA_BENCH_DATE=$(date -u +%F) SANA_BENCH_CASE_BUDGET_S=${SANA_BENCH_CASE_BUDGET_S:-15} \
    timeout $(( $(left) - 5 )) /tmp/sana-bench /tmp/sana_real /tmp/sana_sprint_real $D $C; echo "sana-bench exit $? after $(( $(date +%s) - START )) s"
fi
