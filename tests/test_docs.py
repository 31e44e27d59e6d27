"""The Sphinx documentation builds without a warning and its examples pass.

Runs the two commands of the docs (``docs/conf.py``) into a temporary folder:

* ``sphinx-build -W --keep-going -b html docs <tmp>/html`` (a warning fails the build);
* ``sphinx-build -b doctest docs <tmp>/doctest`` (every ``>>>`` example of the docstrings
  and pages, and every ``testcode`` block).

Skipped when Sphinx or the theme is not installed (``pip install -e ".[docs]"``).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("sphinx")
pytest.importorskip("furo")

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
    assert (tmp_path / "html" / "index.html").is_file()
    assert (tmp_path / "html" / "paper_to_code.html").is_file()


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
