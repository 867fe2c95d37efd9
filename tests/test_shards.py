"""Sharded outputs: above max_shard_size a save writes model-0000k-of-0000n.safetensors + an index.

Every sharded output is compared with the one-file output of the same result:
the same tensors bit for bit, loaded (from graph.json and from model.py) to the
same module; the record hashes each shard; --force and map-weights know shards.
"""

from __future__ import annotations

import hashlib
import json
import os

import pytest
import torch
import torchvision
from conftest import tensors_in
from safetensors.torch import load_file, save_file

import fxsurgery as fxs
from fxsurgery import Freeze, Replace
from fxsurgery.export import parse_size

X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=10).eval()


@pytest.fixture(scope="module")
def result(model):
    return fxs.apply(model, [Replace("fc", fxs.new(torch.nn.Linear, out_features=4)), Freeze("layer1")],
                     example_inputs=(X[:1],))



def test_sizes_parse_as_transformers_writes_them():
    assert [parse_size(v) for v in (123, "5GB", "500MB", "2GiB", "1.5GB", "10KB", "7")] == \
        [123, 5 * 10**9, 500 * 10**6, 2 * 2**30, 1_500_000_000, 10_000, 7]
    for bad in ("5XB", "", "-1GB", 0, True, "0.5", "0.9B"):
        with pytest.raises(fxs.SaveError) as err:
            parse_size(bad)
        assert str(err.value) == f"max_shard_size {bad!r}: not a size; fix: give bytes as an int, or e.g. '5GB', '500MB', '2GiB'"


def test_sharded_save_holds_the_one_file_tensors_and_loads_the_same(result, model, tmp_path):
    one, many = tmp_path / "one", tmp_path / "many"
    result.save(one)
    result.save(many, max_shard_size="10MB")
    state = load_file(str(one / "model.safetensors"))
    sizes = [t.numel() * t.element_size() for t in state.values()]
    # 11,178,564 parameters (resnet18 with a 4-class head) and 2 x 4800 BatchNorm statistics in float32,
    # 20 int64 batch counters: 44.75 MB, 5 shards of 10 MB filled in the save's order
    assert sum(sizes) == (11_178_564 + 2 * 4800) * 4 + 20 * 8 == 44_752_816
    files = sorted(f for f in os.listdir(many) if f.endswith(".safetensors"))
    assert files == [f"model-{k:05d}-of-00005.safetensors" for k in range(1, 6)]
    assert not (many / "model.safetensors").exists()
    index = json.loads((many / "model.safetensors.index.json").read_text())
    assert index["metadata"] == {"total_size": 44_752_816}
    assert sorted(index["weight_map"]) == sorted(state) and set(index["weight_map"].values()) == set(files)
    assert all(10_000_000 >= os.path.getsize(many / f) - 20_000 for f in files)  # each shard within the limit (+ header)
    sharded = tensors_in(many)
    assert sharded.keys() == state.keys() and all(torch.equal(sharded[k], state[k]) for k in state)
    record = json.loads((many / "surgery.json").read_text())
    assert record["shards"] == {f: "sha256:" + hashlib.sha256((many / f).read_bytes()).hexdigest() for f in files}
    assert sorted(record["files"]) == sorted(["graph.json", "model.py", "model.safetensors.index.json", "surgery.json", *files])
    want = result.module.eval()(X)
    for loaded in (fxs.load(many), fxs.load(many, trust_code=True)):
        assert torch.equal(loaded.eval()(X), want)
        assert [n for n, p in loaded.named_parameters() if not p.requires_grad] == \
               [n for n, p in fxs.load(one).named_parameters() if not p.requires_grad]


def test_a_damaged_shard_is_refused(result, tmp_path):
    out = tmp_path / "o"
    result.save(out, max_shard_size=20_000_000)
    shard = out / "model-00002-of-00003.safetensors"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 1
    shard.write_bytes(bytes(data))
    with pytest.raises(fxs.SaveError) as err:
        fxs.load(out)
    assert str(err.value) == (f"{out}: model-00002-of-00003.safetensors changed since it was written (hash mismatch); "
                              "fix: write the directory again with save()")


@pytest.mark.parametrize("kind", ["device", "fifo", "missing"])
def test_a_shard_that_is_no_regular_file_is_refused_before_it_is_read(result, tmp_path, kind):
    out = tmp_path / "o"
    result.save(out, max_shard_size=20_000_000)
    shard = out / "model-00002-of-00003.safetensors"
    shard.unlink()
    if kind == "device":
        shard.symlink_to("/dev/zero")  # the hash would read it forever
    elif kind == "fifo":
        os.mkfifo(shard)
    with pytest.raises(fxs.SaveError) as err:
        fxs.load(out)
    what = {"device": "is a link to /dev/zero, not a regular file", "fifo": "is not a regular file"}.get(kind)
    assert str(err.value) == (f"{shard}: {what}; fix: put the file itself there, or write "
                              "the directory again with save()" if what else
                              f"{shard}: missing or not a regular file; fix: write the directory again with save()")


def test_force_replaces_shards_with_one_file_and_back(result, tmp_path):
    out = tmp_path / "o"
    result.save(out, max_shard_size="10MB")
    result.save(out, force=True)
    assert sorted(os.listdir(out)) == ["graph.json", "model.py", "model.safetensors", "surgery.json"]
    result.save(out, force=True, max_shard_size="25MB")  # layer4's 9.4 MB convolutions do not pack into two
    assert sorted(os.listdir(out)) == ["graph.json", *[f"model-0000{k}-of-00003.safetensors" for k in (1, 2, 3)],
                                       "model.py", "model.safetensors.index.json", "surgery.json"]
    (out / "model-00003-of-00003.safetensors").rename(out / "model-00003-of-00004.safetensors")
    with pytest.raises(fxs.SaveError) as err:
        result.save(out, force=True)
    assert str(err.value) == (f"{out}: holds files fxsurgery did not write (model-00003-of-00004.safetensors), refusing to replace it; "
                              "fix: move them out of the directory or choose another output directory")


def test_cli_writes_shards_and_map_weights_reads_a_sharded_checkpoint(model, tmp_path):
    from conftest import RULES, cli
    out = tmp_path / "o"
    code, stdout, stderr = cli("apply", "torchvision.models:resnet18", os.path.join(RULES, "classifier-head.yaml"),
                               "--input", "1x3x64x64", "-o", out, "--max-shard-size", "20MB")
    assert code == 0, stderr
    assert "model-00003-of-00003.safetensors" in stdout and "model.safetensors.index.json" in stdout
    code, _, stderr = cli("apply", "torchvision.models:resnet18", os.path.join(RULES, "classifier-head.yaml"),
                          "-o", tmp_path / "p", "--max-shard-size", "2 parsecs")
    assert (code, stderr) == (2, "fxsurgery: error: --max-shard-size '2 parsecs': not a size; fix: give bytes as an int, "
                                 "or e.g. '5GB', '500MB', '2GiB'\n")
    assert not (tmp_path / "p").exists()
    # the same checkpoint, as one file and as three shards with an index: the same mapped weights
    original = torchvision.models.resnet18().eval()
    state = {k: v.contiguous() for k, v in original.state_dict().items()}
    save_file(state, str(tmp_path / "one.safetensors"))
    names = list(state)
    weight_map = {}
    for k in range(3):
        file = f"model-{k + 1:05d}-of-00003.safetensors"
        save_file({n: state[n] for n in names[k::3]}, str(tmp_path / file))
        weight_map.update({n: file for n in names[k::3]})
    (tmp_path / "ck.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    for source, target in (("one.safetensors", "a.safetensors"), ("ck.index.json", "b.safetensors")):
        code, _, stderr = cli("map-weights", tmp_path / source, out, "-o", tmp_path / target)
        assert code == 0, stderr
    a, b = load_file(str(tmp_path / "a.safetensors")), load_file(str(tmp_path / "b.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(a["layer1.0.conv1.weight"], original.layer1[0].conv1.weight)
    loaded = fxs.load(out)
    loaded.load_state_dict(b, strict=True)
