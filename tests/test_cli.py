"""The command line: help, exit codes, and error messages that name the file or flag and the fix."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from helpers import FAST_ARGS, make_video
from typer.testing import CliRunner

from pipeline.cli import EXIT_ERROR, EXIT_OK, EXIT_USAGE, app

runner = CliRunner()
SMALL = [*FAST_ARGS, "--workers", "0"]


def test_help_lists_commands_and_is_fast():
    result = subprocess.run([sys.executable, "-m", "pipeline", "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    for command in ("extract", "info", "demo"):
        assert command in result.stdout
    # --help must not import torch (it would take seconds)
    probe = "import sys, pipeline.cli; assert 'torch' not in sys.modules and 'cv2' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", probe], timeout=60).returncode == 0


# The entry point as `python -m pipeline` runs it, then what its process (and a worker it starts) hands to OpenMP
# when a stage imports torch.
OMP_PROBE = """
import os, runpy, subprocess, sys
sys.argv = ["pipeline", "--help"]
try:
    runpy.run_module("pipeline", run_name="__main__")
except SystemExit:
    pass
child = "import os; print(os.environ.get('OMP_WAIT_POLICY'))"
print(os.environ.get("OMP_WAIT_POLICY"), subprocess.run([sys.executable, "-c", child], capture_output=True,
      text=True).stdout.strip())
"""


@pytest.mark.parametrize("given, used", [(None, "PASSIVE"), ("ACTIVE", "ACTIVE"), ("passive", "passive")])
def test_the_command_lets_idle_openmp_threads_sleep_unless_the_user_chose(given, used):
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if given is not None:
        env["OMP_WAIT_POLICY"] = given
    result = subprocess.run(
        [sys.executable, "-c", OMP_PROBE], capture_output=True, text=True, env=env, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[-2:] == [used, used]


def _visible(text: str) -> str:
    """Help text as a reader sees it, without the layout: no box drawing, no spaces or line breaks."""
    return "".join(c for c in text if not c.isspace() and c not in "│╭╮╰╯─")


def test_every_help_text_keeps_its_brackets():
    import re

    import typer

    group = typer.main.get_command(app)
    for name, command in group.commands.items():
        result = runner.invoke(app, [name, "--help"], terminal_width=200)
        assert result.exit_code == 0, name
        shown = _visible(result.output)
        texts = [command.help or ""] + [getattr(p, "help", None) or "" for p in command.params]
        for text in texts:
            for bracketed in re.findall(r"\[[^\]]*\]|\{[^}]*\}", text.replace("\\[", "[")):
                assert _visible(bracketed) in shown, f"{name} --help lost {bracketed!r}"


def test_the_demo_says_how_long_it_took(tmp_path, monkeypatch):
    from pipeline import demo

    # the whole mission on a handful of clips: what is checked is the report, not the accuracy
    monkeypatch.setattr(demo, "TRAIN_CLIPS_PER_CLASS", 2)
    monkeypatch.setattr(demo, "TEST_CLIPS_PER_CLASS", 1)
    monkeypatch.setattr(demo, "PREDICT_CLIPS_PER_CLASS", 1)
    monkeypatch.setattr(demo, "DEMO_TRAIN", {**demo.DEMO_TRAIN, "epochs": 1})
    said = []
    result = demo.run_demo(tmp_path / "demo", backbone="mobilenet_v3_small", progress=False, echo=said.append)
    assert said[-1] == (
        f"The whole demo took {result['seconds']:.0f}s (sample, extraction, training, evaluation, prediction)."
    )
    assert 0 < result["seconds"] < 600


def test_extract_help_shows_options_and_defaults():
    result = runner.invoke(app, ["extract", "--help"], terminal_width=200)
    assert result.exit_code == 0
    for flag in (
        "--output",
        "--backbone",
        "--weights",
        "--fps",
        "--stride",
        "--max-frames",
        "--num-frames",
        "--dtype",
        "--device",
        "--batch-size",
        "--workers",
        "--threads",
        "--overwrite",
        "--quiet",
    ):
        assert flag in result.output
    assert "resnet50" in result.output and "float16" in result.output


@pytest.fixture
def clip(tmp_path):
    return make_video(tmp_path / "v" / "a.avi", 3)


def test_extract_then_info(clip, tmp_path):
    out = tmp_path / "c.h5"
    result = runner.invoke(app, ["extract", str(clip.parent), "-o", str(out), *SMALL, "--fps", "50", "-q"])
    assert result.exit_code == EXIT_OK, result.output
    info = runner.invoke(app, ["info", str(out)])
    assert info.exit_code == 0
    assert "videos     1   frames 3   dim 512" in info.output
    assert "resnet18" in info.output and "none(seed=0)" in info.output and "fps=50" in info.output
    assert "failures   0" in info.output


@pytest.mark.parametrize(
    "args, message",
    [
        (["--dtype", "float64"], "--dtype must be one of float16, float32"),
        (["--fps", "2", "--stride", "3"], "either --fps or --stride"),
        (["--num-frames", "4", "--max-frames", "2"], "--num-frames"),
        (["--stride", "0"], "--stride must be >= 1"),
        (["--device", "tpu"], "--device must be one of"),
        (["--backbone", "resnet9000"], "--backbone 'resnet9000' is not a torchvision classification model"),
        (["--weights", "IMAGENET9K"], "is not a weights name of resnet18"),
    ],
)
def test_bad_options_are_usage_errors_naming_the_flag(clip, tmp_path, args, message):
    base = ["extract", str(clip), "-o", str(tmp_path / "c.h5"), "--backbone", "resnet18", "--weights", "none"]
    result = runner.invoke(app, base + args)
    assert result.exit_code == EXIT_USAGE, result.output  # a bad backbone and a bad weights name alike
    assert message in result.output
    assert not (tmp_path / "c.h5").exists()


def test_missing_input_and_output_suffix(tmp_path, clip):
    result = runner.invoke(app, ["extract", str(tmp_path / "nothing"), "-o", str(tmp_path / "c.h5"), *SMALL])
    assert result.exit_code == EXIT_USAGE and "nothing: no such file or folder" in result.output
    result = runner.invoke(app, ["extract", str(clip), "-o", str(tmp_path / "c.txt"), *SMALL])
    assert result.exit_code == EXIT_USAGE and "should name an .h5 file" in result.output


def test_offline_without_weights_names_the_remedies(clip, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_torch_home"))

    # Nothing can be downloaded in tests, online or not: make the download itself fail like an offline machine.
    def offline(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    result = runner.invoke(app, ["extract", str(clip), "-o", str(tmp_path / "c.h5"), "--backbone", "resnet18"])
    assert result.exit_code == EXIT_ERROR
    out = result.output
    assert "ResNet18_Weights.IMAGENET1K_V1 for resnet18 are not in the torchvision cache" in out
    assert str(tmp_path / "empty_torch_home" / "hub" / "checkpoints" / "resnet18-f37072fd.pth") in out
    assert "--weights /path/to/weights.pth" in out and "--weights none" in out


def test_offline_error_names_the_weights_versions_already_in_the_cache(clip, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))

    def offline(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    checkpoints = tmp_path / "torch_home" / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    (checkpoints / "resnet50-0676ba61.pth").write_bytes(b"not read: only its name matters here")  # IMAGENET1K_V1
    result = runner.invoke(app, ["extract", str(clip), "-o", str(tmp_path / "c.h5")], terminal_width=200)
    assert result.exit_code == EXIT_ERROR
    assert "ResNet50_Weights.IMAGENET1K_V2 for resnet50 are not in the torchvision cache" in result.output
    assert "use the weights already in the cache: --weights IMAGENET1K_V1 (resnet50-0676ba61.pth)" in result.output
    assert result.output.count("--weights IMAGENET1K_") == 1


def test_weights_file_of_another_architecture(clip, tmp_path, resnet18_state_file):
    result = runner.invoke(
        app,
        [
            "extract",
            str(clip),
            "-o",
            str(tmp_path / "c.h5"),
            "--backbone",
            "resnet50",
            "--weights",
            str(resnet18_state_file),
        ],
    )
    assert result.exit_code == EXIT_ERROR
    assert "do not fit resnet50" in result.output
    missing = runner.invoke(
        app, ["extract", str(clip), "-o", str(tmp_path / "c.h5"), "--weights", str(tmp_path / "nope.pth")]
    )
    assert missing.exit_code == EXIT_ERROR and "nope.pth does not exist" in missing.output


def test_info_on_a_missing_or_foreign_file(tmp_path):
    result = runner.invoke(app, ["info", str(tmp_path / "none.h5")])
    assert result.exit_code == EXIT_ERROR and "no feature cache at" in result.output
    (tmp_path / "x.h5").write_bytes(b"not hdf5")
    result = runner.invoke(app, ["info", str(tmp_path / "x.h5")])
    assert result.exit_code == EXIT_ERROR and "cannot read" in result.output


def test_version():
    import pipeline

    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"pipeline {pipeline.__version__}"


def test_extract_without_output_writes_beside_the_command(clip, tmp_path, monkeypatch):
    videos = tmp_path / "videos"
    videos.mkdir()
    clip.rename(videos / clip.name)
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["extract", "videos", *SMALL, "--quiet"])
    assert result.exit_code == 0, result.output
    from pipeline import open_cache

    assert open_cache(tmp_path / "videos.h5").keys() == [clip.name]
