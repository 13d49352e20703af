"""Search spaces of `pipeline sweep`: which train-head settings vary and how, from a YAML file and --param flags.

    head: [lstm, gru, meanpool]          # choices
    hidden: [64, 128, 256]
    layers: {low: 1, high: 3}            # whole numbers 1, 2, 3
    lr: {low: 1.0e-4, high: 1.0e-2, log: true}
    dropout: {low: 0.0, high: 0.5, step: 0.1}
    epochs: 15                           # one value for every trial

Inline, `--param hidden=64,128,256 --param lr=1e-4:1e-2:log --param dropout=0:0.5:0.1 --param epochs=15`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path

from pipeline.config import SWEEP_SPACE, SWEEP_SPACE_FRAMES, TrainConfig

# Settings of the whole sweep (every trial must see the same split), and settings that are no hyperparameter.
SWEEP_WIDE = {
    "labels": "--labels",
    "split": "--split",
    "train_list": "--train-list",
    "val_list": "--val-list",
    "val_fraction": "--val-fraction",
    "split_seed": "--split-seed",
    "group_regex": "--group-regex",
    "target": "--target",
    "metric": "--metric",
    "frame_labels": "--frame-labels",
    "label_units": "--label-units",
    "background": "--background",
}
NOT_SEARCHED = {
    "out": "--out",
    "memory": "--memory",
    "workers": None,
    "threads": "--threads",
    "device": "--device",
    "plots": "--plots",
    "progress": "--quiet",
    "overwrite": None,
    "splitting": None,
    "frame_labelling": None,
    "runtime": None,
}  # groups: their settings are named above
RANGE_KEYS = ("low", "high", "step", "log")
SYNTAX = (
    "e.g. --param hidden=64,128,256 (choices), --param lr=1e-4:1e-2:log (range), --param dropout=0:0.5:0.1 "
    "(range with a step), --param epochs=10 (one value); see docs/sweep.md"
)
NONE_WORDS = ("none", "null", "~")
TRUE_WORDS, FALSE_WORDS = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


class SpaceError(ValueError):
    """A search space that cannot be used; the message names the file or flag and the parameter."""


def _field_types() -> dict[str, tuple[type, bool]]:
    """Searchable TrainConfig field -> (value type, whether None is allowed), from the dataclass annotations."""
    kinds = {"int": int, "float": float, "str": str, "bool": bool}
    out = {}
    for f in fields(TrainConfig):
        if f.name in SWEEP_WIDE or f.name in NOT_SEARCHED:
            continue
        parts = [p.strip() for p in str(f.type).split("|")]
        base = [p for p in parts if p != "None"]
        if len(base) != 1 or base[0] not in kinds:
            raise TypeError(f"TrainConfig.{f.name}: annotation {f.type!r} has no search type")
        out[f.name] = (kinds[base[0]], "None" in parts)
    return out


PARAM_TYPES = _field_types()
"""Every train-head setting a sweep can vary: name -> (type, None allowed)."""


@dataclass(frozen=True)
class Param:
    """One searched setting: `kind` is fixed (values[0] for every trial), choice (values), int or float (a range)."""

    name: str
    kind: str
    values: tuple = ()
    low: float | None = None
    high: float | None = None
    step: float | None = None
    log: bool = False

    def suggest(self, trial):
        """This parameter's value for an Optuna trial."""
        if self.kind == "fixed":
            return self.values[0]
        if self.kind == "choice":
            return trial.suggest_categorical(self.name, list(self.values))
        if self.kind == "int":
            return trial.suggest_int(self.name, int(self.low), int(self.high), step=int(self.step or 1), log=self.log)
        return trial.suggest_float(self.name, self.low, self.high, step=self.step, log=self.log)

    def grid(self) -> list:
        """Every value of this parameter, for grid search (ranges need integers or a step)."""
        if self.kind in ("fixed", "choice"):
            return list(self.values)
        if self.log:
            raise SpaceError(
                f"{self.name}: a log range has no grid; list the values instead, e.g. "
                f"{self.name}={_fmt(self.low)},{_fmt(math.sqrt(self.low * self.high))},{_fmt(self.high)}"
            )
        if self.kind == "int":
            return list(range(int(self.low), int(self.high) + 1, int(self.step or 1)))
        if self.step is None:
            raise SpaceError(
                f"{self.name}: a float range needs a step for grid search "
                f"(e.g. {self.name}={_fmt(self.low)}:{_fmt(self.high)}:STEP) or a list of values"
            )
        n = math.floor((self.high - self.low) / self.step + 1e-9)
        return [round(self.low + i * self.step, 12) for i in range(n + 1)]

    def describe(self) -> str:
        if self.kind == "fixed":
            return f"{self.name} = {_fmt(self.values[0])}"
        if self.kind == "choice":
            return f"{self.name} in {{{', '.join(_fmt(v) for v in self.values)}}}"
        extra = ", log" if self.log else f", step {_fmt(self.step)}" if self.step is not None else ""
        return f"{self.name} in [{_fmt(self.low)}, {_fmt(self.high)}]{extra} ({self.kind})"

    def to_dict(self):
        """The YAML form: one value, a list of choices, or a range mapping."""
        if self.kind == "fixed":
            return self.values[0]
        if self.kind == "choice":
            return list(self.values)
        out = {"low": self.low, "high": self.high, "log": self.log}
        if self.step is not None:
            out["step"] = self.step
        return out


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    return "none" if v is None else str(v).lower() if isinstance(v, bool) else str(v)


@dataclass(frozen=True)
class SearchSpace:
    """The searched settings, in the order they were given; settings not named keep their TrainConfig default."""

    params: dict[str, Param]

    @property
    def varying(self) -> dict[str, Param]:
        return {n: p for n, p in self.params.items() if p.kind != "fixed"}

    @property
    def fixed(self) -> dict:
        return {n: p.values[0] for n, p in self.params.items() if p.kind == "fixed"}

    def suggest(self, trial) -> dict:
        """Every parameter's value for an Optuna trial (fixed ones included)."""
        return {n: p.suggest(trial) for n, p in self.params.items()}

    def grid(self) -> dict[str, list]:
        """The grid of the varying parameters (GridSampler's search space)."""
        return {n: p.grid() for n, p in self.varying.items()}

    def grid_size(self) -> int:
        return math.prod(len(v) for v in self.grid().values())

    def describe(self) -> list[str]:
        return [p.describe() for p in self.params.values()]

    def to_dict(self) -> dict:
        """The YAML form of the whole space (`parse_mapping` reads it back)."""
        return {n: p.to_dict() for n, p in self.params.items()}


def default_space(target: str = "videos") -> SearchSpace:
    """The space a sweep searches when given none (config.SWEEP_SPACE, or SWEEP_SPACE_FRAMES for frame heads)."""
    return SearchSpace(parse_mapping(SWEEP_SPACE_FRAMES if target == "frames" else SWEEP_SPACE, "the default space"))


# ------------------------------------------------------------------------------------------------------- parsing
def parse_space(path: str | Path | dict | None = None, params: Sequence[str] = ()) -> SearchSpace:
    """The space of a YAML file (or a dict of the same form) and/or inline NAME=SPEC strings (which replace the
    file's entries).

    Raises SpaceError naming the file or flag, the parameter and what is wrong.
    """
    entries: dict[str, Param] = {}
    if isinstance(path, dict):
        entries.update(parse_mapping(path, "space"))
        path = "space"
    elif path is not None:
        entries.update(load_space_file(path))
    for text in params:
        p = parse_param(text)
        entries.pop(p.name, None)
        entries[p.name] = p
    space = SearchSpace(entries)
    if not space.varying:
        where = (
            " and ".join(filter(None, [str(path) if path is not None else "", "--param" if params else ""]))
            or "the space"
        )
        raise SpaceError(
            f"{where}: nothing varies (every parameter has one value); give choices (a list) or a "
            f"range for at least one of them"
        )
    _check_fixed_together(space, path, params)
    return space


def load_space_file(path: str | Path) -> dict[str, Param]:
    import yaml

    path = Path(path)
    if not path.is_file():
        raise SpaceError(f"--space {path}: no such file")
    try:
        obj = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise SpaceError(f"{path}: not valid YAML ({e})") from None
    return parse_mapping(obj, str(path))


def parse_mapping(obj, source: str) -> dict[str, Param]:
    """Params of a mapping name -> list (choices), {low, high, step, log} (range) or value (fixed)."""
    if not isinstance(obj, dict) or not obj:
        raise SpaceError(
            f"{source}: expected a mapping of parameter names to choices, ranges or values, e.g.\n"
            f"  hidden: [64, 128, 256]\n  lr: {{low: 1.0e-4, high: 1.0e-2, log: true}}\n"
            f"(docs/sweep.md)"
        )
    return {str(name): parse_entry(str(name), spec, source) for name, spec in obj.items()}


def parse_param(text: str) -> Param:
    """One inline `--param NAME=SPEC`: `a,b,c` choices, `low:high`, `low:high:log`, `low:high:step`, or one value."""
    source = f"--param {text}"
    name, sep, spec = text.partition("=")
    name = name.strip().replace("-", "_")
    if not sep or not name or not spec.strip():
        raise SpaceError(f"{source}: expected NAME=VALUES, {SYNTAX}")
    _check_name(name, source)
    spec = spec.strip()
    if ":" in spec:
        parts = [s.strip() for s in spec.split(":")]
        if len(parts) not in (2, 3):
            raise SpaceError(f"{source}: a range is low:high, low:high:log or low:high:step; {SYNTAX}")
        rng: dict = {"low": parts[0], "high": parts[1]}
        if len(parts) == 3:
            if parts[2].lower() == "log":
                rng["log"] = True
            else:
                rng["step"] = parts[2]
        return parse_entry(name, rng, source)
    if "," in spec:
        return parse_entry(name, [s.strip() for s in spec.split(",")], source)
    return parse_entry(name, spec, source)


def _check_name(name: str, source: str) -> None:
    if name in PARAM_TYPES:
        return
    if name in SWEEP_WIDE:
        raise SpaceError(
            f"{source}: {name} is the same for every trial (all trials share one split and one data set): "
            f"set it with `pipeline sweep {SWEEP_WIDE[name]}`"
        )
    if name in NOT_SEARCHED:
        flag = NOT_SEARCHED[name]
        raise SpaceError(f"{source}: {name} is not a hyperparameter" + (f" (set it with {flag})" if flag else ""))
    raise SpaceError(
        f"{source}: unknown parameter {name!r}; valid parameters: {', '.join(PARAM_TYPES)} (docs/sweep.md)"
    )


def parse_entry(name: str, spec, source: str) -> Param:
    """A Param from a YAML value: a list (choices), a mapping {low, high, step, log} (range) or a scalar (fixed)."""
    where = f"{source}: {name}"
    _check_name(name, source)
    kind, nullable = PARAM_TYPES[name]
    if isinstance(spec, dict):
        unknown = sorted(set(map(str, spec)) - set(RANGE_KEYS))
        if unknown:
            raise SpaceError(f"{where}: unknown range key {unknown[0]!r}; a range takes {', '.join(RANGE_KEYS)}")
        if kind not in (int, float):
            raise SpaceError(f"{where} takes choices (a list of {kind.__name__} values), not a range")
        if "low" not in spec or "high" not in spec:
            raise SpaceError(f"{where}: a range needs both low and high")
        low, high = _convert(spec["low"], kind, False, where), _convert(spec["high"], kind, False, where)
        step = None if spec.get("step") is None else _convert(spec["step"], kind, False, where)
        log = _convert(spec.get("log", False), bool, False, f"{where} (log)")
        if not low < high:
            raise SpaceError(
                f"{where}: the range's low ({_fmt(low)}) must be below its high ({_fmt(high)}); "
                f"for one value write `{name}: {_fmt(low)}`"
            )
        if log and low <= 0:
            raise SpaceError(f"{where}: a log range needs low > 0, got {_fmt(low)}")
        if step is not None:
            if log:
                raise SpaceError(f"{where}: a range takes either a step or log, not both")
            if not step > 0:
                raise SpaceError(f"{where}: the step must be > 0, got {_fmt(step)}")
            if step > high - low:
                raise SpaceError(f"{where}: the step {_fmt(step)} is larger than the range {_fmt(low)}..{_fmt(high)}")
        for v in (low, high):
            _check_value(name, v, where)
        return Param(name, "int" if kind is int else "float", (), low, high, step, bool(log))
    if isinstance(spec, (list, tuple)):
        if not spec:
            raise SpaceError(f"{where}: an empty list of choices")
        values = tuple(_convert(v, kind, nullable, where) for v in spec)
        seen = []
        for v in values:
            if any(v == s and type(v) is type(s) for s in seen):
                raise SpaceError(f"{where}: the choice {_fmt(v)} is listed twice")
            _check_value(name, v, where)
            seen.append(v)
        return Param(name, "choice" if len(values) > 1 else "fixed", values)
    value = _convert(spec, kind, nullable, where)
    _check_value(name, value, where)
    return Param(name, "fixed", (value,))


def _convert(v, kind: type, nullable: bool, where: str):
    """A YAML or command-line value as `kind`; numbers written as strings (YAML reads 1e-4 as one) are accepted."""
    if isinstance(v, str):
        text = v.strip()
        if nullable and text.lower() in NONE_WORDS:
            return None
        if kind is bool:
            if text.lower() in TRUE_WORDS:
                return True
            if text.lower() in FALSE_WORDS:
                return False
        elif kind is int:
            try:
                return int(text)
            except ValueError:
                pass
        elif kind is float:
            try:
                return float(text)
            except ValueError:
                pass
        else:
            return text
    elif v is None:
        if nullable:
            return None
    elif kind is bool:
        if isinstance(v, bool):
            return v
    elif kind is int and isinstance(v, int) and not isinstance(v, bool):
        return v
    elif kind is float and isinstance(v, (int, float)) and not isinstance(v, bool):
        return float(v)
    want = {int: "whole numbers", float: "numbers", bool: "true or false", str: "text"}[kind]
    raise SpaceError(f"{where} takes {want}{' or none' if nullable else ''}, got {v!r}")


def _check_value(name: str, value, where: str) -> None:
    """Let TrainConfig judge one value (its messages name the train-head flag)."""
    try:
        TrainConfig(out=Path("."), **{name: value})
    except ValueError as e:
        raise SpaceError(f"{where}: {e}") from None


def _check_fixed_together(space: SearchSpace, path, params) -> None:
    """The fixed values together must make a valid TrainConfig (e.g. eval_clips needs a clip_len)."""
    try:
        TrainConfig(out=Path("."), **space.fixed)
    except ValueError as e:
        where = " and ".join(filter(None, [str(path) if path is not None else "", "--param" if params else ""]))
        raise SpaceError(f"{where}: the fixed values do not fit together: {e}") from None
