#!/usr/bin/env bash
# The GPU checks in one run, on one CUDA GPU, within 10 minutes: tests/test_gpu.py, which holds
#   - device-aware precision, batched sampling and ppo (full weights and LoRA) on the GPU;
#   - every stage (sft, reward, dpo, ppo) under `accelerate launch` with ddp.yaml, fsdp2.yaml, deepspeed_zero2.yaml
#     and deepspeed_zero3.yaml, one process each, writing a model directory that loads;
#   - sampling through vLLM (`--backend vllm`), where vllm is installed.
# CI has no GPU; run this whenever one is at hand and keep its output (a closing note, the README's table).
#
#   bash tests/gpu_check.sh [PYTHON]
#
# PYTHON: a Python with rlhf installed over a CUDA build of torch (`pip install -e '.[dev]'`); by default the
# project's .venv, else python3. WHEELS=DIR: first install rlhf and its dependencies from the wheels in DIR, with no
# index (for a machine without internet: `pip download -d DIR -e '.[dev]'` on one with the same Python).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${1:-}
if [ -z "$PY" ]; then
    if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
if [ -n "${WHEELS:-}" ]; then
    "$PY" -m pip install -q --no-index --find-links "$WHEELS" -e '.[dev]' || exit 1
fi
"$PY" - <<'EOF' || exit 1
import importlib.util
import sys

import torch

if not torch.cuda.is_available():
    sys.exit("gpu_check: no CUDA GPU visible to torch " + torch.__version__)
print("gpu_check:", torch.cuda.get_device_name(0), "| torch", torch.__version__, "| CUDA", torch.version.cuda)
for name in ("transformers", "trl", "accelerate", "peft", "deepspeed", "vllm"):
    spec = importlib.util.find_spec(name)
    version = __import__(name).__version__ if spec else "not installed (its tests skip)"
    print(f"gpu_check: {name} {version}")
EOF
start=$(date +%s)
HF_HUB_OFFLINE=1 timeout 600 "$PY" -m pytest -p no:cacheprovider -q -rs --durations=0 tests/test_gpu.py
status=$?
echo "gpu_check: pytest exited $status after $(( $(date +%s) - start )) s"
exit $status
