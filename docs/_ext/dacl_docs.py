"""Sphinx directives that render the repository's data at build time (nothing is retyped).

Each directive reads one file of the repository with the code that writes it and emits stock
reStructuredText (``list-table``, ``literal-block``), parsed as if it were in the page:

``.. dacl-table:: benchmarks/results/<dataset>_<preset>.json``
    A results table (:class:`results_schema.Table`, written by ``benchmarks/collect.py``): one
    table per labeled count, mean ± std over seeds, the paper's numbers beside it (from
    ``benchmarks/paper_numbers.json``, through ``collect.paper_row``), the differences paired
    by seed and the table's notes. ``:ablation:``: only Table 2's rows, our Dice and its
    difference to CPS (paired by seed) beside the paper's.
``.. dacl-paper-table:: table1-acdc|table1-synapse|table2``
    A table of ``benchmarks/paper_numbers.json`` (the paper's numbers, transcribed).
``.. dacl-json:: <file> [key ...]``
    The values of a benchmark JSON under the given top-level keys: nested scalars as a
    key / value table, lists of objects as tables.
``.. dacl-cli:: examples/<script>.py``
    The script's command line, from its parser (``build_parser()``, else the parser its
    ``parse_args``/``main`` builds), one table per argument group, and its ``PRESETS``.
``.. dacl-script-doc:: examples/<script>.py``
    The script's module docstring, verbatim.
``.. dacl-defaults:: package.Class``
    A constructor's defaults, read with :mod:`inspect`; ``:names:`` picks and orders them.

Code excerpts use the stock ``literalinclude`` (``:pyobject:``, ``:start-at:``), figures the
stock ``figure``. A file that does not exist gives a visible "not yet measured" note.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import importlib.util
import inspect
import json
import sys
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence

from docutils import nodes
from docutils.parsers.rst import directives
from docutils.statemachine import StringList
from sphinx.util.docutils import SphinxDirective

REPO = Path(__file__).resolve().parents[2]
for _p in (REPO / "examples", REPO / "benchmarks"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

import collect  # noqa: E402  benchmarks/collect.py: the paper's numbers and the labels of the variants
import results_schema as rs  # noqa: E402  examples/results_schema.py

PAPER = REPO / "benchmarks" / "paper_numbers.json"


# ----------------------------------------------------------------------------- rst helpers
def _cell(v: Any) -> str:
    """One list-table cell: plain text, markup characters escaped; empty stays a comment-free blank."""
    if v is None or v == "":
        return "\\ "
    if isinstance(v, float):
        v = f"{v:.4g}" if abs(v) < 1 else f"{v:.2f}" if abs(v) < 1e4 else f"{v:.0f}"
    text = " ".join(str(v).replace("+-", " ± ").split())
    for ch in "\\`*_|[]<>":
        text = text.replace(ch, "\\" + ch)
    return text


def list_table(header: Sequence[Any], rows: Iterable[Sequence[Any]], caption: str = "",
               literal_first: bool = False) -> List[str]:
    """The lines of a ``list-table`` (``literal_first``: the first column as ``code``)."""
    lines = [f".. list-table:: {_cell(caption).strip()}" if caption else ".. list-table::", "   :header-rows: 1",
             "   :class: dacl-data", ""]
    for i, row in enumerate([list(header), *rows]):
        for j, v in enumerate(row):
            text = f"``{v}``" if literal_first and j == 0 and i > 0 and v else _cell(v)
            lines.append(f"   {'* -' if j == 0 else '  -'} {text}")
    return lines + [""]


class _Rst(SphinxDirective):
    """A directive that writes reStructuredText lines and has them parsed in place."""

    def parse_lines(self, lines: List[str]) -> List[nodes.Node]:
        holder = nodes.Element()
        self.state.nested_parse(StringList(lines, source=f"<{self.name}>"), self.content_offset, holder)
        return holder.children

    def repo_file(self, rel: str) -> Optional[Path]:
        path = REPO / rel
        if not path.is_file():
            return None
        self.env.note_dependency(str(path))
        return path


def _note(text: str) -> List[nodes.Node]:
    return [nodes.note("", nodes.paragraph(text=text))]


# ----------------------------------------------------------------------------- results tables
def _pm(st: rs.Stat, n: int) -> str:
    return "–" if st.mean is None else f"{st.mean:.2f}" if n == 1 else f"{st.mean:.2f} ± {st.std:.2f}"


def table_lines(table: rs.Table, ablation: bool = False) -> List[str]:
    """The reStructuredText of a results table (see ``dacl-table``)."""
    comparable = collect.DATASETS.get(table.dataset, {}).get("paper")
    metrics = [m for m in rs.METRICS if any(r.metrics[m].mean is not None for r in table.rows)]
    u = table.units
    out: List[str] = []
    for labeled in sorted({r.labeled for r in table.rows}, reverse=True):
        rows = [r for r in table.rows if r.labeled == labeled]
        unit = rows[0].labeled_unit
        if ablation:
            paper = collect.paper()
            if comparable is None or paper["settings"][comparable].get(paper["methods"]["table2_setting"]) != labeled:
                continue  # Table 2 is at one labeled fraction only
            vs_cps = {d.a: collect.paired_mean(d) for d in table.paired if d.labeled == labeled and d.b == "cps"}
            body = [[collect.LABELS.get(r.variant, r.variant), len(r.seeds), _pm(r.metrics["dice"], len(r.seeds)),
                     vs_cps.get(r.variant, "–"), (collect.paper_row(comparable, labeled, r.variant) or {}).get("dice", "–")]
                    for r in rows if r.variant in paper["methods"]["table2"]]
            if body and any(b[4] != "–" for b in body):
                out += list_table(["Table 2 row", "seeds", "Dice (%)", "− CPS, paired by seed", "paper Dice (%)"], body,
                                  f"{table.dataset.upper()} {table.preset}, {labeled} labeled {unit}: Table 2's rows")
            continue
        # two tables that fit a page: overlap (Dice, Jaccard) and surface distance (HD95, ASD)
        overlap = [m for m in metrics if u[m] == "%"]
        surface = [m for m in metrics if u[m] != "%"]
        title = f"{table.dataset.upper()} {table.preset}, {labeled} labeled {unit}"
        for group, paper_keys, what in ((overlap, ("dice", "jaccard"), "overlap"), (surface, ("asd",), "surface distance")):
            if not group:
                continue
            head = ["method", "seeds", *(f"{collect.NAMES[m]} ({u[m]})" for m in group)]
            if comparable:
                head += [f"paper {collect.NAMES[k] if k != 'asd' else 'ASD'}" for k in paper_keys]
            body = []
            for r in rows:
                n = len(r.seeds)
                cells = [collect.LABELS.get(r.variant, r.variant), n, *(_pm(r.metrics[m], n) for m in group)]
                if comparable:
                    p = collect.paper_row(comparable, labeled, r.variant) or {}
                    cells += [p.get(k, "–") + (" (Table 2)" if k == "dice" and p.get("source") == "Table 2" else "")
                              for k in paper_keys]
                body.append(cells)
            out += list_table(head, body, f"{title}: {what} (mean ± std over seeds, "
                                          f"{rows[0].num_test_cases} test cases)")
        pairs = [d for d in table.paired if d.labeled == labeled]
        if pairs:
            out += ["Test Dice differences paired by seed (percentage points):", ""]
            for d in pairs:
                out.append(f"- {_cell(collect.pair_name(d))}: {collect.paired_text(d)}")
            out.append("")
    if not ablation and table.notes:
        out += [f"- {_cell(n)}" for n in table.notes] + [""]
    return out


class Table(_Rst):
    required_arguments = 1
    option_spec = {"ablation": directives.flag}

    def run(self):
        path = self.repo_file(self.arguments[0])
        if path is None:
            return _note(f"Not yet measured: {self.arguments[0]} does not exist yet.")
        self.env.note_dependency(str(PAPER))
        lines = table_lines(rs.load_table(path), ablation="ablation" in self.options)
        return self.parse_lines(lines) if lines else _note(f"Not yet measured: no such rows in {self.arguments[0]}.")


class PaperTable(_Rst):
    required_arguments = 1

    def run(self):
        self.env.note_dependency(str(PAPER))
        paper = json.loads(PAPER.read_text())
        which = self.arguments[0]
        if which == "table2":
            t = paper["table2"]
            return self.parse_lines(list_table(["exp.", *t["columns"]], [[k, *v] for k, v in t["rows"].items()],
                                               t["caption"]))
        dataset = which.split("-", 1)[1]
        rows = [[setting, method, *vals] for setting, methods in paper["table1"][dataset].items()
                for method, vals in methods.items()]
        name = "ACDC" if dataset == "acdc" else dataset.title()
        return self.parse_lines(list_table(["labeled", "method", "Dice (%)", "JC (%)", "ASD (voxel)"], rows,
                                           f"{name}, paper's Table 1"))


# ----------------------------------------------------------------------------- benchmark JSON
def _flatten(d: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        elif not (isinstance(v, list) and v and isinstance(v[0], dict)):
            out[prefix + k] = ", ".join(map(str, v)) if isinstance(v, list) else v
    return out


def _get(d: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        d = d.get(part) if isinstance(d, dict) else None
    return d


class Json(_Rst):
    """``.. dacl-json:: FILE KEY...``: the list of rows (or mapping) under each KEY of a
    benchmark JSON file as a table. ``:columns:`` picks and names the columns of a list of rows,
    ``path = Header; path2 = Header2`` (dotted paths into each row; ``path*100`` multiplies
    the value by 100; ``path:+.2f`` formats it with that format spec); ``:caption:`` titles it; ``:command:`` adds the file's ``command``
    below it."""

    required_arguments = 1
    optional_arguments = 20
    option_spec = {"columns": directives.unchanged_required, "caption": directives.unchanged,
                   "command": directives.flag}

    def run(self):
        path = self.repo_file(self.arguments[0])
        if path is None:
            return _note(f"Not yet measured: {self.arguments[0]} does not exist yet.")
        data = json.loads(path.read_text())
        lines: List[str] = []
        if "columns" in self.options:
            cols = [c.split("=", 1) for c in self.options["columns"].split(";") if c.strip()]
            cols = [(k.strip(), h.strip()) for k, h in cols]
            for key in self.arguments[1:]:
                rows = _get(data, key) or []
                if isinstance(rows, dict):  # {name: {...}} -> rows, the name under the path "_key"
                    rows = [{"_key": k, **v} for k, v in rows.items() if isinstance(v, dict)]
                if not rows:
                    return _note(f"Not yet measured: {self.arguments[0]} has no {key!r} yet.")
                body = []
                for r in rows:
                    cells = []
                    for k, h in cols:  # "path*100": times 100; "path:+.2f": in that format
                        path, _, spec = k.partition(":")
                        num = isinstance(v := _get(r, path.removesuffix("*100")), (int, float)) and not isinstance(v, bool)
                        v = v * 100 if num and path.endswith("*100") else v
                        cells.append(format(v, spec) if spec and num else v)
                    body.append(cells)
                lines += list_table([h for _, h in cols], body, self.options.get("caption") or "")
            if "command" in self.options and data.get("command"):
                lines += [f"Measured by ``{data['command']}`` (``{self.arguments[0]}``).", ""]
            return self.parse_lines(lines)
        for key in self.arguments[1:] or list(data):
            v = data.get(key)
            if isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
                flat = [_flatten(x) for x in v]
                cols = list(dict.fromkeys(k for f in flat for k in f))
                lines += list_table(cols, [[f.get(c) for c in cols] for f in flat], f"{path.name}: {key}")
            elif isinstance(v, dict):
                lines += list_table(["key", "value"], list(_flatten(v).items()), f"{path.name}: {key}", True)
            elif v is not None:
                lines += list_table(["key", "value"], [[key, v]], path.name, True)
        return self.parse_lines(lines)


# ----------------------------------------------------------------------------- example scripts
class _Captured(Exception):
    def __init__(self, parser: argparse.ArgumentParser):
        super().__init__("parser captured")
        self.parser = parser


def script_parser(path: Path):
    """Import ``path`` (as ``_dacl_docs_<stem>``) and return ``(module, parser)``: its
    ``build_parser()``, else the parser that its ``parse_args`` or ``main`` builds, caught when
    it starts parsing."""
    name = f"_dacl_docs_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    if callable(getattr(mod, "build_parser", None)) and not inspect.signature(mod.build_parser).parameters:
        return mod, mod.build_parser()
    original = argparse.ArgumentParser.parse_known_args

    def capture(self, *args, **kwargs):
        raise _Captured(self)

    argparse.ArgumentParser.parse_known_args = capture
    try:
        for fn in ("parse_args", "main"):
            if callable(getattr(mod, fn, None)):
                try:
                    getattr(mod, fn)([])
                except _Captured as c:
                    return mod, c.parser
    finally:
        argparse.ArgumentParser.parse_known_args = original
    raise RuntimeError(f"{path.name}: no build_parser(), parse_args(argv) or main(argv) that builds a parser")


def _default(a: argparse.Action) -> str:
    if isinstance(a, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        return "off (flag)" if isinstance(a, argparse._StoreTrueAction) else "on (flag)"
    if a.default in (None, argparse.SUPPRESS):
        return ""
    return ", ".join(map(str, a.default)) if isinstance(a.default, (list, tuple)) else str(a.default)


def cli_lines(parser: argparse.ArgumentParser, script: str) -> List[str]:
    lines: List[str] = []
    for group in parser._action_groups:
        rows = []
        for a in group._group_actions:
            if isinstance(a, argparse._HelpAction) or a.help == argparse.SUPPRESS:
                continue
            kind = [f"one of {', '.join(map(str, a.choices))}"] if a.choices else \
                [getattr(a.type, "__name__", str(a.type))] if a.type else []
            if a.nargs not in (None, 0):
                kind.append(f"nargs={a.nargs}")
            help_ = a.help or ""
            if "%(" in help_:
                help_ = help_ % {**vars(a), "prog": parser.prog}
            rows.append([" / ".join(a.option_strings) or a.dest, _default(a), "; ".join(kind), help_])
        if rows:
            lines += list_table(["flag", "default", "values", "help"], rows,
                                f"{script}: {group.title} (from its argument parser)", True)
    return lines


class Figure(_Rst):
    """``.. dacl-figure:: benchmarks/results/x.png`` with the caption as content: the figure where
    the file exists, else a "not yet measured" note."""

    required_arguments = 1
    has_content = True
    option_spec = {"width": directives.unchanged}

    def run(self):
        if self.repo_file(self.arguments[0]) is None:
            return _note(f"Not yet measured: {self.arguments[0]} does not exist yet.")
        lines = [f".. figure:: /../{self.arguments[0]}", f"   :width: {self.options.get('width', '100%')}"]
        return self.parse_lines(lines + [""] + [f"   {ln}" for ln in self.content] + [""])


class Cli(_Rst):
    required_arguments = 1

    def run(self):
        path = self.repo_file(self.arguments[0])
        if path is None:
            return _note(f"{self.arguments[0]} is not in the repository yet.")
        try:
            mod, parser = script_parser(path)
        except Exception as e:  # a warning: -W fails the build, a plain build still shows the page
            self.state.document.reporter.warning(f"dacl-cli: cannot build the parser of {path.name}: {e!r}")
            return []
        lines = cli_lines(parser, self.arguments[0])
        presets = getattr(mod, "PRESETS", None)
        if isinstance(presets, dict) and presets and all(isinstance(v, dict) for v in presets.values()):
            keys = list(dict.fromkeys(k for v in presets.values() for k in v if k != "note"))
            lines += list_table(["setting", *presets], [[k, *(_preset(v.get(k, "")) for v in presets.values())]
                                                        for k in keys], f"presets of {self.arguments[0]}", True)
            lines += [f"- **{n}**: {_cell(v['note'])}" for n, v in presets.items() if isinstance(v.get("note"), str)]
            lines.append("")
        return self.parse_lines(lines)


def _preset(v: Any) -> str:
    return ", ".join(map(str, v)) if isinstance(v, (list, tuple)) else repr(v) if not isinstance(v, str) else v


class ScriptDoc(_Rst):
    required_arguments = 1

    def run(self):
        path = self.repo_file(self.arguments[0])
        if path is None:
            return _note(f"{self.arguments[0]} is not in the repository yet.")
        doc = ast.get_docstring(ast.parse(path.read_text())) or "(no module docstring)"
        return self.parse_lines(doc.splitlines() + [""])  # the script's own reStructuredText, rendered


class Defaults(_Rst):
    required_arguments = 1
    option_spec = {"names": directives.unchanged_required}

    def run(self):
        mod, _, name = self.arguments[0].rpartition(".")
        params = inspect.signature(getattr(importlib.import_module(mod), name).__init__).parameters
        wanted = self.options.get("names", "").split() or [p for p in params if p != "self"]
        rows = [[p, "(required)" if params[p].default is inspect.Parameter.empty else repr(params[p].default)]
                for p in wanted]
        return self.parse_lines(list_table(["argument", "default"], rows, f"defaults of {name} (read from the code)",
                                           True))


def setup(app):
    for name, cls in (("dacl-table", Table), ("dacl-paper-table", PaperTable), ("dacl-json", Json),
                      ("dacl-figure", Figure),
                      ("dacl-cli", Cli), ("dacl-script-doc", ScriptDoc), ("dacl-defaults", Defaults)):
        app.add_directive(name, cls)
    return {"version": "0.2", "parallel_read_safe": True, "parallel_write_safe": True}
