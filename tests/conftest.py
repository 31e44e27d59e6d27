import os
import sys
from pathlib import Path

import pytest

# OpenMP threads that spin while waiting make a shared CPU crawl when several test workers
# run at once (pytest -n auto); must be set before torch loads libgomp.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, os.path.dirname(__file__))

REPO = Path(__file__).resolve().parent.parent


def pytest_addoption(parser):
    parser.addoption("--data-root", default=None,
                     help="folder holding the real data sets (ACDC/, CHAOS-T2/); default: $TORCH_DACL_DATA, "
                          "else <repo>/../shared/data")


def data_root(config=None) -> Path:
    """The documented data lookup: ``--data-root``, then ``$TORCH_DACL_DATA``, then
    ``<repo>/../shared/data`` (the same order as the examples' ``--data-root`` default)."""
    opt = config.getoption("--data-root", default=None) if config is not None else None
    if opt:
        return Path(opt).expanduser()
    env = os.environ.get("TORCH_DACL_DATA")
    if env:
        return Path(env).expanduser()
    return (REPO.parent / "shared" / "data").resolve()


def _unreadable(path: Path, probe):
    """Why ``path`` (an existing folder) cannot be read, or None."""
    try:
        names = os.listdir(path)
        if probe is not None:
            target = path / probe if isinstance(probe, str) else next(
                (path / n for n in sorted(names) if (path / n).is_file()), None)
            if target is None:
                return "it holds no file"
            with open(target, "rb") as f:
                f.read(1)
    except OSError as e:
        return f"{type(e).__name__}: {e}"
    return None


def require_data(config, name: str, probe=True) -> Path:
    """``data_root(config) / name``, or skip the test (saying where it looked) when absent.

    ``probe``: a file inside to read (True: any file) to prove the folder is readable.
    A folder that exists but cannot be read is a skip for a developer and a failure when
    ``CI=true``: CI has the development data, so losing it must not pass as a skip.
    """
    root = data_root(config)
    path = root / name
    if not path.exists():
        pytest.skip(f"{name} not found at {path} (set --data-root or TORCH_DACL_DATA; "
                    f"default <repo>/../shared/data)")
    why = "not a folder" if not path.is_dir() else _unreadable(path, probe)
    if why:
        msg = f"{name} at {path} exists but cannot be read: {why}"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(msg)
        pytest.skip(msg)
    return path


@pytest.fixture
def acdc_dir(request) -> Path:
    """The real ACDC folder (SSL4MIS layout), or a skip."""
    return require_data(request.config, "ACDC", probe="train_slices.list")


@pytest.fixture
def chaos_dir(request) -> Path:
    """The real CHAOS-T2 folder, or a skip."""
    return require_data(request.config, "CHAOS-T2", probe=True)
