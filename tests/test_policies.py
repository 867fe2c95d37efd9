"""Weight policies on Replace: keep, slice, select, pad, adapt_input_channels, each with exact values."""

import pytest
import torch
from torch import nn

import fxsurgery as fxs
from fxsurgery import Replace

X = (torch.randn(2, 3, 32, 32),)


def head(out, weights):
    return Replace("fc", fxs.new(nn.Linear, out_features=out), weights=weights)


def test_slice_keeps_the_leading_rows_bitwise(resnet18):
    result = fxs.apply(resnet18, [head(10, "slice")], example_inputs=X)
    assert torch.equal(result.module.fc.weight, resnet18.fc.weight[:10])
    assert torch.equal(result.module.fc.bias, resnet18.fc.bias[:10])
    entry = result.report.entry("fc.weight")
    assert (entry.status, entry.source) == ("adapted", "fc.weight")
    assert entry.op.startswith("slice [1000, 512] -> [10, 512] by rule 1 'replace fc with Linear(out_features=10)'")
    assert result.report.new == [] and result.report.dropped == []


def test_select_keeps_the_chosen_classes_exactly(resnet18):
    resnet18.eval()
    classes = [3, 7, 999]
    result = fxs.apply(resnet18, [head(3, {"select": classes})], example_inputs=X)
    m = result.module.eval()
    assert torch.equal(m.fc.weight, resnet18.fc.weight[classes])
    x = torch.randn(4, 3, 32, 32)
    torch.testing.assert_close(m(x), resnet18(x)[:, classes], rtol=0, atol=1e-6)
    assert result.report.entry("fc.bias").op.startswith("select rows [3, 7, 999] of [1000]")


def test_pad_keeps_the_original_block_in_place(resnet18):
    result = fxs.apply(resnet18, [head(1010, "pad")], example_inputs=X)
    assert torch.equal(result.module.fc.weight[:1000], resnet18.fc.weight)
    assert torch.equal(result.module.fc.bias[:1000], resnet18.fc.bias)
    assert not torch.equal(result.module.fc.weight[1000:], torch.zeros(10, 512))  # initialised, not zeroed
    assert result.report.entry("fc.weight").op.startswith("pad [1000, 512] -> [1010, 512]")


def conv1(channels):
    return Replace("conv1", fxs.new(nn.Conv2d, in_channels=channels, out_channels=64, kernel_size=7, stride=2,
                                    padding=3, bias=False), weights="adapt_input_channels")


def test_adapt_to_one_channel_sees_grey_as_the_original_sees_rgb(resnet18):
    resnet18.eval()
    result = fxs.apply(resnet18, [conv1(1)], example_inputs=X)
    assert [str(c) for c in result.input_changes] == [
        f"x: [2, 3, 32, 32] -> [2, 1, 32, 32] because {result.plan.matches[0].label} replaced conv1 with "
        "Conv2d(1, 64, kernel_size=(7, 7), stride=(2, 2), padding=(3, 3), bias=False)"]
    grey = torch.randn(2, 1, 32, 32)
    torch.testing.assert_close(result.module.eval()(grey), resnet18(grey.repeat(1, 3, 1, 1)), rtol=1e-4, atol=1e-5)
    assert result.report.entry("conv1.weight").op.startswith("adapt input channels 3 -> 1 (sum)")


def test_adapt_to_four_channels_repeats_and_scales(resnet18):
    result = fxs.apply(resnet18, [conv1(4)], example_inputs=X)
    w, original = result.module.conv1.weight, resnet18.conv1.weight
    assert torch.equal(w[:, :3], original * 0.75) and torch.equal(w[:, 3], original[:, 0] * 0.75)
    assert result.report.entry("conv1.weight").op.startswith("adapt input channels 3 -> 4 (repeat, scale 3/4)")


@pytest.mark.parametrize("weights, message", [
    ("slice", "weights 'slice' cannot fill fc.weight [2000, 512]: the replaced module's [1000, 512] is smaller; use weights: pad"),
    ("pad", "weights 'pad' cannot fill fc.weight [10, 512]: the replaced module's [1000, 512] is larger; use weights: slice"),
    # the sizes are what is wrong, not the policy: 'choose another weights policy' sent users elsewhere
    ({"select": [1, 2]}, "weights 'select' cannot fill fc.weight [10, 512]: 2 rows selected for a tensor with 10; fix: select "
                         "10 rows, or build the new layer with 2 (out_features, num_embeddings...)"),
    ({"select": [1, 1000, 2, 3, 4, 5, 6, 7, 8, 9]}, "weights 'select' cannot fill fc.weight [10, 512]: row 1000 selected from a "
                                                    "tensor with 1000; fix: select rows below 1000"),
])
def test_a_policy_that_does_not_fit_says_so(resnet18, weights, message):
    out = 2000 if weights == "slice" else 10
    rule = head(out, weights)
    with pytest.raises(fxs.TransferError) as err:
        fxs.apply(resnet18, [rule], example_inputs=X)
    assert str(err.value).startswith(f"rule 1 '{rule}' ({rule.origin}): {message}")


def test_policies_in_rule_files(tmp_path, resnet18):
    path = tmp_path / "r.yaml"
    path.write_text("fxsurgery: 1\nrules:\n  - replace: fc\n    with: {module: torch.nn.Linear, out_features: 2}\n"
                    "    weights: {select: [5, 1]}\n")
    result = fxs.apply(resnet18, [str(path)], example_inputs=X)
    assert torch.equal(result.module.fc.weight, resnet18.fc.weight[[5, 1]])
