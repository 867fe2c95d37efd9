"""What will train: the gradient-flow analysis against autograd, optimizer groups, frozen BatchNorm."""

import random
import warnings

import pytest
import torch
from corpus import CORPUS
from torch import nn

import fxsurgery as fxs
from fxsurgery import Detach, Freeze


def test_a_detach_cut_is_reported_and_left_out_of_the_optimizer(three):
    with pytest.warns(fxs.SurgeryWarning) as caught:
        result = fxs.apply(three, [Detach(before="liner3")], example_inputs=(torch.randn(2, 3),))
    flow = result.gradient_flow
    assert flow.method == "graph"
    assert flow.cut == ["liner1.weight", "liner1.bias", "liner2.weight", "liner2.bias"]
    assert flow.trainable == ["liner3.weight", "liner3.bias"] and flow.frozen == []
    assert [str(w.message) for w in caught] == [
        "4 parameters require grad but every path from them to the outputs crosses a detach, so they never get a gradient "
        "(liner1.weight, liner1.bias, liner2.weight, ...); fix: freeze 'liner1', 'liner2' (Freeze) to save their gradient "
        "memory and optimizer state"]
    assert [id(p) for p in result.trainable_parameters()] == [id(result.module.liner3.weight), id(result.module.liner3.bias)]
    assert "gradient flow: 2 parameters train, 0 frozen, 4 cut off by a detach" in result.summary()


def test_a_cut_backbone_is_one_warning_naming_the_fewest_modules_to_freeze():
    """detach-features after layer3 of a resnet18 cuts 45 parameters: one warning, with the five modules whose
    freezing silences it (was one warning per parameter)."""
    import torchvision
    from conftest import RULES
    with pytest.warns(fxs.SurgeryWarning) as caught:
        result = fxs.apply(torchvision.models.resnet18(), fxs.load_rules(f"{RULES}/detach-features.yaml"),
                           example_inputs=(torch.randn(2, 3, 32, 32),))
    assert len(result.gradient_flow.cut) == 45
    assert [str(w.message) for w in caught] == [
        "45 parameters require grad but every path from them to the outputs crosses a detach, so they never get a gradient "
        "(conv1.weight, bn1.weight, bn1.bias, ...); fix: freeze 'conv1', 'bn1', 'layer1', 'layer2', 'layer3' (Freeze) to "
        "save their gradient memory and optimizer state"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        frozen = fxs.apply(torchvision.models.resnet18(), [*fxs.load_rules(f"{RULES}/detach-features.yaml").rules,
                                                           *(Freeze(m, bn="eval") for m in result.gradient_flow.cut_modules())],
                           example_inputs=(torch.randn(2, 3, 32, 32),))
    assert frozen.gradient_flow.counts() == {"trainable": 17, "frozen": 45, "cut": 0, "unused": 0}


def test_freezing_the_cut_parameters_silences_the_warning(three):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = fxs.apply(three, [Detach(before="liner3"), Freeze("liner1"), Freeze("liner2")], example_inputs=(torch.randn(2, 3),))
    assert result.gradient_flow.counts() == {"trainable": 2, "frozen": 4, "cut": 0, "unused": 0}


def test_param_groups_split_decay_by_identity(resnet18):
    result = fxs.apply(resnet18, [Freeze("*", exclude=["layer4.*", "fc"])], example_inputs=(torch.randn(2, 3, 32, 32),))
    decay, plain = result.param_groups(lr=0.1, weight_decay=0.05)
    m = result.module
    assert (decay["lr"], decay["weight_decay"], plain["weight_decay"]) == (0.1, 0.05, 0.0)
    names = {id(p): n for n, p in m.named_parameters()}
    assert sorted(names[id(p)] for p in decay["params"]) == sorted(
        ["layer4.0.conv1.weight", "layer4.0.conv2.weight", "layer4.0.downsample.0.weight",
         "layer4.1.conv1.weight", "layer4.1.conv2.weight", "fc.weight"])
    assert all(names[id(p)].endswith("bias") or "bn" in names[id(p)] or "downsample.1" in names[id(p)] for p in plain["params"])
    assert len(decay["params"]) + len(plain["params"]) == len(result.trainable_parameters()) == 15 + 2
    torch.optim.AdamW(result.param_groups(lr=1e-3, weight_decay=0.1))  # accepted as given


def test_frozen_batchnorm_stays_on_its_statistics_under_training(resnet18):
    resnet18.train()
    # gradients and optimizer state on the original first: the freeze must not inherit them
    opt = torch.optim.SGD(resnet18.parameters(), lr=0.1, momentum=0.9)
    resnet18(torch.randn(2, 3, 32, 32)).sum().backward()
    opt.step()
    result = fxs.apply(resnet18, [Freeze("*", exclude=["layer4.*", "fc"], bn="eval")],
                       example_inputs=(torch.randn(2, 3, 32, 32),))
    m = result.module
    m.train()
    frozen = {n: t.detach().clone() for n, t in [*m.named_parameters(), *m.named_buffers()]
              if not n.startswith(("layer4.", "fc."))}
    assert m.layer1[0].bn1.weight.grad is None if hasattr(m.layer1, "__getitem__") else m.get_submodule("layer1.0.bn1").weight.grad is None
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9),
                  torch.optim.AdamW(m.parameters(), lr=1e-3, weight_decay=0.1)]
    torch.manual_seed(0)
    for step in range(100):
        opt = optimizers[step % 2]
        opt.zero_grad(set_to_none=False)
        m(torch.randn(2, 3, 32, 32)).square().mean().backward()
        opt.step()
    state = dict([*m.named_parameters(), *m.named_buffers()])
    for name, before in frozen.items():
        assert torch.equal(state[name], before), name
    assert state["layer1.0.bn1.num_batches_tracked"].item() == frozen["layer1.0.bn1.num_batches_tracked"].item()
    assert not torch.equal(state["layer4.0.bn1.running_mean"], resnet18.get_submodule("layer4.0.bn1").running_mean)
    assert not m.get_submodule("layer1.0.bn1").training or True  # the flag says train; the hook decides at call time


def _loss(out):
    leaves = [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor) and t.is_floating_point()]
    return sum(t.float().sum() for t in leaves)


def _called_leaves(model, inputs):
    """Modules with parameters of their own that the forward calls."""
    called, handles = [], []
    for path, m in model.named_modules():
        if path and not list(m.children()) and list(m.parameters(recurse=False)):
            handles.append(m.register_forward_hook(lambda *a, p=path: called.append(p) and None))
    with torch.no_grad():
        model(*inputs)
    for h in handles:
        h.remove()
    return list(dict.fromkeys(called))


def _random_rules(model, inputs, rng):
    leaves = _called_leaves(model, inputs)
    chosen = rng.sample(leaves, min(len(leaves), 3))
    return [Detach(after=chosen[0]), Freeze(chosen[1])] + ([Detach(before=chosen[2])] if len(chosen) > 2 else [])


def cases():
    picked = [c for c in CORPUS if c.family != "torchvision-detection"]  # their outputs are index-selected boxes
    return [pytest.param(c, id=c.name, marks=[pytest.mark.slow] if c.slow else []) for c in picked]


@pytest.mark.parametrize("case", cases())
def test_prediction_agrees_with_autograd(case):
    model = case.build()
    rng = random.Random(case.name)
    rules = _random_rules(model, case.inputs(), rng)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = fxs.apply(model, rules, example_inputs=case.inputs())
    predicted = set(result.gradient_flow.trainable)
    m = result.module
    loss = _loss(m(*case.inputs()))
    if loss.requires_grad:  # the cuts may leave nothing to differentiate
        loss.backward()
    actual = {n for n, p in m.named_parameters() if p.grad is not None}
    assert predicted == actual, (result.gradient_flow.method, sorted(predicted ^ actual)[:5])


def test_a_detach_after_a_block_whose_assert_formats_its_input_shape():
    # each torchvision EncoderBlock asserts on its input with the shape in the message; the
    # message's format node is the block's own, not a second way out of the block
    from torchvision.models.vision_transformer import VisionTransformer
    torch.manual_seed(0)
    model = VisionTransformer(image_size=32, patch_size=16, num_layers=3, num_heads=2, hidden_dim=16, mlp_dim=32).eval()
    x = torch.randn(2, 3, 32, 32)
    with pytest.warns(fxs.SurgeryWarning):
        result = fxs.apply(model, [Detach(after="encoder.layers.encoder_layer_1")], example_inputs=(x,))
    assert torch.equal(result.module(x), model(x))
    cut = result.gradient_flow.cut
    assert "encoder.layers.encoder_layer_0.ln_1.weight" in cut and "conv_proj.weight" in cut
    assert not any(n.startswith("encoder.layers.encoder_layer_2.") for n in cut)
    result.module(x).sum().backward()
    assert result.module.conv_proj.weight.grad is None
    assert result.module.encoder.layers.encoder_layer_2.ln_1.weight.grad is not None


def test_a_parameter_the_forward_never_reads_is_unused_not_cut():
    """A kept class's unused parameter was "cut" with a warning about a detach, in a model without one."""
    class Spare(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin, self.head = nn.Linear(4, 4), nn.Linear(4, 2)
            self.spare = nn.Parameter(torch.zeros(3))

        def forward(self, x):
            return self.head(self.lin(x))

    with warnings.catch_warnings():
        warnings.simplefilter("error")   # no warning about a detach
        result = fxs.apply(Spare(), [fxs.Freeze("lin")], example_inputs=(torch.randn(2, 4),), keep_class=True)
    assert result.gradient_flow.status == {"spare": "unused", "lin.weight": "frozen", "lin.bias": "frozen",
                                           "head.weight": "trainable", "head.bias": "trainable"}
    assert "gradient flow: 2 parameters train, 2 frozen, 0 cut off by a detach, 1 never read by the forward" in result.summary()
    with pytest.warns(fxs.SurgeryWarning):   # a detach does cut: said, as before
        cut = fxs.apply(Spare(), [fxs.Detach(after="lin")], example_inputs=(torch.randn(2, 4),), keep_class=True)
    assert cut.gradient_flow.status == {"spare": "unused", "lin.module.weight": "cut", "lin.module.bias": "cut",
                                        "head.weight": "trainable", "head.bias": "trainable"}
