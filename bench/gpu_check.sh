#!/usr/bin/env bash
# GPU check for a machine with one NVIDIA GPU and no network: ResNet-50 bf16 extraction on CUDA against the
# forward pass alone and against the lowest ceiling it depends on (the embedder eager / graphed / compiled, each
# decoder feeding a no-op model), measured in the same run; generated 320x240 and 1280x720 clips, and real H.264
# clips with the CPU decoder and NVDEC (PyNvVideoCodec) when .cache/h264/ holds them (bench/fetch_h264.py). Also:
# `pipeline extract` in a fresh process (start-up apart), the device path's features against the CPU path's
# (cosine), bit-identical batching, a killed decode worker, GPU busy share, peak GPU memory and host RSS, a short
# ResNet-50 fine-tune in bf16 (clips/s, the loss going down), and the other kinds of backbone (a timm CLIP
# ViT-B/16 when timm is installed, R3D-18 windows of 16 frames: rows/s against their pure forward, device rows
# against CPU rows). One table; about 5 minutes (stopped at LIMIT_S, 420 s); nothing is downloaded or installed.
#
#   bash bench/gpu_check.sh                      # uses python3 from PATH
#   PYTHON=/opt/env/bin/python bash bench/gpu_check.sh --no-targets   # options go to bench/gpu_check.py
#   DEVICE=cpu LIMIT_S=900 bash bench/gpu_check.sh --resolutions 320x240 --clips 2 --frames 16 \
#       --cpu-frames 8 --h264-copies 1 --h264-frames 8 --finetune-per-class 8 --finetune-frames 16 \
#       --finetune-resolution 160x120 --finetune-crop 64   # dry run, no GPU
#
# Exit status: 0 all checks passed, 1 a check failed, 2 the environment lacks something, 124 over the time limit.
set -euo pipefail

cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
LIMIT_S=${LIMIT_S:-420}
export DEVICE=${DEVICE:-cuda}

if ! command -v "$PYTHON" >/dev/null 2>&1; then
    echo "gpu_check: no Python at '$PYTHON'; set PYTHON=/path/to/python" >&2
    exit 2
fi

# The repository's package comes from this checkout, without installing anything.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export OMP_WAIT_POLICY=PASSIVE

# NVDEC needs PyNvVideoCodec (the nvdec extra). When it is not installed and its wheel was carried here
# (.cache/wheels/pynvvideocodec-*.whl, one per Python version; pip picks the one that fits), it goes into
# .cache/site without network, for this check only.
if ! "$PYTHON" -c "import PyNvVideoCodec" >/dev/null 2>&1; then
    for wheel in .cache/wheels/pynvvideocodec-*.whl .cache/wheels/PyNvVideoCodec-*.whl; do
        [ -f "$wheel" ] || continue
        if "$PYTHON" -m pip install -q --no-index --no-deps --target .cache/site "$wheel" >/dev/null 2>&1; then
            export PYTHONPATH="$PYTHONPATH:$PWD/.cache/site"
            echo "gpu_check: PyNvVideoCodec from $wheel"
            break
        fi
    done
fi

"$PYTHON" - <<'EOF' || exit 2
import importlib
import os
import sys

needed = {"torch": "torch", "torchvision": "torchvision", "numpy": "numpy", "h5py": "h5py",
          "cv2": "opencv-python-headless", "typer": "typer", "tqdm": "tqdm"}
missing = []
for module, dist in needed.items():
    try:
        importlib.import_module(module)
    except Exception as e:  # ImportError, or a broken binary wheel
        missing.append(f"{dist} (import {module}: {type(e).__name__}: {e})")
if missing:
    print("gpu_check: missing Python packages, install them from a local wheel cache:\n  " + "\n  ".join(missing),
          file=sys.stderr)
    sys.exit(2)
import torch

print(f"python {sys.version.split()[0]} at {sys.executable}; torch {torch.__version__}, CUDA {torch.version.cuda}")
import pipeline.extract.run  # noqa: E402

extra = sorted(m for m in ("optuna", "yaml", "sklearn", "matplotlib") if m in sys.modules)
if extra:  # stage one must run where only its own dependencies are installed
    print(f"gpu_check: importing pipeline.extract.run pulls in {', '.join(extra)}", file=sys.stderr)
    sys.exit(1)
if os.environ["DEVICE"] == "cpu":
    sys.exit(0)
if not torch.cuda.is_available():
    print("gpu_check: torch sees no CUDA GPU (a CPU-only torch build, or no driver)", file=sys.stderr)
    sys.exit(2)
print(f"GPU: {torch.cuda.get_device_name(0)}")
EOF

status=0
timeout "$LIMIT_S" "$PYTHON" bench/gpu_check.py --device "$DEVICE" "$@" || status=$?
if [ "$status" -eq 124 ]; then
    echo "gpu_check: over the ${LIMIT_S}s limit" >&2
fi
exit "$status"
