"""torch.distributed.checkpoint in and out, and models whose parameters are DTensors.

DCP in: a checkpoint written by dcp.save fills a model built on meta, in
memory and streamed, to the same tensors as the surgery of the model itself.
DCP out: `--format dcp` writes model.dcp/, which dcp.load reads back to the
tensors of model.safetensors.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed.checkpoint as dcp
import torchvision
from conftest import tensors_in
from safetensors.torch import load_file

import fxsurgery as fxs
from fxsurgery import Freeze, Replace

X = (torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0)),)
RULES = [Replace("fc", fxs.new(torch.nn.Linear, out_features=4), weights="slice"), Freeze("layer1")]



def test_a_dcp_checkpoint_fills_a_meta_model_as_the_model_itself(tmp_path):
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    dcp.save(model.state_dict(), storage_writer=dcp.FileSystemWriter(str(tmp_path / "ck")), no_dist=True)
    fxs.apply(model, RULES, X).save(tmp_path / "direct")
    want = tensors_in(tmp_path / "direct")
    for stream in (False, True):
        with fxs.empty_weights():
            empty = torchvision.models.resnet18(num_classes=10).eval()
        out = tmp_path / f"stream{stream}"
        fxs.apply(empty, RULES, X, weights=str(tmp_path / "ck"), stream=stream).save(out, max_shard_size="20MB")
        got = tensors_in(out)
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert torch.equal(want["fc.weight"], model.fc.weight[:4])


def test_the_metadata_is_unpickled_once_per_checkpoint_not_once_per_tensor(tmp_path, monkeypatch):
    # dcp.load asks its reader for the metadata at every tensor: 63 reads of a file that grows with ranks x tensors
    from fxsurgery.transfer import _dcp
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    dcp.save(model.state_dict(), storage_writer=dcp.FileSystemWriter(str(tmp_path / "ck")), no_dist=True)
    loads, real = [], _dcp._Unpickler.load
    monkeypatch.setattr(_dcp._Unpickler, "load", lambda self: loads.append(1) or real(self))
    checkpoint = _dcp.DcpCheckpoint(tmp_path / "ck")
    read = {k: checkpoint.tensor(k) for k in checkpoint.meta}
    assert len(loads) == 1 and len(read) == len(model.state_dict()) == 122
    assert all(torch.equal(read[k], v) for k, v in model.state_dict().items())
    assert torch.equal(checkpoint.region("fc.weight", (slice(2, 5),)), model.fc.weight[2:5]) and len(loads) == 1


def test_map_weights_replays_a_surgery_on_a_dcp_checkpoint(tmp_path):
    from conftest import cli
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    fxs.apply(model, RULES, X).save(tmp_path / "o")
    other = torchvision.models.resnet18(num_classes=10).eval()  # another checkpoint of the same architecture
    dcp.save(other.state_dict(), storage_writer=dcp.FileSystemWriter(str(tmp_path / "ck")), no_dist=True)
    code, _, stderr = cli("map-weights", tmp_path / "ck", tmp_path / "o", "-o", tmp_path / "mapped.safetensors")
    assert code == 0, stderr
    mapped = load_file(str(tmp_path / "mapped.safetensors"))
    want = fxs.apply(other, RULES, X).module.state_dict()
    assert mapped.keys() == want.keys() and all(torch.equal(mapped[k], want[k]) for k in want)
    assert torch.equal(mapped["fc.weight"], other.fc.weight[:4])


def test_format_dcp_writes_the_saved_tensors(tmp_path):
    from conftest import RULES as RULE_FILES
    from conftest import cli
    code, _, stderr = cli("apply", "torchvision.models:resnet18", os.path.join(RULE_FILES, "classifier-head.yaml"),
                          "--input", "1x3x64x64", "--format", "dcp", "-o", tmp_path / "o")
    assert code == 0, stderr
    saved = load_file(str(tmp_path / "o" / "model.safetensors"))
    back = {k: torch.empty_like(v) for k, v in saved.items()}
    dcp.load(back, storage_reader=dcp.FileSystemReader(str(tmp_path / "o" / "model.dcp")), no_dist=True)
    assert all(torch.equal(back[k], saved[k]) for k in saved) and len(saved) == 122
    assert "model.dcp" in __import__("json").loads((tmp_path / "o" / "surgery.json").read_text())["files"]


def test_a_model_of_dtensors_is_refused_with_the_route_that_works(tmp_path):
    import torch.distributed as dist
    from torch.distributed.tensor import DeviceMesh, Replicate, distribute_tensor
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU())
        mesh = DeviceMesh("cpu", [0])
        model[0].weight = torch.nn.Parameter(distribute_tensor(model[0].weight.detach(), mesh, [Replicate()]))
        with pytest.raises(fxs.ModelError) as err:
            fxs.apply(model, [Freeze("0")], (torch.randn(1, 4),))
    finally:
        dist.destroy_process_group()
    assert str(err.value) == ("0.weight is a DTensor (a sharded model: fully_shard or tensor parallel); fxsurgery works on the "
                              "whole model; fix: build the model inside fxs.empty_weights() without sharding it, save its weights "
                              "with dcp.save(model.state_dict(), DIR) and apply with weights=DIR (--weights DIR) and stream=True")


def test_selected_rows_of_a_dcp_checkpoint_are_loaded_alone(tmp_path, monkeypatch):
    import torch.distributed.checkpoint.planner_helpers as helpers
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    dcp.save(model.state_dict(), storage_writer=dcp.FileSystemWriter(str(tmp_path / "ck")), no_dist=True)
    rows = [1, 3, 4, 5, 9]
    rules = [Replace("fc", fxs.new(torch.nn.Linear, out_features=5), weights={"select": rows})]
    planned = []
    real = helpers.create_read_items_for_chunk_list
    monkeypatch.setattr(helpers, "create_read_items_for_chunk_list",
                        lambda fqn, md, chunks: planned.append((fqn, [tuple(i.lengths) for i in real(fqn, md, chunks)]))
                        or real(fqn, md, chunks))
    with fxs.empty_weights():
        empty = torchvision.models.resnet18(num_classes=10).eval()
    fxs.apply(empty, rules, X, weights=str(tmp_path / "ck"), stream=True).save(tmp_path / "s")
    # runs of consecutive rows, each a block DCP reads alone: 1, 3-5, 9 of the weight, then of the bias
    # (every other tensor is read whole, when its output shard is written)
    assert [p for p in planned if p[0].startswith("fc.")] == [("fc.weight", [(1, 512)]), ("fc.weight", [(3, 512)]), ("fc.weight", [(1, 512)]),
                       ("fc.bias", [(1,)]), ("fc.bias", [(3,)]), ("fc.bias", [(1,)])]
    got = tensors_in(tmp_path / "s")
    assert torch.equal(got["fc.weight"], model.fc.weight[rows]) and torch.equal(got["fc.bias"], model.fc.bias[rows])
