"""Where the examples find their datasets: one lookup for the ACDC and the 3D examples.

The data root is the folder that holds the dataset folders (``ACDC/``, ``CHAOS-T2/``). It
is the first of:

1. ``--data-root`` (the command-line argument);
2. ``$TORCH_DACL_DATA``;
3. the user cache, ``<cache>/data``, where ``python examples/get_data.py acdc|chaos`` puts
   the prepared datasets; ``<cache>`` is ``$TORCH_DACL_CACHE``, else
   ``$XDG_CACHE_HOME/torch-dacl``, else ``~/.cache/torch-dacl``.

The first two are taken as given (a wrong path is an error that names it); the cache only
when it holds the dataset asked for. When no source holds it, the training scripts download
and prepare it into the cache (``download=True``, as MONAI's datasets do with
``download=True``; ``--no-download`` refuses), and everything else raises
:class:`DataNotFoundError` naming the one command that gets it. The tests find the data by
this same lookup (``tests/conftest.py``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import List, Optional, Tuple

__all__ = ["DATASET_DIRS", "DataNotFoundError", "cache_dir", "data_sources", "get_data_command",
           "resolve_data_root"]

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
    return out


def looked_in(arg: Optional[str] = None) -> str:
    """Where the lookup looks, in its order and in words (for error and skip messages)."""
    given = dict(data_sources(arg))
    return "; ".join(f"{str(given[w])!r} ({w})" if w in given else f"{w} not set"
                     for w in ("--data-root", "$TORCH_DACL_DATA")) + f"; the get_data cache {str(given['cache'])!r}"


def resolve_data_root(arg: Optional[str] = None, dataset: str = "acdc", *, download: bool = False,
                      progress: bool = True) -> Path:
    """The data root for ``dataset``: ``--data-root``, ``$TORCH_DACL_DATA``, the cache (see the
    module docstring).

    An explicit root (argument or environment variable) is returned as given, even if it does
    not hold the dataset, so that the caller's error names the path the user chose. When
    neither is set and the cache does not hold ``<cache>/data/<dataset folder>``:
    ``download=True`` downloads and prepares it there (:func:`get_data.fetch`, which says what
    it fetches, how large it is and where it goes, with a progress bar); otherwise
    :class:`DataNotFoundError` names the command that gets it.
    """
    if dataset not in DATASET_DIRS:
        raise ValueError(f"dataset: expected one of {sorted(DATASET_DIRS)}, got {dataset!r}")
    sources = data_sources(arg)
    where, path = sources[0]
    if where != "cache":
        return path
    if (path / DATASET_DIRS[dataset]).is_dir():
        return path
    if download:
        import get_data  # (imports this module: imported here, not at the top)

        return get_data.fetch(dataset, progress=progress, reason=f"no {DATASET_DIRS[dataset]} data found "
                              f"({looked_in(arg)})").parent
    raise DataNotFoundError(
        f"no {DATASET_DIRS[dataset]} data found ({looked_in(arg)}); get it with `{get_data_command(dataset)}`, "
        f"or point --data-root or $TORCH_DACL_DATA at a folder holding {DATASET_DIRS[dataset]}/")
