"""The README's "Add DACL to your loop" snippet runs as written."""

import pathlib
import re

import torch

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_snippet_runs_and_trains(capsys):
    text = README.read_text()
    block = re.search(r"<!-- snippet: add-dacl.*?```python\n(.*?)```", text, re.S)
    assert block is not None, "README lost its tested snippet"
    code = block.group(1)
    assert len(code.strip().splitlines()) <= 22
    torch.manual_seed(0)
    scope: dict = {}
    exec(compile(code, str(README), "exec"), scope)
    assert scope["ramp"].value > 0.09  # the schedule reached its end
    assert int(scope["dacl"].bank.count.min()) > 0  # the bank filled
    assert torch.isfinite(scope["loss"])
    out = capsys.readouterr().out  # it says what it did
    assert out.startswith("30 steps: loss ") and "bank entries per class" in out
