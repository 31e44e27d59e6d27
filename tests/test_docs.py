"""The Sphinx documentation builds without a warning and its examples pass.

Runs the two commands of the docs (``docs/conf.py``) into a temporary folder:

* ``sphinx-build -W --keep-going -b html docs <tmp>/html`` (a warning fails the build);
* ``sphinx-build -b doctest docs <tmp>/doctest`` (every ``>>>`` example of the docstrings
  and pages, and every ``testcode`` block).

Skipped when Sphinx or the theme is not installed (``pip install -e ".[docs]"``).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("sphinx")
pytest.importorskip("furo")
pytest.importorskip("sphinx-mathjax-offline")  # the docs extra; bundles MathJax into the HTML

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def _sphinx(*args: str, tmp: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    # -E: fresh environment; -d: doctrees in the temporary folder (nothing written under docs/)
    cmd = [sys.executable, "-m", "sphinx", "-E", "-q", "-d", str(tmp / "doctrees"), *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def test_html_builds_without_warnings(tmp_path):
    res = _sphinx("-W", "--keep-going", "-b", "html", str(DOCS), str(tmp_path / "html"), tmp=tmp_path)
    assert res.returncode == 0, f"sphinx html build failed:\n{res.stdout[-5000:]}\n{res.stderr[-5000:]}"
    html = tmp_path / "html"
    for page in ("index", "paper_to_code", "design", "results"):
        assert (html / f"{page}.html").is_file(), page
    _check_offline_readable(html)


# a flag whose "--" smart quotes turned into an en dash: "–preset", "–data-root"
EN_DASH_FLAG = re.compile("\u2013[a-z]")
# a script, stylesheet or font loaded from another host (MathJax from a CDN, say)
REMOTE_ASSET = re.compile(r"""<(?:script|link|img)\b[^>]*\b(?:src|href)=["'](?:https?:)?//""", re.I)


def _check_offline_readable(html: Path) -> None:
    """The built pages read offline and copy correctly: no Furo error box (its CSS turns a
    ``.. contents::`` block into a red "ERROR: Adding a table of contents" box), no asset
    from the network (MathJax is bundled), no smart-quoted flags, no "not yet measured"
    next to a plotted curve."""
    pages = sorted(html.rglob("*.html"))
    assert pages
    for page in pages:
        text = page.read_text(encoding="utf-8")
        name = page.relative_to(html).as_posix()
        assert "ERROR" not in text, f"{name}: an ERROR box"
        assert not re.search(r'class="[^"]*\bcontents\b(?![^"]*this-will-duplicate)', text), \
            f"{name}: a contents block (Furo shows it as an ERROR box)"
        remote = REMOTE_ASSET.findall(text)
        assert not remote, f"{name}: loads from the network: {remote[:3]}"
        flags = EN_DASH_FLAG.findall(text)
        assert not flags, f"{name}: smart-quoted flags {flags[:3]} (copied commands would fail)"
        if "mathjax" in text.lower():
            assert re.search(r'src="(?:\.\./)*_static/mathjax/tex-chtml\.js"', text), f"{name}: MathJax not bundled"
    assert (html / "_static" / "mathjax" / "tex-chtml.js").is_file()
    results = (html / "results.html").read_text(encoding="utf-8")
    assert "Not yet measured: no training history" not in results
    assert "(values)" not in results or "loss_cost.json (values)" in results  # no raw dump of whole result files


def test_doctest_examples_pass(tmp_path):
    res = _sphinx("-b", "doctest", str(DOCS), str(tmp_path / "doctest"), tmp=tmp_path)
    report = (tmp_path / "doctest" / "output.txt")
    text = report.read_text() if report.is_file() else ""
    assert res.returncode == 0, f"doctest build failed:\n{text[-5000:]}\n{res.stderr[-5000:]}"
    assert "0 failures in tests" in text
    # the docstring examples of the API pages ran, not only the pages' own blocks
    assert "Document: api/functional" in text


def _ext():
    sys.path.insert(0, str(DOCS / "_ext"))
    try:
        import dacl_docs
    finally:
        sys.path.remove(str(DOCS / "_ext"))
    return dacl_docs


def test_extension_is_small_and_reads_the_schema():
    """The extension stays within its budget and reads results through the schema, not by guessing keys."""
    text = (DOCS / "_ext" / "dacl_docs.py").read_text()
    assert len(text.splitlines()) <= 400
    assert "import results_schema" in text and "mean_dice" not in text and "wall_time_s" not in text


def test_results_table_renders_as_list_tables():
    from docutils.core import publish_doctree

    ext = _ext()
    table = ext.rs.load_table(ROOT / "benchmarks" / "results" / "acdc_quick.json")
    tree = publish_doctree("\n".join(ext.table_lines(table)), settings_overrides={"report_level": 2, "halt_level": 2})
    tables = [n for n in tree.findall() if n.tagname == "table"]
    assert len(tables) == 4  # 7 and 3 labeled patients, each overlap (Dice, Jaccard) and surface distance
    widths = [int(next(t.findall(lambda n: n.tagname == "tgroup"))["cols"]) for t in tables]
    assert max(widths) <= 6  # a table that fits a printed page (it had 10 columns)
    text = tree.astext()
    assert "90.91 ± 0.5" in text and "42.46 ± 3.43" in text and "better in 1 of 3" in text
    ablation = publish_doctree("\n".join(ext.table_lines(table, ablation=True)))
    assert len([n for n in ablation.findall() if n.tagname == "table"]) == 1 and "89.80 ± 0.5" in ablation.astext()
    # the ablation rows beside CPS: their paired difference, as stored in the table
    cpu = ext.rs.load_table(ROOT / "benchmarks" / "results" / "acdc_cpu.json")
    pair = next(d for d in cpu.paired if (d.a, d.b, d.labeled) == ("III", "cps", 7))
    rows = [r for r in publish_doctree("\n".join(ext.table_lines(cpu, ablation=True))).findall()
            if r.tagname == "row"]
    cells = {r.astext().split("\n")[0]: r.astext().split("\n\n") for r in rows}
    assert cells["Table 2 row"][3] == "− CPS, paired by seed"
    assert cells["III: + density-aware, single scale"][3] == ext.collect.paired_mean(pair) != "–"


def test_cli_table_comes_from_the_parser():
    import argparse

    from docutils.core import publish_doctree

    ext = _ext()
    p = argparse.ArgumentParser()
    g = p.add_argument_group("run")
    g.add_argument("--preset", choices=["smoke", "quick"], default="smoke", help="w_i *weights* (default %(default)s)")
    g.add_argument("--no-bank", action="store_true")
    g.add_argument("--ks", type=int, nargs="+", default=[8, 16, 32])
    tree = publish_doctree("\n".join(ext.cli_lines(p, "x.py")), settings_overrides={"report_level": 2, "halt_level": 2})
    text = tree.astext()
    for want in ("--preset", "one of smoke, quick", "w_i *weights* (default smoke)", "off (flag)", "8, 16, 32",
                 "nargs=+"):
        assert want in text, want


def test_a_difference_from_one_seed_shows_no_spread():
    """One paired seed has no standard deviation to show: the page says so instead of "± 0.00"."""
    import dataclasses

    ext = _ext()
    table = ext.rs.load_table(ROOT / "benchmarks" / "results" / "acdc_quick.json")
    one = ext.rs.Paired(7, "dacl", "cps", [0], [1.5], 1.5, 0.0, 1)
    text = "\n".join(ext.table_lines(dataclasses.replace(table, paired=[one])))
    assert "+1.50 (one seed: no spread) (seed 0: +1.50; better in 1 of 1)" in text and "± 0.00" not in text
