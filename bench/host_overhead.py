"""The feeding thread's own cost per frame: the run loop with frames already decoded and a model that does nothing.

On a GPU the thread that feeds the model is the limit once decoding keeps up (docs/performance.md): every chunk and
batch costs Python work (routing events, cutting batches, launching the forward, handing features to the sink). This
script runs the real loop (`pipeline.extract.run._Loop`: batcher, FrameEmbedder, PartSink writing real part files)
on a CPU, fed by an in-memory source of tiny crops through a no-op model, so what it measures is that overhead alone,
anywhere, without a GPU. It prints the feeding thread's CPU microseconds per frame and the wall time per frame.

    python bench/host_overhead.py                         # batches of 256, chunks of 32 (the GPU defaults)
    python bench/host_overhead.py --batch-size 8 --chunk 8 --frames 20000
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
from common import machine  # bench/common.py, beside this script

from pipeline.data.cache import CacheWriter
from pipeline.extract.backbone import FrameEmbedder, LoadedBackbone
from pipeline.extract.inputs import VideoItem
from pipeline.extract.run import ExtractReport, _Loop, build_config
from pipeline.extract.sources import Ended, Rows
from pipeline.spec import FeatureSpec, Preprocessing, Sampling

CROP = 8  # pixels: tensor work stays negligible, the loop's own cost is what remains


class MemorySource:
    """Decoded crops from memory: `videos` videos of `frames` rows, in chunks of `chunk`, released at once."""

    def __init__(self, videos: int, frames: int, chunk: int):
        self.crops = torch.randint(0, 256, (chunk, 3, CROP, CROP), dtype=torch.uint8)
        self.todo = [(v, start) for v in range(videos) for start in range(0, frames, chunk)]
        self.frames, self.chunk, self.pos = frames, chunk, 0

    busy = property(lambda self: self.pos < len(self.todo))
    in_flight_copies = False
    restarts = 0

    def poll(self, timeout: float) -> list:
        events = []
        for _ in range(4):  # a few chunks per poll, as several workers would deliver
            if self.pos == len(self.todo):
                break
            video, start = self.todo[self.pos]
            self.pos += 1
            n = min(self.chunk, self.frames - start)
            idx = np.arange(start, start + n)
            events.append(Rows(video, self.crops[:n], idx, idx / 25.0, native=False))
            if start + n == self.frames:
                events.append(Ended(video, {"decoded_frames": self.frames}))
        return events

    def close(self, device) -> None:
        pass


def run_once(root: Path, videos: int, frames: int, chunk: int, batch_size: int) -> tuple[float, float, int]:
    pre = Preprocessing(CROP, CROP, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    model = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())  # (N, 3, C, C) -> (N, 3)
    loaded = LoadedBackbone(model, "none", None, pre, 3)
    spec = FeatureSpec("noop", "none", None, pre, Sampling(), 3)
    items = [VideoItem(f"v{v:05d}.avi", root / f"v{v:05d}.avi") for v in range(videos)]
    signatures = {item.key: (1, 1) for item in items}
    cfg = build_config(root / "c.h5", progress=False)
    writer = CacheWriter(cfg.output, spec, "float16")
    report = ExtractReport(cache=cfg.output, spec=spec)
    loop = _Loop(
        items,
        signatures,
        cfg,
        FrameEmbedder(loaded, torch.device("cpu")),
        writer,
        report,
        batch_size,
        torch.device("cpu"),
    )
    wall, cpu = time.perf_counter(), time.thread_time()
    loop.run(MemorySource(videos, frames, chunk))
    cpu, wall = time.thread_time() - cpu, time.perf_counter() - wall
    writer.close()
    assert report.frames == videos * frames and len(report.extracted) == videos, report.summary()
    return cpu, wall, report.frames


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--videos", type=int, default=100)
    ap.add_argument("--frames", type=int, default=500, help="rows per video")
    ap.add_argument("--chunk", type=int, default=32, help="frames per decoded chunk (32: the GPU path's)")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(machine())
    print(
        f"{args.videos} videos x {args.frames} rows, chunks of {args.chunk}, batches of {args.batch_size}, "
        f"a no-op model on {CROP}x{CROP} crops; best of {args.repeats}\n"
    )
    best = None
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory() as tmp:
            cpu, wall, frames = run_once(Path(tmp), args.videos, args.frames, args.chunk, args.batch_size)
        best = (cpu, wall, frames) if best is None or wall < best[1] else best
    cpu, wall, frames = best
    print(f"feeding thread   {1e6 * cpu / frames:7.1f} us/frame of CPU   ({frames / cpu:,.0f} frames/s ceiling)")
    print(f"wall, with sink  {1e6 * wall / frames:7.1f} us/frame            ({frames / wall:,.0f} frames/s)")
    print(f"threads alive after the run: {threading.active_count()}")


if __name__ == "__main__":
    main()
