#!/bin/bash
# gpu-check driver (see bench/README.md): run from the repository root on the GPU machine.
set -o pipefail
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
SP=$(python3 -c "import nvidia,os;print(os.path.dirname(nvidia.__path__[0]))")
export LD_LIBRARY_PATH=$(ls -d $SP/nvidia/*/lib | tr '\n' ':')$LD_LIBRARY_PATH
gunzip -c .gpu/gpu-check.gz > /tmp/gpu-check && chmod +x /tmp/gpu-check
mkdir -p /tmp/randn_live
python3 bench/torch_randn_extra.py /tmp/randn_live 2>&1 | tail -3
/tmp/gpu-check . /tmp/randn_live 2>&1 | tee "$OUT/gpu_check.log"
echo "gpu-check exit ${PIPESTATUS[0]}"
