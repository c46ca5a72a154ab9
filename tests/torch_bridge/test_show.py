"""``python -m reftrace show``: graphs with names, equation counts, saved bytes split by kind."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import reftrace as rt
from reftrace.__main__ import main

ROOT = Path(__file__).resolve().parents[2]


def test_show_prints_named_graphs_counts_and_saved_split(capsys):
    assert main(["show", f"{ROOT}/examples/models.py:mlp", "--input", "4x512", "--partition", "mincut"]) == 0
    out = capsys.readouterr().out
    assert '# input_names: ["0.weight", "0.bias", "2.weight", "2.bias", "3.weight", "3.bias", "args[0]"]' in out
    for title in ("graph", "forward", "backward"):
        assert f"== {title}:" in out
    assert re.search(r"^\s+layer_norm\s+1$", out, re.M)
    # the split adds up, and matches the partition computed here
    torch.manual_seed(0)
    from examples.models import mlp
    p = rt.partition(rt.vjp(rt.trace(mlp(), torch.randn(4, 512))), policy="mincut")
    total = re.search(r"saved for the backward: (\d+) values, ([\d.]+) MiB", out)
    assert int(total[1]) == p.num_saved and float(total[2]) == pytest.approx(p.saved_bytes / 2**20, abs=1e-3)
    parts = [float(m) for m in re.findall(r"values\s+([\d.]+) MiB", out)]
    assert sum(parts) == pytest.approx(float(total[2]), abs=3e-3)
    params = re.search(r"parameters\s+(\d+) values\s+([\d.]+) MiB", out)
    assert float(params[2]) == pytest.approx(p.saved_input_bytes / 2**20, abs=0.01)  # the MLP saves no buffers


def test_show_joint_with_keyword_arguments_in_a_fresh_process():
    pytest.importorskip("transformers")
    result = subprocess.run([sys.executable, "-m", "reftrace", "show", "examples/models.py:gpt2", "--input",
                             "1x8:int64", "--kwarg", "use_cache=False", "--joint", "--no-listing"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "== joint:" in result.stdout and "dot_general" in result.stdout


def test_show_explains_a_bad_target():
    with pytest.raises(rt.ArgumentError, match="has no 'nope'; it defines"):
        main(["show", f"{ROOT}/examples/models.py:nope", "--input", "2x2"])
    with pytest.raises(rt.ArgumentError, match="not FILE.py:NAME"):
        main(["show", "resnet18", "--input", "2x2"])
