"""timm's BatchNormAct2d is traced into F.batch_norm: Freeze(bn="eval") must hold those calls too."""

import pytest
import torch

import fxsurgery as fxs

timm = pytest.importorskip("timm")


def _stats(module):
    return {k: v.clone() for k, v in module.state_dict().items() if "running" in k or "num_batches" in k}


@pytest.mark.parametrize("name", ["efficientnet_b0", "mobilenetv3_small_050"])
def test_linear_probe_holds_the_batchnorms_a_graph_traced_into(name, tmp_path):
    """147 running statistics of efficientnet_b0 moved under .train() although linear-probe says they never move,
    and train-mode outputs differed from eval-mode ones by 0.45."""
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=10)   # in train mode, as timm makes it
    x = torch.randn(2, 3, 64, 64)
    result = fxs.apply(model, fxs.load_rules("linear-probe", params={"head": "classifier", "num_classes": 4}), example_inputs=(x,))
    result.save(tmp_path / "o")
    for module in (result.module, fxs.load(tmp_path / "o")):
        before = _stats(module)
        module.train()
        y = torch.randn(4, 3, 64, 64)
        trained = module(y)
        after = _stats(module)
        assert all(torch.equal(before[k], after[k]) for k in before), [k for k in before if not torch.equal(before[k], after[k])][:3]
        assert torch.equal(trained, module.eval()(y))
    moving = fxs.apply(model, [fxs.Freeze("*", exclude=["classifier"])], example_inputs=(x,)).module.train()  # bn not held: moves
    before = _stats(moving)
    moving(torch.randn(4, 3, 64, 64))
    assert sum(not torch.equal(before[k], v) for k, v in _stats(moving).items()) == len(before)


def test_freezing_batchnorm_layers_whose_statistics_still_move_warns():
    """Freeze('*', exclude=[head]) then three training steps moved 60 of resnet18's 60 running-stat buffers."""
    import warnings

    import torchvision

    def said(model, rule):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = fxs.apply(model, [rule], example_inputs=(torch.randn(2, 3, 32, 32),))
        return result, [str(w.message) for w in caught if "BatchNorm" in str(w.message)]

    result, warned = said(torchvision.models.resnet18(), fxs.Freeze("*", exclude=["fc"]))
    assert warned == [f"{result.plan.matches[0].label} freezes 20 BatchNorm layers (bn1, layer1.0.bn1 and 18 more), whose "
                      "running statistics still move under model.train(); fix: bn='eval' (bn: eval in a rule file) holds them, "
                      "unless they should adapt"]
    assert said(torchvision.models.resnet18(), fxs.Freeze("*", exclude=["fc"], bn="eval"))[1] == []
    nn = torch.nn
    untracked = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False), nn.ReLU())
    assert said(untracked, fxs.Freeze("*"))[1] == []  # no statistics to move


def test_bn_eval_holds_batchnorms_without_parameters(tmp_path):
    """A BatchNorm2d(affine=False) has running statistics but no weight: Freeze('*', bn='eval') left it in train mode,
    its statistics moved and train-mode outputs differed from eval-mode ones."""
    nn = torch.nn
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, affine=False), nn.ReLU(), nn.Flatten(), nn.LazyLinear(2))
    x = torch.randn(2, 3, 8, 8)
    model(x)
    result = fxs.apply(model, [fxs.Freeze("*", exclude=["4"], bn="eval")], example_inputs=(x,))
    result.save(tmp_path / "o")
    for module in (result.module, fxs.load(tmp_path / "o")):
        before = _stats(module)
        y = torch.randn(4, 3, 8, 8)
        trained = module.train()(y)
        assert all(torch.equal(before[k], v) for k, v in _stats(module).items())
        assert torch.equal(trained, module.eval()(y))
        assert torch.equal(trained, model.eval()(y))
        model.train()
    with pytest.warns(UserWarning, match=r"freezes 1 BatchNorm layer \(1\), whose running statistics still move"):
        fxs.apply(model, [fxs.Freeze("*", exclude=["4"])], example_inputs=(x,))
