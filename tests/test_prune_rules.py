"""Prune as a rule: choosing channels by importance, YAML, refusals and bad rules, saving, transformers."""

import copy
import os

import pytest
import torch
import torchvision
from conftest import RULES, assert_state_equal
from test_prune import Flat
from torch import nn

import fxsurgery as fxs
from fxsurgery import Prune
from fxsurgery.errors import RewriteError, RuleError
from fxsurgery.spec._load import parse_rules


class Mlp(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 3), nn.Linear(3, 2)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def mlp():
    model = Mlp().eval()
    with torch.no_grad():  # neuron 0: l1 4, l2 2; neuron 1: l1 3, l2 3; neuron 2: both large
        model.fc1.weight.copy_(torch.tensor([[1.0, 1, 1, 1], [3, 0, 0, 0], [9, 9, 9, 9]]))
        model.fc1.bias.copy_(torch.tensor([0.5, 0.2, -0.1]))
    return model


@pytest.mark.parametrize("importance, removed", [("l1", 1), ("l2", 0), (lambda m: -m.bias, 0)])
def test_amount_removes_the_least_important(importance, removed):
    model, x = mlp(), torch.randn(5, 4)
    result = fxs.apply(model, [Prune("fc1", amount=0.34, importance=importance)], example_inputs=(x,))
    kept = [i for i in range(3) if i != removed]
    assert torch.equal(result.module.fc1.weight, model.fc1.weight[kept])
    assert torch.equal(result.module.fc2.weight, model.fc2.weight[:, kept])
    shown = {0: "1-2", 1: "0, 2"}[removed]
    assert result.report.entry("fc1.weight").op.startswith(f"dim 0 keeps 2 of 3: [{shown}] by rule 1")


def test_neurons_of_an_mlp_hidden_layer_exact():
    model = mlp()
    result = fxs.apply(model, [Prune("fc1", neurons=[2])], example_inputs=(torch.randn(5, 4),))
    x = torch.randn(7, 4)
    hidden = torch.relu(model.fc1(x))
    hidden[:, 2] = 0
    torch.testing.assert_close(result.module(x), model.fc2(hidden), rtol=0, atol=1e-6)


def test_neurons_on_a_convolution_is_refused():
    with pytest.raises(RewriteError, match=r"neurons= prunes a Linear layer's outputs, and 'conv' is a Conv2d; fix: use channels="):
        fxs.apply(Flat(), [Prune("conv", neurons=[0])], example_inputs=(torch.randn(1, 3, 5, 5),))


def test_a_group_reaching_the_output_is_refused_or_left_alone():
    model, x = Flat().eval(), torch.randn(2, 3, 5, 5)
    with pytest.raises(RewriteError) as err:
        fxs.apply(model, [Prune("fc", channels=[0])], example_inputs=(x,))
    assert str(err.value).endswith("at 'fc': the output channels of 'fc' cannot be removed: node 'fc': its channels reach the "
                                   "model output, whose shape must stay; fix: select another layer, or add optional=True to "
                                   "leave such groups alone")
    result = fxs.apply(model, [Prune(nn.Linear, amount=0.5, optional=True)], example_inputs=(x,))
    assert result.plan.matches[0].skipped == ["fc: node 'fc': its channels reach the model output, whose shape must stay "
                                              "(group left alone)"]
    assert torch.equal(result.module(x), model(x)) and result.report.adapted == []


def test_channel_indices_must_exist_and_leave_one():
    x = torch.randn(1, 3, 5, 5)
    with pytest.raises(RewriteError, match=r"at 'conv': conv has 4 output channels, so channel 4 does not exist; fix: choose"):
        fxs.apply(Flat(), [Prune("conv", channels=[4])], example_inputs=(x,))
    with pytest.raises(RewriteError, match=r"removing all 4 output channels of conv leaves nothing to compute"):
        fxs.apply(Flat(), [Prune("conv", channels=[0, 1, 2, 3])], example_inputs=(x,))


def test_two_layers_of_one_group_must_agree():
    model, x = torchvision.models.resnet18().eval(), torch.randn(1, 3, 32, 32)
    same = fxs.apply(model, [Prune("re:layer1\\.[01]\\.conv2", channels=[5])], example_inputs=(x,))
    assert same.module.layer1.get_submodule("0.conv2").out_channels == 63 and same.module.conv1.out_channels == 63
    with pytest.raises(RewriteError, match=r"'layer1.1.conv2' shares its channels with 'layer1.0.conv2' \(one group\)"):
        fxs.apply(model, [Prune("re:layer1\\.[01]\\.conv2", amount=0.1)], example_inputs=(x,))


@pytest.mark.parametrize("kwargs, message", [
    ({}, "prune needs exactly one of channels=, amount=, neurons= or heads=, got none"),
    ({"channels": [1], "amount": 0.5}, "prune needs exactly one of channels=, amount=, neurons= or heads=, got channels, amount"),
    ({"channels": []}, "prune channels is empty, so nothing would be removed"),
    ({"channels": [1, 1]}, "prune channels names 1 twice; fix: list each index once"),
    ({"channels": [-1]}, "prune channels holds -1, not an index"),
    ({"amount": 1.5}, "prune amount must be a fraction between 0 and 1 (exclusive), got 1.5; fix: e.g. amount=0.5"),
    ({"amount": 0.5, "importance": "l3"}, "prune importance 'l3' is not known; fix: use 'l1', 'l2' or a function"),
])
def test_bad_python_rules(kwargs, message):
    with pytest.raises(RuleError) as err:
        Prune("conv1", **kwargs)
    assert message in str(err.value) and str(err.value).startswith("tests/test_prune_rules.py:")


@pytest.mark.parametrize("body, message", [
    ("- prune: conv1\n    amount: 2\n", "<r>:4: prune amount must be a fraction between 0 and 1 (exclusive), got 2; fix: e.g. 'amount: 0.5'"),
    ("- prune: conv1\n    amount: 0.5\n    importance: l3\n", "<r>:5: prune importance 'l3' is not known; fix: write 'importance: l1' or 'importance: l2'"),
    ("- prune: conv1\n    channels: 3\n", "<r>:4: prune channels must be a list of indices, got 3; fix: e.g. 'channels: [0, 3, 5]'"),
    ("- prune: conv1\n    chanels: [1]\n", "<r>:4: unknown key 'chanels' in 'prune' rule; fix: did you mean 'channels'?"),
])
def test_bad_yaml_rules(body, message):
    with pytest.raises(RuleError) as err:
        parse_rules("fxsurgery: 1\nrules:\n  " + body, "<r>")
    assert str(err.value) == message


def test_yaml_rule_equals_the_python_rule():
    rules = parse_rules("fxsurgery: 1\nrules:\n  - prune: conv\n    channels: [0, 2]\n  - prune: fc\n    neurons: [1]\n    optional: true\n", "<r>")
    assert [str(r) for r in rules] == ["prune conv channels=[0, 2]", "prune fc neurons=[1]"]
    assert rules.rules[0].channels == (0, 2) and rules.rules[1].optional


def test_prune_half_rule_file_on_resnet18():
    model, x = torchvision.models.resnet18().eval(), torch.randn(1, 3, 32, 32)
    result = fxs.apply(model, [f"{RULES}/prune-half.yaml"], example_inputs=(x,))
    widths = [(c.in_channels, c.out_channels) for n, c in result.module.named_modules() if n.endswith(".conv1") and "layer" in n]
    assert widths == [(64, 32), (64, 32), (64, 64), (128, 64), (128, 128), (256, 128), (256, 256), (512, 256)]
    # each block: conv1 loses C/2 filters over its inputs, bn1 2 x C/2, conv2 C x C/2 inputs (3x3 kernels)
    blocks = [(64, 64), (64, 64), (64, 128), (128, 128), (128, 256), (256, 256), (256, 512), (512, 512)]
    lost = sum(c // 2 * cin * 9 + c + c * (c // 2) * 9 for cin, c in blocks)
    assert sum(p.numel() for p in model.parameters()) - sum(p.numel() for p in result.module.parameters()) == lost
    assert len(result.report.adapted) == 8 * 6 and not result.report.dropped and not result.report.new


def test_saved_pruned_model_loads_with_the_same_outputs(tmp_path):
    model, x = Flat().eval(), torch.randn(2, 3, 5, 5)
    result = fxs.apply(model, [Prune("conv", channels=[1])], example_inputs=(x,))
    result.save(tmp_path / "out")
    loaded = fxs.load(tmp_path / "out")
    assert torch.equal(loaded(x), result.module(x)) and loaded.fc.in_features == 75


def test_kept_class_is_refused():
    model, x = Flat().eval(), torch.randn(2, 3, 5, 5)
    with pytest.raises(RewriteError, match=r"'conv' is called by opaque code \(kept class\), so the layers its channels reach are "
                                           r"not known; fix: pass keep_class=False \(--no-keep-class\)"):
        fxs.apply(model, [Prune("conv", channels=[1])], example_inputs=(x,), keep_class=True)


def test_bert_intermediate_neurons_exact():
    from corpus import CORPUS
    case = next(c for c in CORPUS if c.name == "hf/bert")
    model, inputs = case.build().eval(), case.inputs()
    path = "encoder.layer.0.intermediate.dense"
    result = fxs.apply(model, [Prune(path, neurons=[0, 5])], example_inputs=inputs, keep_class=False)
    reference = copy.deepcopy(model)
    with torch.no_grad():  # GELU(0) = 0: zeroing the rows and biases of the two neurons zeroes them
        reference.get_submodule(path).weight[[0, 5]] = 0
        reference.get_submodule(path).bias[[0, 5]] = 0
        got, want = result.module(*inputs), reference(*inputs)
    torch.testing.assert_close(got.last_hidden_state, want.last_hidden_state, rtol=0, atol=1e-5)
    assert result.module.get_submodule("encoder.layer.0.output.dense").in_features == model.config.intermediate_size - 2


def test_two_prune_rules_on_one_layer_compose_their_kept_indices():
    torch.manual_seed(0)
    model, x = torchvision.models.resnet18().eval(), torch.randn(1, 3, 32, 32)
    result = fxs.apply(model, [Prune("layer3.1.conv2", channels=[0, 2]), Prune("layer4.0.conv1", channels=[1])], example_inputs=(x,))
    # layer4.0.conv1 loses input channels 0 and 2 (rule 1: layer3's residual stream) and output channel 1 (rule 2)
    want = model.layer4[0].conv1.weight[[0] + list(range(2, 512))][:, [1] + list(range(3, 256))]
    assert torch.equal(result.module.get_submodule("layer4.0.conv1").weight, want)
    assert result.report.entry("layer4.0.conv1.weight").op.startswith(
        "dim 0 keeps 511 of 512: [0, 2-511]; dim 1 keeps 254 of 256: [1, 3-255] by rule 2")


def test_prune_by_amount_ranks_the_checkpoints_values_not_the_models(tmp_path):
    """weights= gives the original's values: Prune by amount ranked the model's own (random) channels, or failed on a
    model built without weights ("item() on meta tensors"). It ranks the checkpoint's now, as pruning the loaded model."""
    from safetensors.torch import save_file
    rules = fxs.load_rules(os.path.join(RULES, "prune-half.yaml"))
    torch.manual_seed(0)
    trained = torchvision.models.resnet18(num_classes=10).eval()
    save_file({k: v.contiguous() for k, v in trained.state_dict().items()}, str(tmp_path / "w.safetensors"))
    x = torch.randn(2, 3, 64, 64)
    loaded = fxs.apply(trained, rules, example_inputs=(x[:1],))
    torch.manual_seed(5)
    own = torchvision.models.resnet18(num_classes=10).eval()
    with fxs.empty_weights():
        empty = torchvision.models.resnet18(num_classes=10).eval()
    for model in (own, empty):
        result = fxs.apply(model, rules, example_inputs=(x[:1],), weights=str(tmp_path / "w.safetensors"))
        assert result.report.entry("layer1.0.conv1.weight").op == loaded.report.entry("layer1.0.conv1.weight").op
        assert_state_equal(result.module, loaded.module.state_dict())
    assert all(p.is_meta for p in empty.parameters())  # the model given is left as it is
    with pytest.raises(fxs.RuleError) as err:
        fxs.apply(empty, rules, example_inputs=(x[:1],), weights=str(tmp_path / "w.safetensors"), stream=True)
    assert str(err.value) == (f"{rules.rules[0].origin}: 'prune re:layer\\d\\.\\d+\\.conv1 amount=0.5 (l1)' ranks channels by their "
                              "values, which a streamed surgery reads only when it writes them; fix: give the channels to remove "
                              "(channels=[...]), or apply without stream")
