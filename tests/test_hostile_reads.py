"""Files fxsurgery reads that someone else may have put there, and names a rule gives: each is refused in one
line, never read whole, never waited on.

A FIFO named *.index.json given to --weights hung apply and map-weights; a sparse 3 GB one, or a graph.json of
that size in a saved directory, was read whole into memory; a FIFO as the marker of a temporary directory beside
the output (a shared /tmp) hung every apply writing there; an insert named under a layer the graph calls whole
looped for ever, and one named like a module the model has was renamed without a word."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torchvision
from conftest import ROOT
from torch import nn

import fxsurgery as fxs
from fxsurgery import Freeze, Insert

X = (torch.zeros(1, 8),)
_APPLY = ("import sys, torch, fxsurgery as fxs\nfrom torch import nn\n"
          "with fxs.empty_weights():\n    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))\n"
          "try:\n    fxs.apply(model, [fxs.Freeze('0')], (torch.zeros(1, 8),), weights=sys.argv[1])\n"
          "except fxs.ModelError as exc:\n    print(exc)\n")


def _hostile(path, kind: str) -> None:
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "dev-zero":
        os.symlink("/dev/zero", path)
    else:
        with open(path, "wb") as handle:
            handle.truncate(3 << 30)


@pytest.mark.parametrize("kind, why", [("fifo", "not a regular file"), ("dev-zero", "not a regular file"),
                                       ("sparse", "3,221,225,472 bytes, more than the 256 MB a record holds")])
def test_a_weights_index_that_is_a_fifo_a_device_or_huge_is_refused_unread(tmp_path, kind, why):
    index = tmp_path / "model.safetensors.index.json"
    _hostile(index, kind)
    proc = subprocess.run([sys.executable, "-c", _APPLY, str(index)], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert (proc.returncode, proc.stdout) == (0, f"{index}: not a sharded checkpoint index ({why}); fix: pass the "
                                                 "*.safetensors.index.json written beside the shards\n"), proc.stderr


def test_a_graph_json_that_is_huge_is_refused_unread(tmp_path):
    torch.manual_seed(0)
    out = tmp_path / "o"
    fxs.apply(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)), [Freeze("0")], X).save(out)
    (out / "graph.json").unlink()
    _hostile(out / "graph.json", "sparse")
    with pytest.raises(fxs.SaveError) as err:  # unchecked: the hash is not there to refuse it first
        fxs.load(out, verify=False)
    assert str(err.value) == (f"{out / 'graph.json'}: not valid JSON (3,221,225,472 bytes, more than the 256 MB a record "
                              "holds); fix: write the directory again with save(), "
                              "or read model.py and load with trust_code=True (--trust-code) if you trust it")


@pytest.mark.parametrize("kind", ["fifo", "dev-zero"])
def test_a_hostile_marker_beside_the_output_is_left_alone_unread(tmp_path, kind):
    planted = tmp_path / ".out.fxsurgery-tmp-0123456789abcdef"
    planted.mkdir()
    _hostile(planted / ".fxsurgery-partial", kind)
    script = ("import sys, torch, fxsurgery as fxs\nfrom torch import nn\ntorch.manual_seed(0)\n"
              "model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))\n"
              "fxs.apply(model, [fxs.Freeze('0')], (torch.zeros(1, 8),)).save(sys.argv[1])\nprint('saved')\n")
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path / "out")], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert (proc.returncode, proc.stdout) == (0, "saved\n"), proc.stderr
    assert sorted(os.listdir(tmp_path)) == [".out.fxsurgery-tmp-0123456789abcdef", "out"]
    assert os.listdir(planted) == [".fxsurgery-partial"]  # not the package's: not removed either
    assert fxs.load(tmp_path / "out")(X[0]).shape == (1, 4)


LEAF, TAKEN = "fxs.apply(model, [Insert(nn.Identity(), after=\"fc\"", "fxs.apply(model, [Insert(nn.Identity(), after=\"relu\""


def _line(text: str) -> int:
    return next(i for i, line in enumerate(open(__file__), start=1) if text in line)


def test_an_insert_named_inside_a_called_layer_or_like_a_module_of_the_model_is_refused():
    model = torchvision.models.resnet18(num_classes=4).eval()
    x = (torch.randn(1, 3, 32, 32),)
    with pytest.raises(fxs.RewriteError) as err:  # it looped for ever: no `fc.extra_1` is free either
        fxs.apply(model, [Insert(nn.Identity(), after="fc", name="fc.extra")], x)
    assert str(err.value) == (f"rule 1 'insert Identity() after fc' (tests/test_hostile_reads.py:{_line(LEAF)}) at 'fc': insert name 'fc.extra' puts "
                              "the new layer inside 'fc', a layer the graph calls whole; fix: name it beside that layer, e.g. 'fc_extra'")
    with pytest.raises(fxs.RewriteError) as err:  # it became relu_1... as `fc_1`, and `fc` stayed the old head
        fxs.apply(model, [Insert(nn.Identity(), after="relu", name="fc")], x)
    assert str(err.value) == (f"rule 1 'insert Identity() after relu' (tests/test_hostile_reads.py:{_line(TAKEN)}) at 'relu': insert name 'fc' names a "
                              "module already there ('fc'); fix: choose a name no module has")
    # a name under a block the graph traces through is free, and a layer called at two places gets name, name_1
    result = fxs.apply(model, [Insert(nn.Identity(), after="layer4.0.relu", name="layer4.extra")], x)
    assert [p for p, _ in result.module.named_modules() if "extra" in p] == ["layer4.extra", "layer4.extra_1"]
    assert torch.equal(result.module(x[0]), model(x[0]))
