"""Weight transfer: every tensor accounted for, values bit-exact, the original untouched."""

import os

import pytest
import torch
import torchvision
from conftest import RULES, assert_state_equal, state_copy
from torch import nn

import fxsurgery as fxs
from fxsurgery import Delete, Freeze, Insert, Replace


def busy_batchnorm(model):
    """Give every BatchNorm non-trivial running statistics."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
                m.num_batches_tracked.fill_(7)
    return model


def test_transfer_between_two_modules_by_name_and_shape():
    torch.manual_seed(0)
    src = busy_batchnorm(torchvision.models.resnet18(weights=None))
    dst = torchvision.models.resnet18(weights=None, num_classes=10)
    report = fxs.transfer(src, dst)
    assert report.new == ["fc.weight", "fc.bias"]
    assert report.dropped == ["fc.weight", "fc.bias"]
    assert len(report.transferred) == 122 - 2 and report.adapted == []
    assert report.entry("fc.weight").op == "source has [1000, 512]"
    s, d = src.state_dict(), dst.state_dict()
    for name in report.transferred:
        assert torch.equal(s[name], d[name]), name
    assert d["bn1.num_batches_tracked"].item() == 7
    with pytest.raises(fxs.TransferError) as err:
        fxs.transfer(src, torchvision.models.resnet18(weights=None, num_classes=10), strict=True)
    assert str(err.value) == "strict: 2 tensors are new and no rule declared them: fc.weight, fc.bias; fix: provide their weights or drop strict"


def test_transfer_reports_casts():
    torch.manual_seed(0)
    src, dst = nn.Linear(3, 2), nn.Linear(3, 2).double()
    report = fxs.transfer(src, dst)
    assert report.adapted == ["weight", "bias"]
    assert report.entry("weight").op == "cast float32 -> float64"
    assert torch.equal(dst.weight, src.weight.double())


def test_every_tensor_is_accounted_for_exactly_once(resnet18):
    busy_batchnorm(resnet18)
    saved = state_copy(resnet18)
    result = fxs.apply(resnet18, [Delete("layer4.1"), Replace("fc", fxs.new(nn.Linear, out_features=5)),
                                  Insert(fxs.new(nn.BatchNorm1d), before="fc"), Freeze("layer1")],
                       example_inputs=(torch.randn(2, 3, 64, 64),))  # BatchNorm1d trains on batches > 1
    report, module = result.report, result.module
    names = [n for n, _ in module.named_parameters()] + [n for n, _ in module.named_buffers()]
    assert sorted(report.transferred + report.adapted + report.new) == sorted(names)
    original = [n for n, _ in resnet18.named_parameters()] + [n for n, _ in resnet18.named_buffers()]
    sources = [e.source for e in report.entries if e.status in ("transferred", "adapted")]
    assert sorted(sources + report.dropped) == sorted(original)
    assert len(report.dropped) == 12 + 2  # layer4.1 (2 convs, 2 BatchNorms of 5 tensors) and the old fc
    assert report.new == ["fc_batch_norm1d.weight", "fc_batch_norm1d.bias", "fc.weight", "fc.bias",
                          "fc_batch_norm1d.running_mean", "fc_batch_norm1d.running_var",
                          "fc_batch_norm1d.num_batches_tracked"]
    assert report.frozen == [n for n, _ in module.named_parameters() if n.startswith("layer1.")]
    state = module.state_dict()
    for e in report.entries:
        if e.status == "transferred":
            assert torch.equal(state[e.name], saved[e.source]), e.name
    assert state["layer3.1.bn2.num_batches_tracked"].item() == 7
    assert_state_equal(resnet18, saved)


def test_result_shares_no_memory_with_the_original(resnet18):
    result = fxs.apply(resnet18, [], example_inputs=(torch.randn(1, 3, 64, 64),))
    ptrs = {t.data_ptr() for t in resnet18.state_dict().values() if t.numel()}
    assert not ptrs & {t.data_ptr() for t in result.module.state_dict().values() if t.numel()}
    with torch.no_grad():
        result.module.conv1.weight.add_(1)
    assert not torch.equal(result.module.conv1.weight, resnet18.conv1.weight)


def test_empty_rule_list_is_the_identity(resnet18):
    busy_batchnorm(resnet18).eval()
    result = fxs.apply(resnet18, [], example_inputs=(torch.randn(1, 3, 64, 64),))
    result.module.eval()
    x = torch.randn(2, 3, 64, 64)
    assert torch.equal(result.module(x), resnet18(x))
    assert result.report.counts() == {"transferred": 122, "adapted": 0, "new": 0, "dropped": 0, "frozen": 0}


def test_shape_propagation_leaves_batchnorm_statistics_alone(resnet18):
    resnet18.train()
    saved = state_copy(resnet18)
    fxs.apply(resnet18, [Freeze("*")], example_inputs=(torch.randn(2, 3, 64, 64),))
    assert_state_equal(resnet18, saved)
    assert resnet18.training and all(p.requires_grad for p in resnet18.parameters())


def test_strict_accepts_tensors_that_rules_declare(resnet18):
    result = fxs.apply(resnet18, [Replace("fc", fxs.new(nn.Linear, out_features=3))],
                       example_inputs=(torch.randn(1, 3, 64, 64),), strict=True)
    assert [e.rule for e in result.report.entries if e.status == "new"] == [1, 1]


def test_a_narrowing_cast_is_refused_unless_allowed():
    torch.manual_seed(0)
    src, dst = nn.Linear(3, 2), nn.Linear(3, 2).to(torch.bfloat16)
    with pytest.raises(fxs.TransferError) as err:
        fxs.transfer(src, dst)
    assert str(err.value) == ("transfer: weight would be cast float32 -> bfloat16, which loses precision; fix: cast "
                              "the destination to the source's dtype first, or pass allow_cast=True")
    report = fxs.transfer(src, dst, allow_cast=True)
    assert report.entry("weight").op == "cast float32 -> bfloat16"
    assert torch.equal(dst.weight, src.weight.to(torch.bfloat16))


def test_a_transfer_that_would_split_a_tie_says_so():
    class Tied(nn.Module):
        def __init__(self, tie):
            super().__init__()
            self.embed, self.head = nn.Embedding(5, 4), nn.Linear(4, 5, bias=False)
            if tie:
                self.head.weight = self.embed.weight

    src = Tied(tie=True)
    with pytest.raises(fxs.TransferError) as err:
        fxs.transfer(src, Tied(tie=False))
    assert str(err.value) == ("transfer: embed.weight, head.weight are one tensor in the source but separate in the "
                              "destination, so the tie would split; fix: tie them in the destination first "
                              "(dst.head.weight = dst.embed.weight), or copy them one by one")
    dst = Tied(tie=True)
    fxs.transfer(src, dst)
    assert dst.head.weight is dst.embed.weight and torch.equal(dst.embed.weight, src.embed.weight)


def test_share_mode_takes_the_original_tensors_and_consumes_the_original(resnet18):
    resnet18.eval()
    x = torch.randn(2, 3, 32, 32)
    original = dict(resnet18.named_parameters())
    result = fxs.apply(resnet18, [Replace("fc", fxs.new(nn.Linear, out_features=3))], example_inputs=(x,), copy=False)
    m = result.module.eval()
    assert m.get_parameter("layer1.0.conv1.weight") is original["layer1.0.conv1.weight"]
    assert result.report.counts()["transferred"] == 120 and result.report.new == ["fc.weight", "fc.bias"]
    with pytest.raises(RuntimeError, match="this model's tensors now belong to the result of a surgery made with copy=False"):
        resnet18(x)
    torch.manual_seed(1)
    other = torchvision.models.resnet18(weights=None).eval()
    want = other(x)
    assert torch.equal(fxs.apply(other, [], example_inputs=(x,), copy=False).module.eval()(x), want)


def _shards(model, folder, parts=3):
    """The model's state dict as a sharded safetensors checkpoint with an index, as Hugging Face writes them."""
    import json

    from safetensors.torch import save_file
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    names = list(state)
    weight_map = {}
    for i in range(parts):
        chunk = names[i::parts]
        file = f"model-{i + 1:05d}-of-{parts:05d}.safetensors"
        save_file({k: state[k] for k in chunk}, str(folder / file))
        weight_map.update({k: file for k in chunk})
    index = folder / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return index


def test_streaming_weights_into_a_model_built_without_them(resnet18, tmp_path):
    resnet18.eval()
    index = _shards(resnet18, tmp_path)
    rules = [Replace("fc", fxs.new(nn.Linear, out_features=4)), Freeze("layer1")]
    with fxs.empty_weights():
        empty = torchvision.models.resnet18(weights=None).eval()
    assert all(p.is_meta for p in empty.parameters()) and not any(b.is_meta for b in empty.buffers())
    torch.manual_seed(3)
    streamed = fxs.apply(empty, rules, example_inputs=(torch.randn(1, 3, 32, 32),), weights=str(index)).module.eval()
    torch.manual_seed(3)
    direct = fxs.apply(resnet18, rules, example_inputs=(torch.randn(1, 3, 32, 32),)).module.eval()
    a, b = streamed.state_dict(), direct.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not any(p.is_meta for p in streamed.parameters())


def test_cli_streams_a_sharded_checkpoint(resnet18, tmp_path):
    from conftest import cli
    index = _shards(resnet18, tmp_path, parts=2)
    out = tmp_path / "o"
    code, stdout, stderr = cli("apply", "torchvision.models:resnet18", os.path.join(RULES, "classifier-head.yaml"),
                               "--input", "1x3x64x64", "--weights", index, "-o", out)
    assert code == 0, stderr
    loaded = fxs.load(out)
    assert torch.equal(loaded.get_submodule("layer1.0.conv1").weight, resnet18.layer1[0].conv1.weight)
