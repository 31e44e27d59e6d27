import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

# OpenMP threads that spin while waiting make a shared CPU crawl when several test workers
# run at once (pytest -n auto); must be set before torch loads libgomp.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, os.path.dirname(__file__))

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "examples"))


def _lookup():
    """The examples' one data lookup (``examples/_data.py``), which the tests use as it is;
    imported when a test needs data, so that the library's tests run without the examples."""
    import _data

    return _data

# The tests write nothing inside the checkout: hypothesis keeps no example database, and its
# other files (a cache of the constants it reads from the code) go to a temporary folder,
# removed at exit, instead of ./.hypothesis.
try:
    from hypothesis import settings
    from hypothesis.configuration import set_hypothesis_home_dir

    settings.register_profile("hermetic", database=None)
    settings.load_profile("hermetic")
    _HYPOTHESIS_HOME = tempfile.mkdtemp(prefix="torch-dacl-hypothesis-")
    set_hypothesis_home_dir(_HYPOTHESIS_HOME)
    atexit.register(shutil.rmtree, _HYPOTHESIS_HOME, ignore_errors=True)
except ImportError:  # pragma: no cover  (hypothesis is a test dependency)
    pass


def pytest_addoption(parser):
    parser.addoption("--data-root", default=None,
                     help="folder holding the real data sets (ACDC/, CHAOS-T2/); default: the examples' lookup, "
                          "$TORCH_DACL_DATA, else the cache of examples/get_data.py")


def data_root(config=None) -> Path:
    """The examples' lookup (``_data.data_sources``): ``--data-root``, then ``$TORCH_DACL_DATA``,
    then the cache of ``examples/get_data.py``. Never downloads."""
    opt = config.getoption("--data-root", default=None) if config is not None else None
    return _lookup().data_sources(opt)[0][1]


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
    opt = config.getoption("--data-root", default=None) if config is not None else None
    root = data_root(config)
    path = root / name
    if not path.exists():
        lookup = _lookup()
        dataset = {v: k for k, v in lookup.DATASET_DIRS.items()}.get(name, name.lower())
        pytest.skip(f"{name} not found at {path} (looked in: {lookup.looked_in(opt)}); set --data-root or "
                    f"TORCH_DACL_DATA, or run `{lookup.get_data_command(dataset)}`")
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
