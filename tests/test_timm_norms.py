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


def test_fold_bn_folds_timms_batchnorm_act_layers(tmp_path):
    """fold-bn matched nothing on timm's EfficientNet/MobileNetV3: their BatchNormAct2d was traced into F.batch_norm,
    which no module pattern sees. Called as one module, each folds into its convolution, its activation kept."""
    from conftest import assert_state_equal, state_copy
    from safetensors.torch import load_file, save_file
    from test_patterns import randomise_bn
    torch.manual_seed(0)
    model = randomise_bn(timm.create_model("mobilenetv3_small_050", pretrained=False))
    saved = state_copy(model)
    x = torch.randn(2, 3, 64, 64)
    result = fxs.apply(model, fxs.load_rules("fold-bn"), example_inputs=(x,))
    assert result.plan.matches[0].count == 34
    assert not any(n.target is torch.nn.functional.batch_norm for n in result.module.graph.nodes)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in result.module.modules())
    with torch.no_grad():
        torch.testing.assert_close(result.module(x), model(x), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(result.module.train()(x), model(x), rtol=1e-4, atol=1e-4)  # folded: no batch statistics
    entry = result.report.entry("conv_stem.0.weight")
    assert (entry.status, entry.source) == ("adapted", "conv_stem, bn1")
    assert type(result.module.conv_stem[2]) is type(model.bn1.act)  # the activation, kept
    assert_state_equal(model, saved)
    result.save(tmp_path / "m")
    assert torch.equal(fxs.load(tmp_path / "m").eval()(x), result.module.eval()(x))
    # streamed from a checkpoint into a model built without weights: the same bits, by the fold's recipe
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    with fxs.empty_weights():
        empty = timm.create_model("mobilenetv3_small_050", pretrained=False).eval()
    streamed = fxs.apply(empty, fxs.load_rules("fold-bn"), example_inputs=(x,), weights=str(path), stream=True)
    streamed.save(tmp_path / "s")
    assert (tmp_path / "s" / "model.safetensors").read_bytes() == (tmp_path / "m" / "model.safetensors").read_bytes()
    assert_state_equal(fxs.load(tmp_path / "s"), load_file(tmp_path / "m" / "model.safetensors"))


def test_freezing_only_batchnorms_without_parameters_matches_them():
    """Freeze(nn.BatchNorm2d, exclude=[...], bn='eval') of affine=False layers said 'every selected parameter is
    excluded'; without the exclude it warned that they have no parameters, nothing to freeze."""
    nn = torch.nn
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, affine=False), nn.ReLU(), nn.Conv2d(4, 2, 1), nn.BatchNorm2d(2, affine=False))
    x = torch.randn(2, 3, 8, 8)
    result = fxs.apply(model, [fxs.Freeze(nn.BatchNorm2d, exclude=["4"], bn="eval")], example_inputs=(x,))
    assert (result.plan.matches[0].modules, result.plan.warnings) == (["1"], [])
    before = _stats(result.module)
    result.module.train()(x)
    assert [k for k, v in _stats(result.module).items() if not torch.equal(before[k], v)] == [
        "4.running_mean", "4.running_var", "4.num_batches_tracked"]  # 1 is held
    assert fxs.apply(model, [fxs.Freeze(nn.BatchNorm2d, bn="eval")], example_inputs=(x,)).plan.matches[0].modules == ["1", "4"]
