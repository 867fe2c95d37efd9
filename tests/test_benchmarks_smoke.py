"""The benchmarks still run: one tiny scaling run, its JSON checked for keys and positive numbers.

Benchmarks are not tests (python -m benchmarks.run); this only keeps them
from rotting while the package changes under them.
"""

import json
import os
import subprocess
import sys

import torch

import fxsurgery as fxs
from fxsurgery import Replace

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_quick_scaling_run_writes_positive_figures(tmp_path):
    out = tmp_path / "results"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--quick", "--only", "scaling", "--sizes", "300",
         "--out", str(out), "--no-plot"],
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads((out / "scaling.json").read_text())

    assert data["benchmark"] == "scaling" and data["quick"] is True
    for key in ("cpu", "cores", "torch", "torch_threads"):
        assert data["machine"][key], key
    (row,) = data["sizes"]
    assert row["nodes"] >= 300
    assert set(row["median_s"]) == {"fx_trace", "fxs_module", "fxs_function", "fxs_pattern", "fx_function"}
    for name, stages in row["median_s"].items():
        assert stages["total"] > 0, name
    for stage in ("capture", "match", "rewrite", "validate", "transfer", "swap"):
        assert row["median_s"]["fxs_module"][stage] > 0, stage
    assert row["median_s"]["fx_function"]["replace_pattern"] > 0
    # both sides made the same edit: one GELU per block
    blocks = row["nodes_requested"] // 3
    assert row["replaced"] == {"fxs_module": blocks, "fxs_function": blocks, "fxs_pattern": blocks, "fx_function": blocks}
    # the check script reads it and says the single size cannot give an exponent
    assert "| goal | measured | holds |" in proc.stdout


def test_timed_stages_build_what_apply_builds():
    """benchmarks/recipe.py copies fxs.apply's recipe; the two must give the same module."""
    if ROOT not in sys.path:  # benchmarks/ sits beside the package, not inside it
        sys.path.insert(0, ROOT)
    from benchmarks.recipe import run_stages
    from benchmarks.scaling import ModuleBlock, chain

    model, inputs = chain(ModuleBlock, 30), (torch.randn(2, 8),)
    rules = [Replace(torch.nn.ReLU, torch.nn.GELU())]
    kept = []
    times = run_stages(model, rules, inputs, keep=kept)
    expected = fxs.apply(model, rules, example_inputs=inputs).module
    assert set(times) == {"capture", "match", "rewrite", "validate", "transfer", "check"}
    assert kept[0].code == expected.code
    assert torch.equal(kept[0](*inputs), expected(*inputs))
