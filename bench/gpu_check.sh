#!/usr/bin/env bash
# One GPU check, under 4 minutes, with whatever PyTorch the machine has:
#   1. end-to-end over model-only training images/s, b0 at 224 px (AMP, channels_last):
#      does the data path (prefetcher, device-side flips and turns) keep the GPU busy?
#   2. training images/s of b0 and b3 at 224 and 300 px (channels_last + autocast);
#   3. a 3-trial search at 128 px on the demo set (a temporary study file and storage).
#
# Run from anywhere:  bash bench/gpu_check.sh
#   PYTHON=...            the interpreter (default: .venv/bin/python if present, else python3);
#                         it needs the project's dependencies, with any torch/torchvision.
#   GPU_CHECK_SHORT=1     a short run a CPU can do: tiny sizes, few steps, 1 epoch per trial.
#   GPU_CHECK_DATA=DIR    search this folders-layout rgb + depth set instead of generating the
#                         demo (tests/bench gives a tiny one, to finish in seconds).
# Figures go to stdout; the temporary study, its storage, cache and logs are removed at the end.
set -euo pipefail

cd "$(dirname "$0")/.."
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# Absolute (the search runs in a temporary folder), symlinks kept: a venv's python is one.
[[ "$PYTHON" == */* ]] && PYTHON="$(cd "$(dirname "$PYTHON")" && pwd)/$(basename "$PYTHON")"
[[ -n "${GPU_CHECK_DATA:-}" ]] && GPU_CHECK_DATA=$(realpath "$GPU_CHECK_DATA")

if ! missing=$("$PYTHON" -c "import search.cli, bench.data_path, bench.train_throughput" 2>&1); then
    echo "gpu_check: $PYTHON cannot import the project: ${missing##*$'\n'}" >&2
    echo "gpu_check: install its dependencies (pyproject.toml) next to your torch" >&2
    exit 2
fi

short="${GPU_CHECK_SHORT:-0}"
if [[ "$short" == 1 ]]; then
    ratio_args=(--ratio-resolution 32 --ratio-steps 2 --batch 8)
    throughput_args=(--backbones b0 --resolutions 32 --steps 1 --batch-size 8 --warmup 1)
    resolution=32 epochs=1 backbones='["b0"]' fusions='["none"]'
    limit=(150 150 200)  # seconds per part: a shared CPU is slow
else
    ratio_args=(--ratio-resolution 224 --ratio-steps 40 --batch 64)
    throughput_args=(--backbones b0,b3 --resolutions 224,300 --steps 10 --batch-size 64 --warmup 2)
    resolution=128 epochs=8 backbones='["b0"]' fusions='["none", "early", "late"]'
    limit=(60 60 110)  # seconds per part: the whole check stays under 4 minutes
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

"$PYTHON" - <<'EOF'
import platform

import torch

gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA GPU"
print(f"gpu_check: {gpu}; torch {torch.__version__}, CUDA {torch.version.cuda}, "
      f"Python {platform.python_version()}, {torch.get_num_threads()} CPU threads")
EOF

echo "== 1. end-to-end / model-only, b0, AMP where the device has it, channels_last"
timeout "${limit[0]}" "$PYTHON" -m bench.data_path --skip host,stub "${ratio_args[@]}"

echo "== 2. training images/s, channels_last + autocast"
timeout "${limit[1]}" "$PYTHON" -m bench.train_throughput "${throughput_args[@]}" \
    --implementations torchvision --variants channels_last+autocast | tail -n 8

echo "== 3. a 3-trial search at ${resolution} px on the demo set"
cat > "$work/check.toml" <<EOF
[study]
name = "gpu-check"
n_trials = 3
seed = 0
storage = "sqlite:///$work/study.db"

[data]
root = "${GPU_CHECK_DATA:-$work/apples}"
format = "folders"
modalities = ["rgb", "depth"]
$([[ -n "${GPU_CHECK_DATA:-}" ]] || echo 'demo = "apples"')
cache_dir = "$work/cache"

[augment]
target_per_class = "max"
ops = ["flip_left_right", "flip_top_bottom", "rotate90"]

[train]
epochs = $epochs
warmup_epochs = 0
batch_size = 32
resolution = $resolution
device = "auto"
workers = 1
implementation = "torchvision"
pretrained = "none"  # it measures speed; a GPU machine may have no internet for the weights

[space]
backbone = $backbones
fusion = $fusions
optimizer = ["adamw"]
lr = { low = 1e-3, high = 1e-2, log = true }
balance = "class_weights"
EOF
start=$SECONDS
cd "$work"  # its runs/ folder (logs) lands in the temporary folder too
# SIGINT: `search run` stops its workers on Ctrl-C; a plain TERM would orphan them.
timeout -s INT -k 30 "${limit[2]}" "$PYTHON" -m search run --study check.toml
"$PYTHON" -m search status --study check.toml --timing | tail -n 12
echo "gpu_check: search took $((SECONDS - start)) s; done"
