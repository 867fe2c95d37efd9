"""A saved result runs each mode's code after a load, whatever mode it was saved in.

A kept class saved as model.py and graph.json:
Its save traced the forward once, in the mode the model was in: code that branches on `self.training` (a
train-only term, timm's BatchNormAct2d, DropPath) ran that mode's code in both after a load: an eval call of
a model saved in train mode normalised by the batch's statistics and moved the running ones, silently.
"""

import copy
import json

import pytest
import timm
import torch
import torchvision
from torch import nn

import fxsurgery as fxs


class TrainOnly(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 2)

    def forward(self, x):
        h = self.a(x)
        if self.training:
            h = h + 100.0
        return self.b(h)


def _loads(result, directory):
    result.save(directory)
    return {"graph.json": fxs.load(directory), "model.py": fxs.load(directory, trust_code=True)}


@pytest.mark.parametrize("saved_in", ["train", "eval"])
def test_a_kept_class_runs_each_modes_code_after_a_load(tmp_path, saved_in):
    torch.manual_seed(0)
    model = TrainOnly().train(saved_in == "train")
    result = fxs.apply(model, [fxs.Freeze("a")], example_inputs=(torch.randn(2, 4),), keep_class=True)
    x = torch.randn(3, 4)
    for form, loaded in _loads(result, tmp_path / "o").items():
        for training in (True, False, True):
            model.train(training)
            loaded.train(training)
            assert torch.equal(loaded(x), model(x)), (form, training)
    assert result.module.training == (saved_in == "train")  # the save put every mode back as it was


def test_timm_batchnorm_act_saved_in_train_mode_runs_in_eval_mode_after_a_load(tmp_path):
    torch.manual_seed(0)
    model = timm.create_model("mobilenetv3_small_050", pretrained=False, num_classes=7)  # timm models start in train mode
    result = fxs.apply(model, [fxs.Replace("classifier", fxs.new(nn.Linear, out_features=3))],
                       example_inputs=(torch.randn(2, 3, 64, 64),), keep_class=True)
    kept = result.module
    x = torch.randn(4, 3, 64, 64)
    for form, loaded in _loads(result, tmp_path / "o").items():
        kept.eval()
        loaded.eval()
        before = loaded.state_dict()["bn1.running_mean"].clone()
        out = loaded(x)
        assert torch.equal(out, kept(x)), form
        # eval BatchNorm: each sample alone (a batch's statistics moved it by up to 0.12); a batch of 1 convolves in another order
        assert torch.allclose(loaded(x[:1]), out[:1], atol=1e-6, rtol=0), form
        assert torch.equal(loaded.state_dict()["bn1.running_mean"], before), form
        state = {k: v.clone() for k, v in kept.state_dict().items()}
        kept.train()
        loaded.train()
        assert torch.equal(loaded(x), kept(x)), form  # train mode: the batch's statistics, as the kept class
        assert torch.equal(loaded.state_dict()["bn1.running_mean"], kept.state_dict()["bn1.running_mean"]), form
        kept.load_state_dict(state)


def test_timm_drop_path_drops_in_train_mode_only_after_a_load(tmp_path):
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2,
                              num_classes=5, drop_path_rate=0.5)
    result = fxs.apply(model, [fxs.Freeze("patch_embed")], example_inputs=(torch.randn(2, 3, 32, 32),), keep_class=True)
    x = torch.randn(8, 3, 32, 32)
    for form, loaded in _loads(result, tmp_path / "o").items():
        result.module.eval()
        assert torch.equal(loaded.eval()(x), result.module(x)), form
        result.module.train()
        loaded.train()
        for seed in range(3):
            torch.manual_seed(seed)
            expected = result.module(x)
            torch.manual_seed(seed)
            assert torch.equal(loaded(x), expected), (form, seed)


def test_torchvision_stochastic_depth_saves_and_drops_in_train_mode_only(tmp_path):
    """model.py calls torchvision's fx-wrapped stochastic_depth by another name, which the save's re-trace went
    into (`if not training` on a graph value): every EfficientNet, ConvNeXt and Swin failed to save."""
    torch.manual_seed(0)
    model = torchvision.models.efficientnet_b0(num_classes=10, stochastic_depth_prob=0.5).eval()
    result = fxs.apply(model, [fxs.Freeze("features.0")], example_inputs=(torch.randn(2, 3, 64, 64),))
    x = torch.randn(4, 3, 64, 64)
    original = model
    for form, loaded in _loads(result, tmp_path / "o").items():
        assert "stochastic_depth" in (tmp_path / "o" / "model.py").read_text()
        model = copy.deepcopy(original)  # train-mode calls move its BatchNorm statistics, as the loaded model's
        model.eval()
        assert torch.equal(loaded.eval()(x), model(x)), form
        model.train()
        loaded.train()
        for seed in range(2):
            torch.manual_seed(seed)
            expected = model(x)
            torch.manual_seed(seed)
            assert torch.equal(loaded(x), expected), (form, seed)


def test_swin_loads_from_graph_json_with_torchvisions_leaf_functions(tmp_path):
    """Swin's graph calls functions torchvision declares torch.fx leaves (`_get_relative_position_bias`,
    `shifted_window_attention`): graph.json names them, and a load without trust_code now builds them."""
    from torchvision.models.swin_transformer import SwinTransformer
    torch.manual_seed(0)
    model = SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[1, 1], num_heads=[1, 2], window_size=[4, 4],
                            stochastic_depth_prob=0.2, num_classes=10).eval()
    result = fxs.apply(model, [fxs.Freeze("features.0")], example_inputs=(torch.randn(2, 3, 32, 32),))
    x = torch.randn(3, 3, 32, 32)
    loaded = _loads(result, tmp_path / "o")["graph.json"]
    assert torch.equal(loaded(x), model(x))
    targets = {n.target.__name__ for n in loaded.graph.nodes if n.op == "call_function" and "torchvision" in n.target.__module__}
    assert targets == {"_get_relative_position_bias", "_patch_merging_pad", "shifted_window_attention", "stochastic_depth"}


@pytest.mark.parametrize("target", ["torchvision.io.write_file", "torchvision.ops.stochastic_depth.torch",
                                    "torchvision.models.swin_transformer.SwinTransformer", "torchvision.utils.save_image"])
def test_a_torchvision_function_that_is_no_fx_leaf_is_refused(tmp_path, target):
    from conftest import rehash

    from fxsurgery.errors import bounded
    from fxsurgery.export._graphload import ALLOWED, FIX
    torch.manual_seed(0)
    model = TrainOnly().train()  # its train-mode graph adds 100.0: a call_function node
    fxs.apply(model, [], example_inputs=(torch.randn(2, 4),), modes=False).save(tmp_path / "o")
    doc = json.loads((tmp_path / "o" / "graph.json").read_text())
    node = next(n for n in doc["nodes"] if n["op"] == "call_function")
    node["target"] = target
    (tmp_path / "o" / "graph.json").write_text(json.dumps(doc))
    rehash(tmp_path / "o")
    with pytest.raises(fxs.SaveError) as err:
        fxs.load(tmp_path / "o")
    assert str(err.value) == bounded(f"{tmp_path / 'o' / 'graph.json'}: nodes[{doc['nodes'].index(node)}] {node['name']!r}: "
                                     f"target {target!r} is not allowed (allowed: {ALLOWED}); {FIX}")


def test_a_timm_fx_leaf_function_loads_from_graph_json_when_timm_is_allowed(tmp_path):
    """timm's ViT with dynamic_img_size calls resample_abs_pos_embed, which timm registers with torch.fx.wrap: save wrote
    it, and load refused it even with allow=("timm",), which already admits timm's module classes."""
    timm = pytest.importorskip("timm")
    from fxsurgery.errors import bounded
    from fxsurgery.export._graphload import FIX
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=2, dynamic_img_size=True).eval()
    fxs.apply(model, [fxs.Freeze("patch_embed")], example_inputs=(torch.randn(2, 3, 32, 32),)).save(tmp_path / "o")
    doc = json.loads((tmp_path / "o" / "graph.json").read_text())
    index, node = next((i, n) for i, n in enumerate(doc["nodes"]) if n["target"] == "timm.layers.pos_embed.resample_abs_pos_embed")
    with pytest.raises(fxs.SaveError) as err:
        fxs.load(tmp_path / "o")
    assert str(err.value) == bounded(f"{tmp_path / 'o' / 'graph.json'}: nodes[{index}] {node['name']!r}: target {node['target']!r} is of "
                                     "timm, not allowed; pass allow=('timm',) (--allow-module timm) if you trust it; " + FIX)
    loaded = fxs.load(tmp_path / "o", allow=("timm",))
    for x in (torch.randn(2, 3, 32, 32), torch.randn(3, 3, 48, 64)):  # another size resamples the position embedding
        assert torch.equal(loaded(x), model(x))


@pytest.mark.parametrize("target, allow", [("timm.models.create_model", "timm"), ("os.system", "os"),
                                           ("timm.layers.pos_embed.resample_abs_pos_embed", "torchvision"),
                                           ("bogus", "")])  # allow=("",) imported "": a raw ValueError
def test_an_allowed_package_admits_only_its_fx_leaf_functions(tmp_path, target, allow):
    from conftest import rehash

    from fxsurgery.errors import bounded
    from fxsurgery.export._graphload import ALLOWED, FIX
    pytest.importorskip("timm")
    torch.manual_seed(0)
    fxs.apply(TrainOnly().train(), [], example_inputs=(torch.randn(2, 4),), modes=False).save(tmp_path / "o")
    doc = json.loads((tmp_path / "o" / "graph.json").read_text())
    node = next(n for n in doc["nodes"] if n["op"] == "call_function")
    node["target"] = target
    (tmp_path / "o" / "graph.json").write_text(json.dumps(doc))
    rehash(tmp_path / "o")
    with pytest.raises(fxs.SaveError) as err:
        fxs.load(tmp_path / "o", allow=(allow,))
    told = (f"target {target!r} is of timm, not allowed; pass allow=('timm',) (--allow-module timm) if you trust it"
            if allow == "torchvision" else f"target {target!r} is not allowed (allowed: {ALLOWED})")
    assert str(err.value) == bounded(f"{tmp_path / 'o' / 'graph.json'}: nodes[{doc['nodes'].index(node)}] {node['name']!r}: {told}; {FIX}")
