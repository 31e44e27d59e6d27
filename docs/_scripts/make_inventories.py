#!/usr/bin/env python
"""Write the offline intersphinx inventories ``docs/_static/{torch,python}-objects.inv``.

The docs build must not touch the network (``sphinx-build -W`` turns a failed inventory
download into an error, and CI machines are offline). Intersphinx only needs an
``objects.inv`` per project: a Sphinx v2 inventory, i.e. four header lines followed by the
zlib-compressed lines ``name domain:role priority uri dispname``. This script writes one for
the PyTorch and Python objects our docs and docstrings refer to, with URLs that follow each
project's documentation layout, so links point to the real pages on pytorch.org and
docs.python.org. Add a name here when the docs start referring to a new object, run

    python docs/_scripts/make_inventories.py

and commit the two ``.inv`` files.
"""

from __future__ import annotations

import zlib
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "_static"

# ---------------------------------------------------------------- PyTorch (pytorch.org/docs/stable/)
# Objects with their own generated page: generated/<name>.html#<name>
TORCH_GENERATED = {
    "py:class": [
        "torch.nn.Module", "torch.nn.Conv2d", "torch.nn.Conv3d", "torch.nn.BatchNorm2d",
        "torch.nn.BatchNorm3d", "torch.nn.ReLU", "torch.nn.Sequential", "torch.nn.Identity",
        "torch.nn.CrossEntropyLoss", "torch.nn.SyncBatchNorm",
        "torch.nn.parallel.DistributedDataParallel", "torch.optim.SGD", "torch.optim.Optimizer",
        "torch.optim.lr_scheduler.LRScheduler", "torch.optim.lr_scheduler.PolynomialLR",
        "torch.Generator", "torch.no_grad", "torch.enable_grad",
    ],
    "py:function": [
        "torch.compile", "torch.topk", "torch.einsum", "torch.softmax", "torch.argmax",
        "torch.cdist", "torch.randperm", "torch.manual_seed", "torch.load", "torch.save",
        "torch.nn.functional.cross_entropy", "torch.nn.functional.normalize",
        "torch.nn.functional.interpolate", "torch.nn.functional.one_hot",
        "torch.nn.functional.softmax", "torch.nn.functional.log_softmax",
    ],
    "py:method": [
        "torch.Tensor.backward", "torch.Tensor.detach", "torch.Tensor.topk",
        "torch.nn.Module.state_dict", "torch.nn.Module.load_state_dict",
        "torch.nn.Module.register_forward_hook", "torch.nn.Module.register_buffer",
        "torch.nn.Module.get_submodule", "torch.nn.Module.to", "torch.nn.Module.train",
        "torch.nn.Module.eval", "torch.nn.SyncBatchNorm.convert_sync_batchnorm",
    ],
}
# Objects documented on a topic page: <page>#<name>
TORCH_ON_PAGE = [
    ("py:class", "torch.Tensor", "tensors.html"),
    ("py:class", "torch.device", "tensor_attributes.html"),
    ("py:class", "torch.dtype", "tensor_attributes.html"),
    ("py:class", "torch.autocast", "amp.html"),
    ("py:class", "torch.amp.GradScaler", "amp.html"),
    ("py:class", "torch.autograd.Function", "autograd.html"),
    ("py:class", "torch.utils.data.DataLoader", "data.html"),
    ("py:class", "torch.utils.data.Dataset", "data.html"),
    ("py:class", "torch.utils.data.distributed.DistributedSampler", "data.html"),
    ("py:class", "torch.distributed.ReduceOp", "distributed.html"),
    ("py:class", "torch.distributed.ProcessGroup", "distributed.html"),
    ("py:function", "torch.distributed.init_process_group", "distributed.html"),
    ("py:function", "torch.distributed.destroy_process_group", "distributed.html"),
    ("py:function", "torch.distributed.is_available", "distributed.html"),
    ("py:function", "torch.distributed.is_initialized", "distributed.html"),
    ("py:function", "torch.distributed.get_rank", "distributed.html"),
    ("py:function", "torch.distributed.get_world_size", "distributed.html"),
    ("py:function", "torch.distributed.all_gather", "distributed.html"),
    ("py:function", "torch.distributed.all_gather_into_tensor", "distributed.html"),
    ("py:function", "torch.distributed.all_reduce", "distributed.html"),
    ("py:function", "torch.distributed.broadcast", "distributed.html"),
    ("py:function", "torch.distributed.barrier", "distributed.html"),
    ("py:module", "torch", "torch.html"),
    ("py:module", "torch.nn", "nn.html"),
    ("py:module", "torch.nn.functional", "nn.functional.html"),
    ("py:module", "torch.distributed", "distributed.html"),
    ("py:module", "torch.amp", "amp.html"),
    ("py:module", "torch.utils.data", "data.html"),
    ("std:doc", "distributed", "distributed.html"),
    ("std:doc", "amp", "amp.html"),
    ("std:doc", "elastic/run", "elastic/run.html"),  # torchrun
]

# Names under which autodoc sees some public classes (their defining module), with the page
# of the public name.
TORCH_ALIASES = [
    ("py:class", "torch.nn.modules.module.Module", "generated/torch.nn.Module.html#torch.nn.Module"),
    ("py:class", "torch._C.Generator", "generated/torch.Generator.html#torch.Generator"),
    # annotations written as ``nn.Module`` (``from torch import nn``) under postponed evaluation
    ("py:class", "nn.Module", "generated/torch.nn.Module.html#torch.nn.Module"),
]

# ---------------------------------------------------------------- Python (docs.python.org/3/)
PYTHON = [
    ("py:class", "int", "library/functions.html"),
    ("py:class", "float", "library/functions.html"),
    ("py:class", "bool", "library/functions.html"),
    ("py:class", "str", "library/stdtypes.html"),
    ("py:class", "tuple", "library/stdtypes.html"),
    ("py:class", "list", "library/stdtypes.html"),
    ("py:class", "dict", "library/stdtypes.html"),
    ("py:data", "None", "library/constants.html"),
    ("py:data", "typing.Optional", "library/typing.html"),
    ("py:data", "typing.Tuple", "library/typing.html"),
    ("py:data", "typing.List", "library/typing.html"),
    ("py:data", "typing.Dict", "library/typing.html"),
    ("py:class", "typing.NamedTuple", "library/typing.html"),
    ("py:class", "typing.Sequence", "library/typing.html"),
    ("py:class", "collections.abc.Sequence", "library/collections.abc.html"),
    ("py:module", "typing", "library/typing.html"),
    ("py:module", "argparse", "library/argparse.html"),
    ("py:module", "json", "library/json.html"),
    ("py:module", "doctest", "library/doctest.html"),
]


def _lines_torch():
    for role, names in TORCH_GENERATED.items():
        for name in names:
            page = name if role != "py:method" else name.rsplit(".", 1)[0]
            yield name, role, f"generated/{page}.html#$"
    for role, name, page in TORCH_ON_PAGE:
        yield name, role, (page if role == "std:doc" else f"{page}#$")
    for role, name, uri in TORCH_ALIASES:
        yield name, role, uri


def _lines_python():
    for role, name, page in PYTHON:
        yield name, role, f"{page}#$" if role != "py:module" else f"{page}#module-$"


def write_inventory(path: Path, project: str, version: str, entries) -> None:
    header = (
        "# Sphinx inventory version 2\n"
        f"# Project: {project}\n"
        f"# Version: {version}\n"
        "# The remainder of this file is compressed using zlib.\n"
    ).encode()
    body = []
    for name, role, uri in sorted(set(entries)):
        disp = "-"
        if role == "std:doc":
            disp = name
        body.append(f"{name} {role} 1 {uri} {disp}\n")
    path.write_bytes(header + zlib.compress("".join(body).encode(), 9))


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    write_inventory(OUT / "torch-objects.inv", "PyTorch", "stable", _lines_torch())
    write_inventory(OUT / "python-objects.inv", "Python", "3", _lines_python())
    print(f"wrote {OUT / 'torch-objects.inv'} and {OUT / 'python-objects.inv'}")


if __name__ == "__main__":
    main()
