"""Sphinx configuration of the torch-dacl documentation.

Build (from the repository root):

    python -m sphinx -W --keep-going -b html docs docs/_build/html
    python -m sphinx -b doctest docs docs/_build/doctest

The build needs no network: intersphinx reads the inventories committed in ``_static/``
(written by ``_scripts/make_inventories.py``), and the pages need none either: MathJax is
copied into the HTML from the ``sphinx-mathjax-offline`` package (the ``docs`` extra).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
sys.path.insert(0, str(DOCS / "_ext"))
sys.path.insert(0, str(DOCS.parent))  # the package itself, also without an installation

import torch_dacl  # noqa: E402

project = "torch-dacl"
author = "torch-dacl developers"
copyright = "2025, torch-dacl developers"
release = torch_dacl.__version__
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.intersphinx",
    "sphinx.ext.doctest",
    "sphinx.ext.mathjax",
    "sphinx-mathjax-offline",  # MathJax served from _static/mathjax: equations render offline
    "sphinx.ext.viewcode",
    "dacl_docs",
]

exclude_patterns = ["_build", "_scripts", "_ext", "Thumbs.db", ".DS_Store"]
templates_path: list = []
html_static_path = ["_static"]
html_css_files = ["dacl.css"]  # wide tables scroll instead of being clipped
# Straight quotes and dashes: "--preset" must not become an en dash in commands and flag tables.
smartquotes = False
html_extra_path: list = []

# ---------------------------------------------------------------- HTML
html_theme = "furo"
html_title = f"torch-dacl {release}"
html_theme_options = {
    "navigation_with_keys": True,
}
pygments_style = "sphinx"
pygments_dark_style = "monokai"

# ---------------------------------------------------------------- autodoc / napoleon
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_typehints_description_target = "documented_params"
autodoc_preserve_defaults = True
autodoc_class_signature = "mixed"
autodoc_default_options = {
    "members": True,
    "show-inheritance": True,
    "exclude-members": "extra_repr",
}
autodoc_mock_imports: list = []
autodoc_inherit_docstrings = False  # no nn.Module.forward boilerplate on undocumented overrides

python_use_unqualified_type_names = False

napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
napoleon_use_ivar = True
napoleon_attr_annotations = True
napoleon_custom_sections = [("Shape", "notes_style")]

# ---------------------------------------------------------------- intersphinx (offline)
# The inventories are committed files; no download is attempted at build time.
intersphinx_mapping = {
    "torch": ("https://pytorch.org/docs/stable/", str(DOCS / "_static" / "torch-objects.inv")),
    "python": ("https://docs.python.org/3/", str(DOCS / "_static" / "python-objects.inv")),
}
intersphinx_timeout = 1
intersphinx_disabled_reftypes = ["std:doc"]
# Every reference to torch-dacl's own API must resolve (a renamed function breaks the build);
# a reference to another project's object that is missing from the small offline inventories
# only loses its link.
nitpicky = True
nitpick_ignore_regex = [(r"py:.*", r"(?!torch_dacl\b).*")]

# ---------------------------------------------------------------- doctest
# Docstring examples (``>>>`` blocks, rendered by autodoc) and the ``.. doctest::`` blocks of
# the pages run under ``sphinx-build -b doctest``.
doctest_test_doctest_blocks = "default"
doctest_global_setup = """
import torch
torch.manual_seed(0)
torch.set_num_threads(1)  # the examples are tiny; threads only contend on shared CI machines
import torch_dacl
import torch_dacl.functional as DF
from torch_dacl import *
from torch_dacl.functional import *
from torch_dacl.distributed import all_gather_cat, all_gather_with_grad, is_distributed, shared_generator
"""
doctest_default_flags = (
    __import__("doctest").ELLIPSIS
    | __import__("doctest").NORMALIZE_WHITESPACE
    | __import__("doctest").DONT_ACCEPT_TRUE_FOR_1
)

# Quiet torch on import in the doctest builder.
os.environ.setdefault("OMP_NUM_THREADS", "1")

# ---------------------------------------------------------------- math
math_number_all = False
math_eqref_format = "Eq. {number}"
