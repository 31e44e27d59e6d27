"""One run's ``metrics.json``: a typed record, written and read by one module.

The training engine writes it, ``benchmarks/collect.py`` and the docs extension read it; nobody
downstream looks at raw keys or knows about older layouts. API (the fields: the dataclasses below)::

    rec = RunRecord(identity=Identity(...), best=Best(...), test=TestResult.from_cases(classes, per_case),
                    timing=Timing(...), environment=Environment(...), config=cfg, val_history=[ValPoint(...)],
                    diagnostics=[...], command="python examples/acdc_cps_dacl.py ...")
    rec.save(run_dir / "metrics.json")
    rec = load(run_dir / "metrics.json")     # also reads the two legacy layouts
    table = load_table(path)                 # several runs: benchmarks/results/<dataset>_<preset>.json
    table.rows[0].metrics["dice"].mean       # .std, .per_seed; in table.units (Dice in %)

Conventions (fixed, so no reader needs to guess):

* Dice and Jaccard are fractions in [0, 1]; HD95 and ASD are in the units named by
  ``TestResult.units`` (``"voxels"`` unless a metric says otherwise, e.g. ``"asd_mm": "mm"``).
* ``TestResult.mean[m]`` is the mean over classes of ``per_class[m]``, and ``per_class[m][c]`` the
  mean over test cases; ``per_case[case][m]`` lists one value per class, in ``classes`` order.
  A metric that was not measured is ``None`` (never NaN, never absent from ``METRICS``).
* ``Identity.labeled`` counts ``Identity.labeled_unit`` ("patients", "volumes", "slices", "cases").
* Diagnostics and history points are keyed by ``step`` (the optimiser step, 1-based).
* ``extra`` keeps anything else a writer wants to record (split, network, notes); readers of
  the schema's fields never need it.

Legacy layouts converted by :func:`from_dict` / :func:`load` (``schema_version`` absent):

* 2D (``examples/acdc_cps_dacl.py`` before the shared engine): ``test.mean.dice``,
  ``test.per_class``, ``best_val_dice``, ``val_history[].val_dice``, ``wall_seconds``; its
  ``config.json`` beside the file, if present, becomes ``config``.
* 3D (``examples/synapse_cps_dacl.py`` before the shared engine): ``test.mean_dice``,
  ``test.per_organ``, ``test_per_case``, ``best_val``, ``history[].iteration``, ``wall_time_s``.
  It measured no Jaccard or HD95 (``None``) and left an organ missing from the prediction out of
  ASD (``empty_convention`` says so; ``empty_cases`` counts them).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

SCHEMA_VERSION = 1
METRICS = ("dice", "jaccard", "hd95", "asd")
DEFAULT_UNITS = {"dice": "fraction", "jaccard": "fraction", "hd95": "voxels", "asd": "voxels"}


@dataclass
class Identity:
    dataset: str                      # "acdc", "chaos", "synapse", "nnunet"
    method: str                       # "sup", "cps", "dacl"
    preset: str
    seed: int
    labeled: int                      # how many labeled ...
    labeled_unit: str                 # ... "patients" | "volumes" | "slices" | "cases"
    steps: int                        # optimiser steps run
    variant: Optional[str] = None     # Table 2 row name ("II" ... "VI") when the run is an ablation variant


@dataclass
class ValPoint:
    step: int
    mean_dice: float
    per_class: Dict[str, float] = field(default_factory=dict)
    loss: Optional[float] = None
    train_seconds: Optional[float] = None  # training time (validation excluded) up to this step


@dataclass
class Best:
    step: Optional[int]
    val_mean_dice: Optional[float]


@dataclass
class TestResult:
    classes: List[str]
    mean: Dict[str, Optional[float]]                      # metric -> mean over classes
    per_class: Dict[str, Dict[str, Optional[float]]]      # metric -> class -> mean over cases
    num_cases: int
    per_case: Dict[str, Dict[str, List[Optional[float]]]] = field(default_factory=dict)
    units: Dict[str, str] = field(default_factory=lambda: dict(DEFAULT_UNITS))
    empty_convention: str = ""
    empty_cases: Optional[int] = None                     # (case, class) pairs with an empty mask
    evaluation: str = ""                                  # how the numbers were computed, in words

    @classmethod
    def from_cases(cls, classes: Sequence[str], per_case: Mapping[str, Mapping[str, Sequence[Optional[float]]]],
                   **kw: Any) -> "TestResult":
        """Means per class (over cases) and overall (over classes) from per-case lists; ``None``
        values are left out of a mean, a mean over nothing is ``None``."""
        metrics = list(METRICS) + sorted({m for c in per_case.values() for m in c} - set(METRICS))
        per_class = {m: {name: _mean([c[m][i] for c in per_case.values() if m in c]) for i, name in enumerate(classes)}
                     for m in metrics}
        mean = {m: _mean(list(v.values())) for m, v in per_class.items()}
        return cls(classes=list(classes), mean=mean, per_class=per_class, num_cases=len(per_case),
                   per_case={k: {m: list(v) for m, v in c.items()} for k, c in per_case.items()}, **kw)


@dataclass
class Timing:
    wall_seconds: float                                   # the process that wrote the record
    train_seconds: Optional[float] = None                 # all training steps of the run, resumes included
    per_step: Optional[float] = None                      # seconds per training step, validation excluded
    phases: Dict[str, float] = field(default_factory=dict)


@dataclass
class Environment:
    device: str
    torch: Optional[str] = None
    threads: Optional[int] = None
    world_size: int = 1


class _Saved:
    """``to_dict`` / ``save`` of the top-level records (NaN written as null, never as NaN)."""

    def to_dict(self) -> Dict[str, Any]:
        return _clean(asdict(self))

    def save(self, path: Union[str, Path]) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=1, allow_nan=False))
        return path


@dataclass
class RunRecord(_Saved):
    identity: Identity
    best: Best
    test: TestResult
    timing: Timing
    environment: Environment
    config: Dict[str, Any] = field(default_factory=dict)
    val_history: List[ValPoint] = field(default_factory=list)
    diagnostics: List[Dict[str, float]] = field(default_factory=list)
    command: Optional[str] = None
    extra: Dict[str, Any] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION


# ----------------------------------------------------------------------------- reading
def _mean(xs: Sequence[Optional[float]]) -> Optional[float]:
    xs = [float(x) for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return sum(xs) / len(xs) if xs else None


def _clean(v: Any) -> Any:
    """NaN / inf become None (strict JSON)."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    return v


def _build(tp: type, d: Mapping[str, Any]):
    unknown = set(d) - {f.name for f in fields(tp)}
    if unknown:
        raise ValueError(f"{tp.__name__}: unknown keys {sorted(unknown)}")
    return tp(**d)


def from_dict(d: Mapping[str, Any], config: Optional[Mapping[str, Any]] = None) -> RunRecord:
    """A record from its JSON dict, in this schema or one of the two legacy layouts.
    ``config`` (a legacy 2D run's ``config.json``) fills ``config`` when the dict has none."""
    if "schema_version" in d:
        if d["schema_version"] > SCHEMA_VERSION:
            raise ValueError(f"schema_version {d['schema_version']} is newer than this reader ({SCHEMA_VERSION})")
        d = dict(d)
        return RunRecord(
            identity=_build(Identity, d.pop("identity")), best=_build(Best, d.pop("best")),
            test=_build(TestResult, d.pop("test")), timing=_build(Timing, d.pop("timing")),
            environment=_build(Environment, d.pop("environment")),
            val_history=[_build(ValPoint, p) for p in d.pop("val_history", [])], **d)
    test = d.get("test")
    if isinstance(test, dict) and isinstance(test.get("mean"), dict) and "wall_seconds" in d:
        return _from_legacy_2d(d, config)
    if isinstance(test, dict) and "mean_dice" in test and "wall_time_s" in d:
        return _from_legacy_3d(d)
    raise ValueError("not a run record: neither schema_version nor a known legacy layout "
                     "(test.mean + wall_seconds, or test.mean_dice + wall_time_s)")


def load(path: Union[str, Path]) -> RunRecord:
    """Read a ``metrics.json`` (any layout). A legacy 2D file's sibling ``config.json`` is read too."""
    path = Path(path)
    d = json.loads(path.read_text())
    cfg_path = path.parent / "config.json"
    config = json.loads(cfg_path.read_text()) if "schema_version" not in d and cfg_path.is_file() else None
    return from_dict(d, config)


_LEGACY_2D_KEYS = {"method", "preset", "seed", "labeled_patients", "steps", "best_val_dice", "best_step",
                   "val_history", "dacl_diagnostics", "test", "train_seconds", "wall_seconds", "device", "torch",
                   "threads", "world_size", "dataset", "command", "config"}


def _from_legacy_2d(d: Mapping[str, Any], config: Optional[Mapping[str, Any]]) -> RunRecord:
    t = d["test"]
    extra = {k: v for k, v in d.items() if k not in _LEGACY_2D_KEYS}
    dataset = str(d.get("dataset", "ACDC"))
    if dataset != "ACDC":  # an nnU-Net dataset folder
        extra["dataset_dir"] = dataset
    test_extra = {k: t[k] for k in ("split", "model", "input_size", "num_volumes_in_split", "std_over_volumes",
                                    "dataset") if k in t}
    if test_extra:
        extra["test"] = test_extra
    units = dict(DEFAULT_UNITS)
    if "units" in t and t["units"] != "voxels (no spacing)":
        units.update(hd95=str(t["units"]), asd=str(t["units"]))
    per_case = {case: {m: list(v[m]) for m in METRICS if m in v} for case, v in t.get("per_case", {}).items()}
    test = TestResult(
        classes=list(t["class_names"]), mean={m: t["mean"].get(m) for m in METRICS},
        per_class={m: dict(t["per_class"].get(m, {c: None for c in t["class_names"]})) for m in METRICS},
        num_cases=int(t["num_volumes"]), per_case=per_case, units=units,
        empty_convention=t.get("empty_convention", ""), empty_cases=t.get("empty_cases"),
        evaluation=(f"model {t.get('model', 'a')} at input size {t.get('input_size')}, 3D metrics per volume, "
                    "mean over volumes"))
    return RunRecord(
        identity=Identity(dataset="acdc" if dataset == "ACDC" else "nnunet", method=d["method"], preset=d["preset"],
                          seed=int(d["seed"]), labeled=int(d["labeled_patients"]), labeled_unit="patients",
                          steps=int(d["steps"])),
        config=dict(d.get("config") or config or {}),
        val_history=[ValPoint(step=int(h["step"]), mean_dice=h["val_dice"]) for h in d.get("val_history", [])],
        best=Best(step=d.get("best_step"), val_mean_dice=d.get("best_val_dice")), test=test,
        diagnostics=[dict(x) for x in d.get("dacl_diagnostics", [])],
        timing=Timing(wall_seconds=float(d["wall_seconds"]), train_seconds=d.get("train_seconds")),
        environment=Environment(device=str(d.get("device", "")), torch=d.get("torch"), threads=d.get("threads"),
                                world_size=int(d.get("world_size", 1))),
        command=d.get("command"), extra=extra)


_LEGACY_3D_KEYS = {"dataset", "method", "preset", "labeled", "seed", "device", "torch_threads", "config",
                   "best_val", "history", "dacl_diagnostics", "iterations", "test", "test_per_case", "wall_time_s",
                   "command", "world_size", "evaluation"}


def _from_legacy_3d(d: Mapping[str, Any]) -> RunRecord:
    t = d["test"]
    po = t["per_organ"]
    organs = list(po)
    # the legacy keys of each metric (None: not measured); per case: case -> organ -> {dice, asd_vox, asd_mm},
    # an organ missing from the prediction has no ASD
    keys = {"dice": "dice", "jaccard": None, "hd95": None, "asd": "asd_vox", "asd_mm": "asd_mm"}
    per_case = {case: {m: [v.get(o, {}).get(k) for o in organs] for m, k in keys.items() if k}
                for case, v in d.get("test_per_case", {}).items()}
    test = TestResult(
        classes=organs, mean={m: t.get(f"mean_{k}") if k else None for m, k in keys.items()},
        per_class={m: {o: po[o].get(k) if k else None for o in organs} for m, k in keys.items()},
        num_cases=len(per_case) or len(d.get("split", {}).get("test", [])), per_case=per_case,
        units={**DEFAULT_UNITS, "asd_mm": "mm"},
        empty_convention="organ missing from the prediction: Dice 0, left out of ASD (legacy 3D convention); "
                         "no Jaccard or HD95 measured",
        empty_cases=sum(int(po[o].get("asd_missing", 0)) for o in organs), evaluation=d.get("evaluation", ""))
    wall = d["wall_time_s"] if isinstance(d["wall_time_s"], dict) else {"total": d["wall_time_s"]}
    phases = {k: float(v) for k, v in wall.items() if k not in ("total", "per_iteration")}
    extra = {k: v for k, v in d.items() if k not in _LEGACY_3D_KEYS}
    extra["dice_std_over_cases"] = {o: po[o].get("dice_std") for o in organs}
    best = d.get("best_val") or {}
    return RunRecord(
        identity=Identity(dataset=str(d["dataset"]), method=d["method"], preset=d["preset"], seed=int(d["seed"]),
                          labeled=int(d["labeled"]), labeled_unit="volumes", steps=int(d["iterations"])),
        config=dict(d.get("config") or {}),
        val_history=[ValPoint(step=int(h["iteration"]), mean_dice=h["val_dice"], loss=h.get("loss"))
                     for h in d.get("history", [])],
        best=Best(step=best.get("iteration"), val_mean_dice=best.get("dice")), test=test,
        diagnostics=[{("step" if k == "iteration" else k): v for k, v in x.items()}
                     for x in d.get("dacl_diagnostics", [])],
        timing=Timing(wall_seconds=float(wall["total"]), train_seconds=phases.get("train_and_val"),
                      per_step=wall.get("per_iteration"), phases=phases),
        environment=Environment(device=str(d.get("device", "")), torch=None, threads=d.get("torch_threads"),
                                world_size=int(d.get("world_size", 1))),
        command=d.get("command"), extra=extra)


# ----------------------------------------------------------------------------- several runs: a table
TABLE_UNITS = {"dice": "%", "jaccard": "%", "hd95": "voxels", "asd": "voxels", "best_val_dice": "%",
               "wall_seconds": "s"}


@dataclass
class Stat:
    """Mean and standard deviation over seeds (``None`` where not measured), and the value of each
    seed (keys: the seed as a string) where the per-seed values are kept."""
    mean: Optional[float]
    std: Optional[float]
    per_seed: Dict[str, float] = field(default_factory=dict)


@dataclass
class TableRow:
    dataset: str
    variant: str                                  # "sup", "cps", "dacl" or a Table 2 row ("II" ... "V")
    method: str
    labeled: int
    labeled_unit: str
    seeds: List[int]
    num_test_cases: Optional[int]
    metrics: Dict[str, Stat]                      # METRICS -> Stat, in Table.units
    per_class: Dict[str, Dict[str, Stat]] = field(default_factory=dict)   # metric -> class -> Stat
    best_val_dice: Dict[str, float] = field(default_factory=dict)         # seed -> %
    wall_seconds: Dict[str, float] = field(default_factory=dict)          # seed -> s (the recording process)
    train_seconds: Dict[str, float] = field(default_factory=dict)         # seed -> s (all training steps)
    empty_cases: Dict[str, int] = field(default_factory=dict)             # seed -> count
    empty_convention: str = ""
    commands: Dict[str, str] = field(default_factory=dict)                # seed -> command


@dataclass
class Paired:
    """Test Dice of ``a`` minus ``b`` (percentage points), paired by seed."""
    labeled: int
    a: str
    b: str
    seeds: List[int]
    diffs: List[float]
    mean: float
    std: float
    wins: int


@dataclass
class Table(_Saved):
    dataset: str
    preset: str
    command: str
    rows: List[TableRow]
    paired: List[Paired] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)
    units: Dict[str, str] = field(default_factory=lambda: dict(TABLE_UNITS))
    kind: str = "table"
    schema_version: int = SCHEMA_VERSION


def load_table(path: Union[str, Path]) -> Table:
    d = json.loads(Path(path).read_text())
    if d.get("kind") != "table" or d.get("schema_version", SCHEMA_VERSION + 1) > SCHEMA_VERSION:
        raise ValueError(f"not a results table of this schema (kind 'table', schema_version <= {SCHEMA_VERSION})")
    stats = lambda m: {k: _build(Stat, v) for k, v in m.items()}  # noqa: E731
    rows = [_build(TableRow, {**r, "metrics": stats(r["metrics"]),
                              "per_class": {m: stats(cs) for m, cs in r.get("per_class", {}).items()}})
            for r in d["rows"]]
    return _build(Table, {**d, "rows": rows, "paired": [_build(Paired, p) for p in d.get("paired", [])]})
