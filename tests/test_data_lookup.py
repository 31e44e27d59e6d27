"""The data guards of the real-data tests (conftest.py): documented lookup, honest skips."""

import pytest

from conftest import REPO, data_root, require_data


class _Config:
    def __init__(self, data_root=None):
        self._root = data_root

    def getoption(self, name, default=None):
        assert name == "--data-root"
        return self._root


def test_lookup_order_option_then_env_then_shared(monkeypatch, tmp_path):
    monkeypatch.delenv("TORCH_DACL_DATA", raising=False)
    assert data_root(_Config()) == (REPO.parent / "shared" / "data").resolve()
    monkeypatch.setenv("TORCH_DACL_DATA", str(tmp_path / "env"))
    assert data_root(_Config()) == tmp_path / "env"
    assert data_root(_Config(str(tmp_path / "opt"))) == tmp_path / "opt"


def test_absent_data_is_a_skip_that_says_where_it_looked(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_DACL_DATA", str(tmp_path))
    monkeypatch.setenv("CI", "true")  # absent data is a skip even in CI
    with pytest.raises(pytest.skip.Exception, match=f"ACDC not found at {tmp_path / 'ACDC'}.*TORCH_DACL_DATA"):
        require_data(_Config(), "ACDC")


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
