"""Sphinx directives that render the docs' data from the repository at build time.

Nothing here is retyped: tables come from the committed files they describe, and a file
that does not exist yet gives a visible "not yet measured" / "not yet written" note instead
of a warning (so ``sphinx-build -W`` passes on a fresh checkout).

Directives
----------
``.. dacl-results:: <glob relative to the repository root>``
    Every JSON and Markdown file matching the glob (default ``benchmarks/results/*``),
    rendered as tables. JSON: a top-level ``"rows"`` list of objects (or a top-level list of
    objects) becomes one table; other values become a key/value table of their scalar leaves,
    and each list of objects (e.g. ``"history"``) its own table. ``"caption"``,
    ``"description"`` and ``"note"`` strings are shown as text. Markdown: pipe tables become
    tables, ``![alt](file.png)`` images, other lines text.
``.. dacl-comparison:: acdc|synapse``
    The paper's Table 1 rows for CPS and DACL beside every measured result of that dataset
    found in ``benchmarks/results/*.json`` (see :func:`_measured_rows` for what counts).
``.. dacl-paper-table:: table1-acdc|table1-synapse|table2``
    A table of ``docs/paper_numbers.json`` (the paper's numbers, transcribed).
``.. dacl-figures:: <glob>``
    Every PNG matching the glob, as a figure captioned with its file name.
``.. dacl-curves:: <glob>``
    Training curves (validation Dice, losses against the step) plotted from the histories in
    the JSON files, inline SVG.
``.. dacl-cli:: examples/<script>.py``
    The script's command-line flags (read from its ``add_argument`` calls with :mod:`ast`,
    without importing it) and its ``PRESETS`` dictionary, if any.
``.. dacl-script-doc:: examples/<script>.py``
    The script's module docstring, verbatim.
``.. dacl-excerpt:: examples/<script>.py``
    Options ``:start:`` and ``:end:`` (regular expressions): the lines from the first line
    matching ``start`` to the first following line matching ``end``, as Python code.
"""

from __future__ import annotations

import ast
import glob
import json
import math
import re
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

from docutils import nodes
from docutils.parsers.rst import directives
from sphinx.util.docutils import SphinxDirective

REPO = Path(__file__).resolve().parents[2]
DOCS = REPO / "docs"
RESULTS = REPO / "benchmarks" / "results"
MAX_ROWS = 60
MAX_LEAVES = 80


# ----------------------------------------------------------------------------- node helpers
def _para(text: str, cls: Optional[str] = None) -> nodes.paragraph:
    p = nodes.paragraph()
    p += nodes.Text(text)
    if cls:
        p["classes"].append(cls)
    return p


def _inline(text: str) -> nodes.paragraph:
    """A paragraph of Markdown text whose `code spans` become literals (copyable commands)."""
    p = nodes.paragraph()
    for i, part in enumerate(text.split("`")):
        if part:
            p += nodes.literal(part, part) if i % 2 else nodes.Text(part)
    return p


def _note(text: str) -> nodes.note:
    n = nodes.note()
    n += _para(text)
    return n


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]], caption: Optional[str] = None) -> nodes.table:
    """A docutils table of plain-text cells (no markup is parsed from the data)."""
    table = nodes.table()
    table["classes"].append("dacl-data")
    if caption:
        table += nodes.title(text=caption)
    ncol = len(header)
    group = nodes.tgroup(cols=ncol)
    table += group
    for i in range(ncol):
        width = max([len(_fmt(header[i]))] + [len(_fmt(r[i])) for r in rows if i < len(r)])
        group += nodes.colspec(colwidth=max(3, min(width, 40)))

    def row_node(cells: Sequence[Any]) -> nodes.row:
        r = nodes.row()
        for c in list(cells) + [""] * (ncol - len(cells)):
            e = nodes.entry()
            e += _para(_fmt(c))
            r += e
        return r

    head = nodes.thead()
    head += row_node(header)
    group += head
    body = nodes.tbody()
    for cells in rows:
        body += row_node(cells)
    group += body
    return table


def _fmt(v: Any) -> str:
    if isinstance(v, bool) or v is None:
        return "" if v is None else str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if v != 0 and (abs(v) >= 1e5 or abs(v) < 1e-3):
            return f"{v:.3e}"
        return f"{v:.4g}" if abs(v) < 1 else f"{v:.2f}" if abs(v) < 1e3 else f"{v:.0f}"
    if isinstance(v, (list, tuple)):
        if len(v) <= 8 and all(not isinstance(x, (dict, list)) for x in v):
            return ", ".join(_fmt(x) for x in v)
        return f"[{len(v)} items]"
    if isinstance(v, dict):
        return f"{{{len(v)} keys}}"
    return str(v).replace("+-", "±")


def _code(text: str, language: str = "python") -> nodes.literal_block:
    block = nodes.literal_block(text, text)
    block["language"] = language
    return block


# ----------------------------------------------------------------------------- JSON rendering
def _is_row_list(v: Any) -> bool:
    return isinstance(v, list) and len(v) > 0 and all(isinstance(x, dict) for x in v)


def _flatten(d: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    """Scalar (and short scalar-list) leaves of nested dicts, keys joined with dots."""
    out: Dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        elif _is_row_list(v):
            continue
        else:
            out[key] = v
    return out


def _rows_table(rows: List[Dict[str, Any]], caption: str) -> List[nodes.Node]:
    flat = [_flatten(r) for r in rows]
    cols: List[str] = []
    for r in flat:
        for k in r:
            if k not in cols:
                cols.append(k)
    shown = flat[:MAX_ROWS]
    out: List[nodes.Node] = [_table(cols, [[r.get(c) for c in cols] for r in shown], caption)]
    if len(flat) > MAX_ROWS:
        out.append(_para(f"({len(flat) - MAX_ROWS} more rows in the file.)"))
    return out


def _row_lists(d: Dict[str, Any], prefix: str = "") -> Iterable[Tuple[str, List[Dict[str, Any]]]]:
    for k, v in d.items():
        if _is_row_list(v):
            yield prefix + k, v
        elif isinstance(v, dict):
            yield from _row_lists(v, prefix + k + ".")


def render_json(path: Path, values: Optional[Sequence[str]] = None) -> List[nodes.Node]:
    """The tables of a result file: each list of rows as a table, then (unless ``values`` is
    an empty sequence) the remaining scalar values as a key / value table, restricted to the
    top-level keys in ``values`` when given."""
    data = json.loads(path.read_text())
    name = path.relative_to(REPO).as_posix()
    out: List[nodes.Node] = []
    if _is_row_list(data):
        return _rows_table(data, name)
    if not isinstance(data, dict):
        return [_para(f"{name}: {_fmt(data)}")]
    for key in ("caption", "description", "note"):
        if isinstance(data.get(key), str):
            out.append(_para(data[key]))
    if _is_row_list(data.get("rows")):
        out.extend(_rows_table(data["rows"], name))
        rest = {k: v for k, v in data.items() if k not in ("rows", "caption", "description", "note")}
    else:
        rest = {k: v for k, v in data.items() if k not in ("caption", "description", "note")}
    shown = rest if values is None else {k: v for k, v in rest.items() if k in values}
    leaves = list(_flatten(shown).items())
    if leaves:
        out.append(_table(["key", "value"], leaves[:MAX_LEAVES], f"{name} (values)"))
        if len(leaves) > MAX_LEAVES:
            out.append(_para(f"({len(leaves) - MAX_LEAVES} more values in the file.)"))
    for key, rows in _row_lists(rest):
        out.extend(_rows_table(rows, f"{name}: {key}"))
    return out


# ----------------------------------------------------------------------------- Markdown rendering
_TABLE_SEP = re.compile(r"^\s*\|?\s*:?-{2,}:?\s*(\|\s*:?-{2,}:?\s*)*\|?\s*$")
_IMAGE = re.compile(r"!\[([^\]]*)\]\(([^)\s]+)\)")


def _cells(line: str) -> List[str]:
    s = line.strip()
    if s.startswith("|"):
        s = s[1:]
    if s.endswith("|"):
        s = s[:-1]
    return [c.strip().strip("`") for c in s.split("|")]


def render_markdown(path: Path, docdir: Path) -> List[nodes.Node]:
    lines = path.read_text().splitlines()
    out: List[nodes.Node] = []
    para: List[str] = []
    i = 0

    def flush():
        if para:
            out.append(_inline(" ".join(para)))
            para.clear()

    while i < len(lines):
        line = lines[i]
        if line.strip().startswith("|") and i + 1 < len(lines) and _TABLE_SEP.match(lines[i + 1]):
            flush()
            header = _cells(line)
            rows = []
            i += 2
            while i < len(lines) and lines[i].strip().startswith("|"):
                rows.append(_cells(lines[i]))
                i += 1
            out.append(_table(header, rows))
            continue
        m = _IMAGE.search(line)
        if m:
            flush()
            img = (path.parent / m.group(2)).resolve()
            if img.exists():
                out.append(_figure(img, docdir, m.group(1) or img.name))
            else:
                out.append(_para(f"(image {m.group(2)} not found)"))
        elif line.lstrip().startswith("#"):
            flush()
            out.append(nodes.rubric(text=line.lstrip("#").strip()))
        elif line.lstrip().startswith("- "):  # a bullet list: consecutive "- " lines
            flush()
            bullets = nodes.bullet_list()
            while i < len(lines) and lines[i].lstrip().startswith("- "):
                bullets += nodes.list_item("", _inline(lines[i].lstrip()[2:].strip()))
                i += 1
            out.append(bullets)
            continue
        elif not line.strip():
            flush()
        else:
            para.append(line.strip())
        i += 1
    flush()
    return out


def _figure(img: Path, docdir: Path, caption: str) -> nodes.figure:
    """A figure of ``img``; its URI is relative to the docs folder ("/" = docs/)."""
    del docdir
    rel = Path(*([".."] * len(DOCS.relative_to(REPO).parts)), img.relative_to(REPO)) \
        if not img.is_relative_to(DOCS) else img.relative_to(DOCS)
    fig = nodes.figure()
    fig += nodes.image(uri="/" + rel.as_posix(), alt=caption)
    fig += nodes.caption(text=caption)
    return fig


# ----------------------------------------------------------------------------- paper numbers
def _paper() -> Dict[str, Any]:
    return json.loads((REPO / "benchmarks" / "paper_numbers.json").read_text())


_SETTINGS = {"acdc": {"5%": (3, 68), "10%": (7, 136)}, "synapse": {"10%": (2,), "20%": (4,)}}


class PaperTable(SphinxDirective):
    required_arguments = 1

    def run(self):
        self.env.note_dependency(str(REPO / "benchmarks" / "paper_numbers.json"))
        paper = _paper()
        which = self.arguments[0]
        if which == "table2":
            t = paper["table2"]
            rows = [[k] + v for k, v in t["rows"].items()]
            return [_table(["exp."] + t["columns"], rows, t["caption"])]
        dataset = which.split("-", 1)[1]
        t = paper["table1"]
        rows = []
        for setting, methods in t[dataset].items():
            for method, vals in methods.items():
                rows.append([setting, method] + vals)
        unit = "Dice (%)", "JC (%)", "ASD (voxel)"
        cap = f"{dataset.upper() if dataset == 'acdc' else dataset.title()}, paper's Table 1"
        return [_table(["labeled", "method", *unit], rows, cap)]


# ----------------------------------------------------------------------------- measured rows
_METRIC_KEYS = {
    "dice": ("dice", "mean_dice", "dice_mean", "dsc"),
    "jc": ("jc", "jaccard", "mean_jc", "mean_jaccard", "jaccard_mean"),
    "hd95": ("hd95", "mean_hd95", "hd95_mean", "hd95_vox"),
    "asd": ("asd", "mean_asd", "asd_mean", "mean_asd_vox", "asd_vox"),
}


def _metric(node: Dict[str, Any], names: Sequence[str]) -> Tuple[Optional[float], Optional[float]]:
    """Find a metric's mean (and std) in a result row.

    Looked up in the row, in its ``test`` / ``metrics`` / ``summary`` / ``results`` object,
    and in the ``mean`` object of each of those; a value is a number or ``{"mean", "std"}``.
    The std, for a number, is ``<name>_std`` beside it or ``<name>`` in a sibling ``std`` /
    ``std_over_seeds`` object (a spread over seeds, as the paper reports; not over volumes).
    """
    tops = [node] + [node[k] for k in ("test", "metrics", "summary", "results") if isinstance(node.get(k), dict)]
    containers: List[Tuple[Dict[str, Any], Dict[str, Any]]] = []
    for t in tops:
        containers.append((t, t))
        if isinstance(t.get("mean"), dict):
            containers.append((t["mean"], t))
    for sub, parent in containers:
        for n in names:
            v = sub.get(n)
            if isinstance(v, dict) and isinstance(v.get("mean"), (int, float)):
                std = v.get("std")
                return float(v["mean"]), float(std) if isinstance(std, (int, float)) else None
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                std = sub.get(n + "_std", sub.get("std_" + n))
                for key in ("std", "std_over_seeds"):
                    if std is None and isinstance(parent.get(key), dict):
                        std = parent[key].get(n)
                return float(v), float(std) if isinstance(std, (int, float)) else None
    return None, None


def _walk(d: Any) -> Iterable[Dict[str, Any]]:
    if isinstance(d, dict):
        yield d
        for v in d.values():
            yield from _walk(v)
    elif isinstance(d, list):
        for v in d:
            yield from _walk(v)


def _method(node: Dict[str, Any]) -> Optional[str]:
    """The method of a result row: its ``method``, else its ``variant`` (ablation rows)."""
    m = node.get("method", node.get("variant"))
    return m if isinstance(m, str) else None


_ABLATION_ROW = {"cps": "I", "i": "I", "ii": "II", "iii": "III", "iv": "IV", "v": "V", "vi": "VI", "dacl": "VI"}


def _measured_rows(dataset: str) -> List[Tuple[str, Dict[str, Any]]]:
    """Result rows of ``dataset`` in ``benchmarks/results/*.json``.

    A row is any JSON object with a string ``"method"`` (or ``"variant"``) and a Dice value (``dice``,
    ``mean_dice`` ... as a number or ``{"mean", "std"}``, in the object or its ``test`` /
    ``metrics`` / ``summary`` / ``mean`` sub-object). Its dataset is its ``"dataset"`` value,
    else the file name's first word (``acdc_quick.json`` -> acdc); ``chaos`` counts as the
    Synapse protocol. Its setting is ``"labeled"`` (patients, volumes, slices or a "10%"
    string) or ``"label_fraction"``.
    """
    found = []
    for path in sorted(RESULTS.glob("*.json")) if RESULTS.exists() else []:
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        file_ds = path.stem.split("_")[0].lower()
        top = {k: data[k] for k in ("preset", "dataset") if isinstance(data, dict) and isinstance(data.get(k), str)}
        for node in _walk(data):
            if not isinstance(_method(node), str):
                continue
            node = {**top, **node}
            ds = str(node.get("dataset", file_ds)).lower()
            ds = "synapse" if ds in ("chaos", "chaos_t2", "chaos-t2", "btcv", "dhc_npy", "synapse") else ds
            if ds != dataset or _metric(node, _METRIC_KEYS["dice"])[0] is None:
                continue
            found.append((path.relative_to(REPO).as_posix(), node))
    return found


def _setting(dataset: str, node: Dict[str, Any]) -> str:
    lab = next((node[k] for k in ("labeled", "labeled_patients", "labeled_volumes", "label_fraction",
                                  "labeled_fraction") if k in node), None)
    if isinstance(lab, str):
        return lab
    if isinstance(lab, float) and lab < 1:
        return f"{round(lab * 100)}%"
    if isinstance(lab, int):
        for name, counts in _SETTINGS.get(dataset, {}).items():
            if lab in counts:
                return name
        return str(lab)
    return "?"


def _pct(v: Optional[float], std: Optional[float], percent: bool) -> str:
    if v is None:
        return ""
    scale = 100.0 if percent and v <= 1.0 else 1.0
    s = f"{v * scale:.2f}"
    if std is not None:
        s += f" ± {std * scale:.2f}"
    return s


class Comparison(SphinxDirective):
    """``.. dacl-comparison:: acdc|synapse``; with ``:ablation:``, Table 2 (Dice) instead:
    rows I-VI of the paper beside our rows whose method / variant is ``cps`` (I), ``II`` ...
    ``V`` or ``dacl`` (VI), at 10 % labels."""

    required_arguments = 1
    option_spec = {"ablation": directives.flag}

    def run(self):
        if "ablation" in self.options:
            return self._ablation(self.arguments[0])
        dataset = self.arguments[0]
        self.env.note_dependency(str(REPO / "benchmarks" / "paper_numbers.json"))
        paper = _paper()["table1"][dataset]
        rows = []
        for setting in _SETTINGS[dataset]:
            for method in ("CPS", "DACL"):
                p = paper[setting][method]
                rows.append([setting, method, "paper (Table 1)", p[0], p[1], "", p[2], ""])
        measured = _measured_rows(dataset)
        for src, node in measured:
            self.env.note_dependency(str(REPO / src))
            d, ds = _metric(node, _METRIC_KEYS["dice"])
            j, js = _metric(node, _METRIC_KEYS["jc"])
            h, hs = _metric(node, _METRIC_KEYS["hd95"])
            a, as_ = _metric(node, _METRIC_KEYS["asd"])
            label = f"ours: {src}"
            if isinstance(node.get("label"), str):
                label += f" [{node['label']}]"
            extra = [f"{k} {node[k]}" for k in ("preset", "dataset", "seed") if k in node]
            if extra:
                label += " (" + ", ".join(extra) + ")"
            rows.append([_setting(dataset, node), _method(node), label, _pct(d, ds, True), _pct(j, js, True),
                         _pct(h, hs, False), _pct(a, as_, False),
                         node.get("n_seeds", len(node["seeds"]) if isinstance(node.get("seeds"), list) else
                                  1 if "seed" in node else "")])
        header = ["labeled", "method", "source", "Dice (%)", "JC (%)", "HD95 (voxel)", "ASD (voxel)", "seeds"]
        out: List[nodes.Node] = [_table(header, rows, f"{dataset}: the paper beside our runs")]
        if not measured:
            out.append(_note(f"Not yet measured: no result for {dataset} in benchmarks/results/*.json yet. "
                             "The table will fill itself when the reproduction files are committed."))
        return out


    def _ablation(self, dataset: str) -> List[nodes.Node]:
        self.env.note_dependency(str(REPO / "benchmarks" / "paper_numbers.json"))
        t2 = _paper()["table2"]
        col = t2["columns"].index("ACDC" if dataset == "acdc" else "Synapse")
        ten = "10%"
        ours: Dict[str, List[str]] = {}
        for src, node in _measured_rows(dataset):
            self.env.note_dependency(str(REPO / src))
            row = _ABLATION_ROW.get(str(_method(node)).lower())
            if row is None or _setting(dataset, node) != ten:
                continue
            d, ds = _metric(node, _METRIC_KEYS["dice"])
            n = node.get("n_seeds", node.get("seeds", ""))
            ours.setdefault(row, []).append(f"{_pct(d, ds, True)} ({src}" + (f", seeds {_fmt(n)})" if n != "" else ")"))
        rows = [[r, vals[col], "; ".join(ours.get(r, [])) or "not yet measured"] for r, vals in t2["rows"].items()]
        return [_table(["row", f"paper Dice (%), {dataset.upper() if dataset == 'acdc' else dataset}",
                        "ours Dice (%)"], rows, f"Table 2 ablation, {dataset}, 10 % labels: the paper beside our runs")]


# ----------------------------------------------------------------------------- results / figures
class Results(SphinxDirective):
    """``.. dacl-results:: <glob> [<glob> ...]`` with an optional ``:exclude:`` (globs) and
    ``:values:`` (the top-level keys of a JSON file whose scalar values are shown; default all)."""

    optional_arguments = 1
    final_argument_whitespace = True
    option_spec = {"exclude": directives.unchanged, "values": directives.unchanged}

    def run(self):
        patterns = self.arguments[0].split() if self.arguments else ["benchmarks/results/*"]
        excluded = set()
        for pattern in self.options.get("exclude", "").split():
            excluded.update(Path(x) for x in glob.glob(str(REPO / pattern), recursive=True))
        found = []
        for pattern in patterns:
            found += [Path(x) for x in glob.glob(str(REPO / pattern), recursive=True)]
        paths = sorted(p for p in dict.fromkeys(found)
                       if p.suffix in (".json", ".md") and p.is_file() and p not in excluded)
        if not paths:
            return [_note(f"Not yet measured: no result file matches {' '.join(patterns)} yet. The benchmark "
                          "scripts write their results to benchmarks/results/; this page renders them when "
                          "they are committed.")]
        out: List[nodes.Node] = []
        docdir = Path(self.env.doc2path(self.env.docname)).parent
        for p in paths:
            self.env.note_dependency(str(p))
            out.append(nodes.rubric(text=p.relative_to(REPO).as_posix()))
            try:
                values = self.options["values"].split() if "values" in self.options else None
                out.extend(render_json(p, values) if p.suffix == ".json" else render_markdown(p, docdir))
            except (OSError, ValueError) as e:
                out.append(_note(f"Could not read {p.name}: {e}"))
        return out


class Figures(SphinxDirective):
    """``.. dacl-figures:: <glob> [<glob> ...]`` with an optional ``:exclude:`` (globs)."""

    required_arguments = 1
    final_argument_whitespace = True
    option_spec = {"exclude": directives.unchanged}

    def run(self):
        paths: List[Path] = []
        for pattern in self.arguments[0].split():
            paths += sorted(Path(x) for x in glob.glob(str(REPO / pattern), recursive=True))
        excluded = set()
        for pattern in self.options.get("exclude", "").split():
            excluded.update(Path(x) for x in glob.glob(str(REPO / pattern), recursive=True))
        paths = [p for p in dict.fromkeys(paths) if p.suffix.lower() == ".png" and p not in excluded]
        if not paths:
            return [_note(f"Not yet measured: no figure matches {self.arguments[0]} yet.")]
        docdir = Path(self.env.doc2path(self.env.docname)).parent
        out = []
        for p in paths:
            self.env.note_dependency(str(p))
            out.append(_figure(p.resolve(), docdir, p.relative_to(REPO).as_posix()))
        return out


class Curves(SphinxDirective):
    """Training curves plotted at build time from the histories in result JSON files.

    ``.. dacl-curves:: <glob>``: every list of objects with a step key (``step`` or
    ``iteration``) and numeric series (keys containing ``dice`` or ``loss``) becomes a line
    plot, one figure per file, embedded as inline SVG in HTML (nothing is written to disk).
    Needs matplotlib (the ``examples`` extra); without it the page says so.
    """

    required_arguments = 1
    final_argument_whitespace = True

    def run(self):
        paths: List[Path] = []
        for pattern in self.arguments[0].split():
            paths += sorted(Path(x) for x in glob.glob(str(REPO / pattern), recursive=True))
        series = []
        for p in dict.fromkeys(paths):
            if p.suffix != ".json" or not p.is_file():
                continue
            self.env.note_dependency(str(p))
            try:
                data = json.loads(p.read_text())
            except (OSError, ValueError):
                continue
            found = []
            for key, rows in _row_lists(data if isinstance(data, dict) else {"rows": data}):
                step = next((k for k in ("step", "iteration", "iter") if all(k in r for r in rows)), None)
                if step is None:
                    continue
                for m in sorted({k for r in rows for k in r if ("dice" in k or "loss" in k)}):
                    pts = [(r[step], r[m]) for r in rows if isinstance(r.get(m), (int, float))]
                    if len(pts) >= 2:
                        found.append((f"{key}.{m}", pts))
            if found:
                series.append((p.relative_to(REPO).as_posix(), found))
        if not series:
            return [_note(f"Not yet measured: no training history in {self.arguments[0]} yet.")]
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return [_note("Training curves need matplotlib (pip install -e '.[examples]').")]
        import io

        out: List[nodes.Node] = []
        for name, found in series:
            fig, ax = plt.subplots(figsize=(6.4, 3.2))
            for label, pts in found:
                ax.plot([x for x, _ in pts], [y for _, y in pts], marker=".", label=label)
            ax.set_xlabel("step")
            ax.set_title(name, fontsize=9)
            ax.legend(fontsize=7)
            ax.grid(alpha=0.3)
            fig.tight_layout()
            buf = io.StringIO()
            fig.savefig(buf, format="svg", facecolor="white")
            plt.close(fig)
            svg = buf.getvalue()
            svg = svg[svg.index("<svg"):]
            out.append(nodes.raw("", f'<div class="dacl-curve">{svg}</div>', format="html"))
            out.append(_para(f"Training curve from {name}."))
        return out


# ----------------------------------------------------------------------------- example scripts
def _script(directive: SphinxDirective) -> Optional[Path]:
    path = REPO / directive.arguments[0]
    if path.exists():
        directive.env.note_dependency(str(path))
        return path
    return None


def _parse(path: Path) -> Optional[ast.Module]:
    """The script's syntax tree; None while it does not parse (e.g. half-edited)."""
    try:
        return ast.parse(path.read_text())
    except (SyntaxError, ValueError, OSError):
        return None


def _unparsable(name: str) -> List[nodes.Node]:
    return [_note(f"{name} does not parse right now; this section renders it once it does.")]


def _missing(name: str) -> List[nodes.Node]:
    return [_note(f"{name} is not in the repository yet (it is being written); this section renders it "
                  "automatically once it is committed.")]


def _value(node: Optional[ast.AST]) -> Any:
    """Literal value of an AST node; ``dict(...)`` calls included; source text otherwise."""
    if node is None:
        return None
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "dict" and not node.args:
        return {k.arg: _value(k.value) for k in node.keywords if k.arg}
    if isinstance(node, ast.Dict):
        return {_value(k): _value(v) for k, v in zip(node.keys, node.values) if k is not None}
    try:
        return ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return ast.unparse(node)


def _literal(v: Any) -> str:
    """A default or preset value as it is written in code (``0.0001``, not ``1.000e-04``)."""
    if isinstance(v, str):
        return v
    if isinstance(v, (list, tuple)):
        return ", ".join(_literal(x) for x in v)
    return repr(v)


def _module_namespace(tree: ast.Module) -> Dict[str, Any]:
    """Module-level names bound to literals (``dict(...)`` included), for resolving choices."""
    ns: Dict[str, Any] = {}
    for node in tree.body:
        target = node.targets[0] if isinstance(node, ast.Assign) and len(node.targets) == 1 else \
            node.target if isinstance(node, ast.AnnAssign) else None
        if isinstance(target, ast.Name) and node.value is not None:
            v = _value(node.value)
            if not (isinstance(v, str) and isinstance(node.value, ast.Call)):
                ns[target.id] = v
    return ns


def _choices(node: ast.AST, ns: Dict[str, Any]) -> str:
    try:
        v = ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        try:  # e.g. sorted(PRESETS) with PRESETS defined in the script
            v = eval(compile(ast.Expression(node), "<choices>", "eval"),  # noqa: S307 - names only
                     {"__builtins__": {}, "sorted": sorted, "list": list, "tuple": tuple}, dict(ns))
        except Exception:  # a name imported from elsewhere: show the expression
            return ast.unparse(node)
    return ", ".join(map(str, v)) if isinstance(v, (list, tuple, dict)) else str(v)


class Cli(SphinxDirective):
    required_arguments = 1

    def run(self):
        path = _script(self)
        if path is None:
            return _missing(self.arguments[0])
        tree = _parse(path)
        if tree is None:
            return _unparsable(self.arguments[0])
        ns = _module_namespace(tree)
        rows = []
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr == "add_argument"):
                continue
            flags = [a.value for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str)]
            kw = {k.arg: k.value for k in node.keywords if k.arg}
            default = _value(kw.get("default"))
            if "action" in kw and _value(kw["action"]) == "store_true":
                default = "off (flag)"
            kind = []
            if "choices" in kw:
                kind.append("one of " + _choices(kw["choices"], ns))
            elif "type" in kw:
                kind.append(ast.unparse(kw["type"]))
            if "nargs" in kw:
                kind.append(f"nargs={_value(kw['nargs'])}")
            help_ = _value(kw.get("help")) or ""
            rows.append((getattr(node, "lineno", 0), [" / ".join(flags), "" if default is None else _literal(default),
                                                      "; ".join(kind), help_]))
        rows.sort(key=lambda r: r[0])
        out: List[nodes.Node] = []
        if rows:
            out.append(_table(["flag", "default", "values", "help"], [r[1] for r in rows],
                              f"command line of {self.arguments[0]} (read from its source)"))
        presets = None
        for node in tree.body:
            target = node.targets[0] if isinstance(node, ast.Assign) and len(node.targets) == 1 else \
                node.target if isinstance(node, ast.AnnAssign) else None
            if isinstance(target, ast.Name) and target.id == "PRESETS":
                presets = _value(node.value)
        if isinstance(presets, dict) and all(isinstance(v, dict) for v in presets.values()):
            names = list(presets)
            keys: List[str] = []
            for v in presets.values():
                keys += [k for k in v if k not in keys and k != "note"]
            prow = [[k] + [_literal(presets[n][k]) if k in presets[n] else "" for n in names] for k in keys]
            out.append(_table(["setting"] + names, prow, f"presets of {self.arguments[0]} (read from PRESETS)"))
            for n in names:
                note = presets[n].get("note")
                if isinstance(note, str):
                    para = nodes.paragraph()
                    para += nodes.strong(text=f"{n}: ")
                    para += nodes.Text(note.split(":", 1)[1].strip() if note.startswith(n + ":") else note)
                    out.append(para)
        return out


class ScriptDoc(SphinxDirective):
    required_arguments = 1

    def run(self):
        path = _script(self)
        if path is None:
            return _missing(self.arguments[0])
        tree = _parse(path)
        if tree is None:
            return _unparsable(self.arguments[0])
        doc = ast.get_docstring(tree) or "(no module docstring)"
        return [_code(doc, "text")]


def _find_object(tree: ast.Module, dotted: str) -> Optional[ast.AST]:
    body: List[ast.stmt] = tree.body
    found: Optional[ast.AST] = None
    for part in dotted.split("."):
        found = next((n for n in body if isinstance(n, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef))
                      and n.name == part), None)
        if found is None:
            return None
        body = found.body
    return found


class Excerpt(SphinxDirective):
    """Quote part of a script: ``:pyobject: Class.method`` (found with :mod:`ast`) or the lines
    from the first match of ``:start:`` to the next match of ``:end:`` (regular expressions)."""

    required_arguments = 1
    option_spec = {"start": directives.unchanged_required, "end": directives.unchanged_required,
                   "pyobject": directives.unchanged_required}

    def run(self):
        path = _script(self)
        if path is None:
            return _missing(self.arguments[0])
        text = path.read_text()
        lines = text.splitlines()
        start = end = None
        if "pyobject" in self.options:
            tree = _parse(path)
            if tree is None:
                return _unparsable(self.arguments[0])
            obj = _find_object(tree, self.options["pyobject"])
            if obj is not None:
                decorators = getattr(obj, "decorator_list", [])
                start = min([obj.lineno] + [d.lineno for d in decorators]) - 1
                end = obj.end_lineno - 1
        elif "start" in self.options and "end" in self.options:
            start_re, end_re = re.compile(self.options["start"]), re.compile(self.options["end"])
            start = next((i for i, l in enumerate(lines) if start_re.search(l)), None)
            if start is not None:
                end = next((i for i in range(start, len(lines)) if end_re.search(lines[i])), None)
        if start is None or end is None:
            return [_note(f"(The part of {self.arguments[0]} this section quotes has moved; read the script "
                          "itself.)")]
        chunk = lines[start:end + 1]
        indent = min((len(l) - len(l.lstrip()) for l in chunk if l.strip()), default=0)
        block = _code("\n".join(l[indent:] for l in chunk))
        block["linenos"] = True
        block["highlight_args"] = {"linenostart": start + 1}
        cap = nodes.paragraph()
        cap += nodes.emphasis(text=f"{self.arguments[0]}, lines {start + 1}-{end + 1}:")
        return [cap, block]


class Defaults(SphinxDirective):
    """Constructor defaults of a class, read with :mod:`inspect` at build time.

    ``.. dacl-defaults:: torch_dacl.SoftDensityContrastiveLoss`` with an optional
    ``:names:`` option (space-separated parameter names, in the order to show).
    """

    required_arguments = 1
    option_spec = {"names": directives.unchanged_required}

    def run(self):
        import importlib
        import inspect

        mod, _, name = self.arguments[0].rpartition(".")
        cls = getattr(importlib.import_module(mod), name)
        params = inspect.signature(cls.__init__).parameters
        wanted = self.options.get("names", "").split() or [p for p in params if p != "self"]
        rows = []
        for p in wanted:
            par = params[p]
            default = "(required)" if par.default is inspect.Parameter.empty else repr(par.default)
            rows.append([p, default])
        return [_table(["argument", "default"], rows, f"defaults of {name} (read from the code)")]


def setup(app):
    app.add_directive("dacl-results", Results)
    app.add_directive("dacl-comparison", Comparison)
    app.add_directive("dacl-paper-table", PaperTable)
    app.add_directive("dacl-figures", Figures)
    app.add_directive("dacl-curves", Curves)
    app.add_directive("dacl-cli", Cli)
    app.add_directive("dacl-script-doc", ScriptDoc)
    app.add_directive("dacl-excerpt", Excerpt)
    app.add_directive("dacl-defaults", Defaults)
    return {"version": "0.1", "parallel_read_safe": True, "parallel_write_safe": True}
