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


def test_results_markdown_renders_tables_and_bullets(tmp_path):
    sys.path.insert(0, str(DOCS / "_ext"))
    try:
        import dacl_docs
    finally:
        sys.path.remove(str(DOCS / "_ext"))
    from docutils import nodes

    md = tmp_path / "r.md"
    md.write_text("# Title\n\nsome text\n\n| a | b |\n|---|---|\n| 1 | 2 |\n\n- first: +1.00\n- second: -2.00\n\nafter\n")
    out = dacl_docs.render_markdown(md, tmp_path)
    kinds = [type(n).__name__ for n in out]
    assert kinds == ["rubric", "paragraph", "table", "bullet_list", "paragraph"], kinds
    bullets = out[3]
    assert [li.astext() for li in bullets.children] == ["first: +1.00", "second: -2.00"]
    assert isinstance(out[2], nodes.table)
