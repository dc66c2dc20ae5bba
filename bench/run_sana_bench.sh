#!/bin/bash
# sana-bench driver (see bench/README.md): run from the repository root on the GPU machine, one run call:
# random-weight checkpoints at the real configs → diffusers timings → our timings + the comparison table.
# Carry: .gpu/sana-bench.gz (stripped, gzipped release binary) and .gpu/whl (diffusers 0.42.1 wheel).
# Full log: $OUT/sana_bench_full.log; diffusers JSON: $OUT/diffusers_reference.json.
set -o pipefail
START=$(date +%s)
LIMIT=${SANA_BENCH_LIMIT_S:-580}
exec > >(tee -a "$OUT/sana_bench_full.log") 2>&1
left() { echo $(( LIMIT - ($(date +%s) - START) )); }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
SP=$(python3 -c "import nvidia,os;print(os.path.dirname(nvidia.__path__[0]))")
export LD_LIBRARY_PATH=$(ls -d $SP/nvidia/*/lib | tr '\n' ':')$LD_LIBRARY_PATH
S=$(mktemp -d); pip install -q --no-index --no-deps --target "$S" .gpu/whl/*.whl && export PYTHONPATH=$S
python3 -c "import torch, transformers, diffusers; print('torch', torch.__version__, 'transformers', transformers.__version__, 'diffusers', diffusers.__version__)"
gunzip -c .gpu/sana-bench.gz > /tmp/sana-bench && chmod +x /tmp/sana-bench
df -h /tmp | tail -1
echo "== checkpoints ($(left) s left)"
timeout 150 python3 bench/make_real_random_checkpoints.py /tmp/sana_real /tmp/sana_sprint_real; echo "checkpoints exit $?"
echo "== diffusers ($(left) s left)"
timeout 230 python3 bench/diffusers_reference_bench.py; echo "diffusers exit $?"
echo "== sana-bench ($(left) s left)"
SANA_BENCH_CASE_BUDGET_S=${SANA_BENCH_CASE_BUDGET_S:-20} timeout $(( $(left) - 5 )) \
  /tmp/sana-bench /tmp/sana_real /tmp/sana_sprint_real "$OUT/diffusers_reference.json"
echo "sana-bench exit $? after $(( $(date +%s) - START )) s"
