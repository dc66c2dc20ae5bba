#!/usr/bin/env bash
# Link-only stub of libcudnn.so.9 for building `--features cuda` on a machine without cuDNN (CI, the
# development machines). cudarc's `cudnn` feature links `-lcudnn`; every cuDNN entry point cudarc declares is
# defined here to return an error. The binary runs against the real libcudnn.so.9 where it is present (the GPU
# machine's PyTorch install: nvidia/cudnn/lib). Prints an export line; idempotent, cached.
# Usage: eval "$(../shared/tools/cuda-build-env.sh)"; eval "$(bash tools/cudnn-stub.sh)"
set -euo pipefail
dir=${CUDA_ENV_DIR:-$HOME/.cache/cuda13-build-env}/cudnn-stub
if [ ! -e "$dir/libcudnn.so" ]; then
  src=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-0.19.*/src/cudnn/sys 2>/dev/null | tail -1)
  if [ -z "$src" ]; then
    cargo fetch --locked -q >&2
    src=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-0.19.*/src/cudnn/sys 2>/dev/null | tail -1)
  fi
  [ -n "$src" ] || { echo "cudnn-stub: cudarc sources not found (run cargo fetch first)" >&2; exit 1; }
  mkdir -p "$dir"
  grep -rhoE "fn cudnn[A-Za-z0-9_]+" "$src" | sed 's/^fn //' | sort -u \
    | awk '{print "int " $1 "(void){return 4000;}"}' > "$dir/stub.c"
  gcc -shared -fPIC -Wl,-soname,libcudnn.so.9 -o "$dir/libcudnn.so" "$dir/stub.c" >&2
fi
echo "export LIBRARY_PATH=\"$dir\${LIBRARY_PATH:+:\$LIBRARY_PATH}\" RUSTFLAGS=\"\${RUSTFLAGS:-} -L $dir\""
