"""Where the examples find their datasets: one lookup for the ACDC and the 3D examples.

The data root is the folder that holds the dataset folders (``ACDC/``, ``CHAOS-T2/``). It
is the first of:

1. ``--data-root`` (the command-line argument);
2. ``$TORCH_DACL_DATA``;
3. the user cache, ``<cache>/data``, where ``python examples/get_data.py acdc|chaos`` puts
   the prepared datasets; ``<cache>`` is ``$TORCH_DACL_CACHE``, else
   ``$XDG_CACHE_HOME/torch-dacl``, else ``~/.cache/torch-dacl``;
4. ``<repository>/../shared/data``, the development copy beside the repository (a fallback
   for the project's own machines).

The first two are taken as given (a wrong path is an error that names it); the last two only
when they hold the dataset asked for. When no source holds it, the error names the one
command that gets it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import List, Optional, Tuple

__all__ = ["DATASET_DIRS", "DataNotFoundError", "cache_dir", "data_sources", "get_data_command",
           "resolve_data_root"]

REPO_ROOT = Path(__file__).resolve().parent.parent

# dataset key of get_data.py -> folder under the data root
DATASET_DIRS = {"acdc": "ACDC", "chaos": "CHAOS-T2"}


class DataNotFoundError(FileNotFoundError):
    """No data root holds the dataset; the message names the command that downloads it."""


def cache_dir() -> Path:
    """``$TORCH_DACL_CACHE``, else ``$XDG_CACHE_HOME/torch-dacl``, else ``~/.cache/torch-dacl``."""
    env = os.environ.get("TORCH_DACL_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "torch-dacl"


def get_data_command(dataset: str) -> str:
    """The command that downloads and prepares ``dataset`` (``"acdc"`` or ``"chaos"``)."""
    return f"python examples/get_data.py {dataset}"


def data_sources(arg: Optional[str] = None) -> List[Tuple[str, Path]]:
    """The candidate data roots in lookup order, as ``(where it comes from, path)``."""
    out: List[Tuple[str, Path]] = []
    if arg:
        out.append(("--data-root", Path(arg).expanduser()))
    env = os.environ.get("TORCH_DACL_DATA")
    if env:
        out.append(("$TORCH_DACL_DATA", Path(env).expanduser()))
    out.append(("cache", cache_dir() / "data"))
    out.append(("development copy", (REPO_ROOT.parent / "shared" / "data").resolve()))
    return out


def resolve_data_root(arg: Optional[str] = None, dataset: str = "acdc") -> Path:
    """The data root for ``dataset``: ``--data-root``, ``$TORCH_DACL_DATA``, the cache, the
    development copy (see the module docstring).

    An explicit root (argument or environment variable) is returned as given, even if it does
    not hold the dataset, so that the caller's error names the path the user chose. Raises
    :class:`DataNotFoundError` when neither is set and neither the cache nor the development
    copy holds ``<root>/<dataset folder>``.
    """
    if dataset not in DATASET_DIRS:
        raise ValueError(f"dataset: expected one of {sorted(DATASET_DIRS)}, got {dataset!r}")
    sources = data_sources(arg)
    where, path = sources[0]
    if where in ("--data-root", "$TORCH_DACL_DATA"):
        return path
    for _, path in sources:
        if (path / DATASET_DIRS[dataset]).is_dir():
            return path
    raise DataNotFoundError(
        f"no {DATASET_DIRS[dataset]} data found (looked in the cache {str(sources[0][1])!r}); get it with "
        f"`{get_data_command(dataset)}`, or point --data-root or $TORCH_DACL_DATA at a folder holding "
        f"{DATASET_DIRS[dataset]}/")
