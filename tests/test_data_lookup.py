"""The data guards of the real-data tests (conftest.py): documented lookup, honest skips."""

import os
from pathlib import Path

import pytest

from conftest import REPO, data_root, require_data


class _Config:
    def __init__(self, data_root=None):
        self._root = data_root

    def getoption(self, name, default=None):
        assert name == "--data-root"
        return self._root


def test_lookup_order_option_then_env_then_cache(monkeypatch, tmp_path):
    """The tests look where the examples look (``_data.data_sources``), never beside the checkout."""
    monkeypatch.delenv("TORCH_DACL_DATA", raising=False)
    monkeypatch.setenv("TORCH_DACL_CACHE", str(tmp_path / "cache"))
    assert data_root(_Config()) == tmp_path / "cache" / "data"
    monkeypatch.setenv("TORCH_DACL_DATA", str(tmp_path / "env"))
    assert data_root(_Config()) == tmp_path / "env"
    assert data_root(_Config(str(tmp_path / "opt"))) == tmp_path / "opt"


def test_data_downloaded_by_get_data_is_found(monkeypatch, tmp_path):
    monkeypatch.delenv("TORCH_DACL_DATA", raising=False)
    monkeypatch.setenv("TORCH_DACL_CACHE", str(tmp_path))
    (tmp_path / "data" / "ACDC").mkdir(parents=True)
    (tmp_path / "data" / "ACDC" / "train_slices.list").write_text("x\n")
    assert require_data(_Config(), "ACDC", probe="train_slices.list") == tmp_path / "data" / "ACDC"


def test_no_development_path_in_the_project():
    """The project's own machines keep data in a folder beside the checkout; users have no such
    folder, so no code, test or text of the project names it, but for CI's own script
    (``.ci/run``, which passes it to the clone as TORCH_DACL_DATA)."""
    dev = "/".join(["..", "sha" + "red"])  # (spelled apart, so that this test does not name it)
    files = []
    for folder, dirs, names in os.walk(REPO):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d not in ("_build", "runs", "__pycache__")]
        files += [Path(folder) / n for n in names if n.endswith((".py", ".md", ".rst", ".toml", ".cff", ".sh"))]
    assert len(files) > 50
    named = [str(p.relative_to(REPO)) for p in files if dev in p.read_text(errors="replace")]
    assert named == []


def test_absent_data_is_a_skip_that_says_where_it_looked(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_DACL_DATA", str(tmp_path))
    monkeypatch.setenv("CI", "true")  # absent data is a skip even in CI
    with pytest.raises(pytest.skip.Exception, match=f"ACDC not found at {tmp_path / 'ACDC'}.*TORCH_DACL_DATA"):
        require_data(_Config(), "ACDC")
    monkeypatch.delenv("TORCH_DACL_DATA")
    monkeypatch.setenv("TORCH_DACL_CACHE", str(tmp_path / "cache"))
    with pytest.raises(pytest.skip.Exception) as e:
        require_data(_Config(), "CHAOS-T2")
    msg = str(e.value)
    assert str(tmp_path / "cache" / "data") in msg and "TORCH_DACL_DATA not set" in msg
    assert "python examples/get_data.py chaos" in msg and "shared" not in msg


@pytest.mark.parametrize("ci", ["", "true"])
def test_unreadable_data_fails_in_ci_and_skips_elsewhere(monkeypatch, tmp_path, ci):
    (tmp_path / "ACDC").mkdir()  # present, but its list file cannot be read
    (tmp_path / "CHAOS-T2").write_text("a file, not a folder")
    monkeypatch.setenv("CI", ci)
    expected = pytest.fail.Exception if ci else pytest.skip.Exception
    with pytest.raises(expected, match="exists but cannot be read"):
        require_data(_Config(str(tmp_path)), "ACDC", probe="train_slices.list")
    with pytest.raises(expected, match="not a folder"):
        require_data(_Config(str(tmp_path)), "CHAOS-T2")
    (tmp_path / "ACDC" / "train_slices.list").write_text("x\n")
    assert require_data(_Config(str(tmp_path)), "ACDC", probe="train_slices.list") == tmp_path / "ACDC"
