#!/usr/bin/env bash
# Set up (a Python 3.12 venv, .venv) and run the tiny recipe: a Qwen2.5-shaped toy on mock data, one GPU,
# about a minute, outputs in exp/tiny/. On a host without an NVIDIA GPU it says so and shows the dry run.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/python312.sh
VENV=${INFIR2_VENV:-.venv}
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    # the torch of the GPU image stays (a CUDA 13 build, which Transformer Engine's cu13 wheel needs): no pin here
    venv_with "$VENV" -e '.[megatron,gpu]'
    exec "$VENV/bin/infir2" train --recipe tiny "$@"
fi
echo "no NVIDIA GPU on this host (nvidia-smi finds none): showing what \`infir2 train --recipe tiny\` would run" >&2
venv_with "$VENV" -e .
exec "$VENV/bin/infir2" train --recipe tiny --dry-run "$@"
