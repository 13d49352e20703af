"""The package's layers (docs/architecture.md): each part imports only the parts below it."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "pipeline"

BASE = {"spec", "config", "runtime"}
# part -> the parts it may import (besides itself and the package root, whose __init__ holds the lazy API)
ALLOWED = {
    "spec": set(),
    "runtime": set(),
    "config": {"spec"},
    "sample": set(),
    "data": BASE,
    "extract": BASE | {"data"},
    "train_head": BASE | {"data"},
    "sweep": BASE | {"data", "train_head"},
    "finetune": BASE | {"data", "extract", "train_head"},
    "predict": BASE | {"data", "extract", "train_head"},
    "demo": BASE | {"data", "extract", "train_head", "predict", "sample"},
    "cli": BASE | {"data", "extract", "train_head", "sweep", "finetune", "predict", "demo"},
    "__main__": {"cli"},
}


def part_of(path: Path) -> str:
    rel = path.relative_to(PACKAGE)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def imported_parts(path: Path) -> set[str]:
    """The parts of the package that `path` imports, at module level or inside functions."""
    parts = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names if node.module == "pipeline"]
        for name in names:
            bits = name.split(".")
            if bits[0] == "pipeline" and len(bits) > 1 and not bits[1].startswith("_"):
                parts.add(bits[1])
    return parts


def test_every_module_imports_only_the_layers_below_it():
    broken = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "__init__.py" and path.parent == PACKAGE:
            continue  # the public API: lazy imports of every stage's entry point
        part = part_of(path)
        assert part in ALLOWED, f"{path}: a new part of the package; give it a layer in this test and the docs"
        bad = imported_parts(path) - ALLOWED[part] - {part}
        if bad:
            broken.append(f"{path.relative_to(PACKAGE)} ({part}) imports {', '.join(sorted(bad))}")
    assert not broken, "imports against the layers of docs/architecture.md:\n" + "\n".join(broken)


def test_the_import_check_sees_imports_inside_functions(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from pipeline.extract.run import extract_videos\n    import pipeline.sweep.run\n")
    assert imported_parts(probe) == {"extract", "sweep"}


def test_stage_one_and_the_cli_import_no_study_library():
    """Extraction runs on machines with only torch, torchvision, OpenCV, h5py, tqdm and typer (no Optuna, no YAML),
    and `pipeline --help` stays light."""
    probe = (
        "import sys, pipeline.cli, pipeline.extract.run, pipeline.predict\n"
        "bad = sorted(m for m in ('optuna', 'yaml', 'matplotlib') if m in sys.modules)\n"
        "assert not bad, bad"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
