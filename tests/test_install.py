"""The install the README gives, the one CI runs and the one pyproject.toml declares agree:
the same torch and torchvision pins, from the CPU index in the README, inside the ranges
the package and its extras accept."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
packaging = pytest.importorskip("packaging")
from packaging.requirements import Requirement  # noqa: E402
from packaging.version import Version  # noqa: E402

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    tomllib = pytest.importorskip("tomli")


def _pins(text: str) -> dict:
    return {m.group(1): m.group(2) for m in re.finditer(r"\b(torch|torchvision)==([0-9][0-9.]*)", text)}


def _readme_install() -> str:
    text = (REPO / "README.md").read_text()
    block = re.search(r"## Install.*?```bash\n(.*?)```", text, re.S)
    assert block is not None, "README lost its install block"
    return block.group(1)


def test_readme_ci_and_pyproject_agree_on_torch_and_torchvision():
    install = _readme_install()
    line = next(ln for ln in install.splitlines() if "torch==" in ln)
    assert "torchvision==" in line and "--index-url https://download.pytorch.org/whl/cpu" in line, line
    readme = _pins(line)
    ci = _pins((REPO / ".ci" / "run").read_text())
    assert readme == ci and set(readme) == {"torch", "torchvision"}, (readme, ci)
    # the README's prose names the versions CI tests
    assert f"torch {readme['torch']} and torchvision {readme['torchvision']}" in " ".join(
        (REPO / "README.md").read_text().split())
    # every torch pin in .ci/run is the same one (the wheel check installs torch too)
    assert set(re.findall(r"torch==([0-9][0-9.]*)", (REPO / ".ci" / "run").read_text())) == {readme["torch"]}
    meta = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    reqs = [Requirement(r) for r in meta["dependencies"] + meta["optional-dependencies"]["examples"]]
    for name, version in readme.items():
        specs = [r.specifier for r in reqs if r.name == name]
        assert specs, f"pyproject.toml does not declare {name}"
        assert all(Version(version) in s for s in specs), (name, version, specs)


def test_readme_install_order():
    """torch and torchvision first, from the CPU index, then the project with its extras."""
    lines = [ln.strip() for ln in _readme_install().splitlines() if ln.strip().startswith("pip install")]
    assert len(lines) == 2 and "torch==" in lines[0] and lines[1].startswith('pip install -e ".[test,docs,examples,nnunet]"')
    ci = (REPO / ".ci" / "run").read_text()
    assert lines[1].split("pip install ", 1)[1] in ci  # CI installs the same extras
