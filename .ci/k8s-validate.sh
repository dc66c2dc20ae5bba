#!/usr/bin/env bash
# Renders deploy/k8s with kustomize and validates the result (.ci/k8s-validate.py says exactly what is
# checked). kustomize: `kubectl kustomize` (built in since kubectl 1.14), else a standalone `kustomize`.
# Validator: kubernetes-validate from PyPI, pinned with its dependencies, in .ci/.venv-k8s.
#   bash .ci/k8s-validate.sh
set -euo pipefail
cd "$(dirname "$0")/.."
venv=.ci/.venv-k8s
requirements='kubernetes-validate==1.37.0
attrs==26.1.0
importlib_resources==7.1.0
jsonschema==4.26.0
jsonschema-specifications==2025.9.1
packaging==26.4
PyYAML==6.0.4
referencing==0.37.0
rpds-py==2026.9.1
typing_extensions==4.16.0'
stamp=$venv/.fleet-requirements
if ! { [ -x "$venv/bin/python" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$requirements" ]; }; then
  "${PYTHON:-python3}" -m venv "$venv"
  printf '%s\n' "$requirements" >"$venv/requirements.txt"
  "$venv/bin/python" -m pip install --disable-pip-version-check --no-input -q -r "$venv/requirements.txt"
  printf '%s' "$requirements" >"$stamp"
fi
if command -v kubectl >/dev/null 2>&1; then
  render() { kubectl kustomize deploy/k8s; }
elif command -v kustomize >/dev/null 2>&1; then
  render() { kustomize build deploy/k8s; }
else
  echo "k8s-validate: neither kubectl nor kustomize is installed; cannot render deploy/k8s" >&2
  exit 1
fi
render | "$venv/bin/python" .ci/k8s-validate.py
