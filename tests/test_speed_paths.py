"""The shortcuts that make the pipeline fast give what the slow paths give.

Shape passes make some outputs without running the op (capture/_shortcuts.py),
module trees are copied without the pickle protocol (capture/_copying.py),
cyclic garbage collection waits for the surgery to end (pipeline.py). Each is
checked against the path it replaces, and `apply --profile` against its own sums.
"""

import gc
import json
import os
import types

import pytest
import torch
import torch.nn.functional as F
import torchvision
from conftest import RULES, cli
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import fx, nn

import fxsurgery as fxs
from fxsurgery.capture import _shapes, _shortcuts, clone, propagate
from fxsurgery.capture._copying import share


def _slow_paths(monkeypatch):
    monkeypatch.setattr(_shortcuts, "_linear", lambda module, x: None)
    monkeypatch.setattr(_shortcuts, "_same_shape_norm", lambda module, x: None)
    monkeypatch.setattr(_shortcuts, "_same_shape_op", lambda args, kwargs: None)
    monkeypatch.setattr(_shortcuts, "_layer_norm", lambda module, x: None)
    monkeypatch.setattr(_shortcuts, "_self_attention", lambda module, args, kwargs: None)
    monkeypatch.setattr(_shortcuts, "_SAME_SHAPE_MODULES", set())
    monkeypatch.setattr(_shortcuts, "_convolution", lambda module, x: None)
    monkeypatch.setattr(_shortcuts, "_adaptive_pool", lambda x, size, n: None)
    monkeypatch.setattr(_shortcuts, "_cat", lambda *args, **kwargs: None)
    monkeypatch.setattr(_shortcuts, "_broadcast", lambda a, b: None)


class Blocks(nn.Module):
    """The module shortcuts: activations, dropout, LayerNorm, self-attention both layouts, and calls that must run."""

    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(8)
        self.norm2 = nn.LayerNorm([4, 8], elementwise_affine=False)
        self.first = nn.MultiheadAttention(8, 2, batch_first=True)
        self.second = nn.MultiheadAttention(8, 2)
        self.acts = nn.Sequential(nn.GELU(approximate="tanh"), nn.SiLU(), nn.Dropout(0.1), nn.Hardswish(), nn.LeakyReLU(0.2))

    def forward(self, x):
        h = self.acts(self.norm(x))
        a, w = self.first(h, h, h)                                   # weights averaged
        b, _ = self.second(a, a, a, need_weights=False)              # (L, N, E) layout
        c, w2 = self.first(h, h, h, average_attn_weights=False)      # weights per head
        d, _ = self.first(h, a, a)                                   # not self-attention: runs
        e = self.norm2(x.transpose(0, 1).contiguous().transpose(0, 1))  # strided input
        return b.view(-1), a.reshape(-1), w.sum(), c + d, w2, e


class Mixed(nn.Module):
    """Each shortcut, and inputs that must not take it (broadcasting, integer dtype, other dtype)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(6, 6)
        self.bn = nn.BatchNorm1d(6)
        self.to_half = nn.Linear(6, 3).half()

    def forward(self, x, ids):
        h = self.bn(self.lin(x))
        h = F.gelu(h) + torch.sigmoid(h) * 2 - h.relu() / 3.0
        h = h + torch.ones(6)              # broadcasting: runs the op
        n = ids + 1                        # integers: runs the op
        return self.to_half(h.half()), n.mul(2), torch.tanh(x.double())


class Convolutions(nn.Module):
    """Convolutions, pools, concatenations and broadcasting ops, each of a kind a shortcut takes and of one it leaves."""

    def __init__(self):
        super().__init__()
        self.same = nn.Conv2d(3, 4, 3, padding="same", dilation=2)
        self.valid = nn.Conv2d(4, 6, (3, 2), stride=(2, 1), padding="valid", groups=2)
        self.reflect = nn.Conv2d(3, 3, 3, padding=1, padding_mode="reflect")   # runs
        self.one = nn.Conv1d(6, 2, 3, stride=2, padding=1)
        self.three = nn.Conv3d(1, 2, 2)
        self.pool = nn.AdaptiveAvgPool2d((1, None))
        self.pool1 = nn.AdaptiveAvgPool1d(2)

    def forward(self, x):
        a = self.valid(self.same(x))                       # (2, 6, 4, 8)
        b = self.one(a.flatten(2))                         # (2, 2, 16)
        c = self.three(x.unsqueeze(1))
        d = self.reflect(x.transpose(2, 3))                # a strided input: runs
        e = torch.cat([a, a * a.mean((2, 3), keepdim=True)], dim=1)
        f = torch.cat((a, a), -1) + F.adaptive_avg_pool2d(a, 2).mean()
        g = self.pool(a) * torch.ones(1, 1, 1, 8) - self.pool1(b)[..., :1, :, None].sum()
        h = torch.cat([x.transpose(2, 3), x], 1)           # strided: runs
        i = torch.cat([a, a.double()], 1)                  # two dtypes: runs
        return a, b, c, d, e, f, g, h, i


@pytest.mark.parametrize("build, inputs", [
    (lambda: torchvision.models.resnet18(), (torch.randn(2, 3, 64, 64),)),
    (lambda: torchvision.models.mobilenet_v3_small(), (torch.randn(2, 3, 64, 64),)),
    (lambda: torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32),
     (torch.randn(3, 3, 32, 32),)),
    (lambda: torchvision.models.densenet121(), (torch.randn(2, 3, 64, 64),)),
    (lambda: torchvision.models.efficientnet_b0(), (torch.randn(1, 3, 64, 64),)),
    (lambda: Mixed(), (torch.randn(4, 6), torch.arange(5))),
    (lambda: Blocks(), (torch.randn(4, 4, 8),)),
    (lambda: Convolutions(), (torch.randn(2, 3, 9, 9),)),
], ids=["resnet18", "mobilenet_v3_small", "vit", "densenet121", "efficientnet_b0", "mixed", "blocks", "convolutions"])
def test_shortcuts_give_the_shapes_and_dtypes_of_running_the_ops(build, inputs, monkeypatch):
    model = build()
    for mode in (model.train, model.eval):
        mode()
        gm = fx.symbolic_trace(model)
        fast = _shapes.full_pass(gm, gm.graph, inputs, keep=True)
        with monkeypatch.context() as m:
            _slow_paths(m)
            slow = _shapes.full_pass(gm, gm.graph, inputs, keep=True)
        assert fast.metas == slow.metas and len(fast.metas) == len(gm.graph.nodes) and fast.kind == slow.kind == "meta"
        # strides too: a view after a shortcut fails or works as after the op itself
        def strides(v):
            return v.stride() if isinstance(v, torch.Tensor) else [strides(x) for x in v] if isinstance(v, (tuple, list)) else None
        assert {k: strides(v) for k, v in fast.values.items()} == {k: strides(v) for k, v in slow.values.items()}


@pytest.mark.parametrize("module, x", [
    (nn.BatchNorm2d(4), torch.randn(2, 3, 5, 5)),          # wrong channel count
    (nn.BatchNorm2d(3), torch.randn(2, 3, 5)),             # wrong rank: the module's own check
    (nn.BatchNorm2d(3), torch.randn(1, 3, 1, 1)),          # one value per channel in training mode
    (nn.Linear(4, 2), torch.randn(2, 5)),                  # wrong input features
    (nn.LayerNorm(6), torch.randn(2, 5)),                  # wrong normalized shape
    (nn.MultiheadAttention(6, 2), torch.randn(3, 2, 5)),   # wrong embedding width
    (nn.Conv2d(4, 2, 3), torch.randn(2, 3, 5, 5)),         # wrong channel count
    (nn.Conv2d(3, 2, 5), torch.randn(1, 3, 3, 3)),         # kernel larger than the input
    (nn.Conv2d(3, 2, 1), torch.randn(1, 3, 0, 3)),         # an empty dim
    (nn.Conv1d(3, 2, 1).half(), torch.randn(1, 3, 4)),     # another dtype
    (nn.AdaptiveAvgPool2d(2), torch.randn(3, 5)),          # wrong rank
    (lambda x: torch.cat([x, x[:, :2]], 0), torch.randn(2, 3)),  # other sizes beside the cat dim
    (lambda x: x * x[:, :2], torch.randn(2, 3)),           # shapes that do not broadcast
], ids=["bn-channels", "bn-rank", "bn-batch", "linear-features", "ln-shape", "mha-width", "conv-channels", "conv-small",
        "conv-empty", "conv-dtype", "pool-rank", "cat-sizes", "broadcast"])
def test_shortcuts_fail_as_running_the_op_fails(module, x, monkeypatch):
    class Call(nn.Module):
        def __init__(self):
            super().__init__()
            self.m = module

        def forward(self, x):
            return self.m(x, x, x) if isinstance(self.m, nn.MultiheadAttention) else self.m(x)
    gm = fx.symbolic_trace(Call() if isinstance(module, nn.Module) else module)
    with pytest.raises(_shapes.PropagationError) as fast:
        propagate(gm, gm.graph, (x,))
    _slow_paths(monkeypatch)
    with pytest.raises(_shapes.PropagationError) as slow:
        propagate(gm, gm.graph, (x,))
    assert (type(fast.value.exc), str(fast.value.exc)) == (type(slow.value.exc), str(slow.value.exc))


class Nonzero(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        h = torch.relu(self.lin(x) + x)
        return torch.nonzero(h)  # its shape depends on values: propagated on a real copy


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 3), st.integers(1, 3), st.integers(1, 4), st.integers(1, 3), st.integers(1, 3), st.integers(0, 2),
       st.integers(1, 2), st.sampled_from(["ints", "same", "valid"]), st.lists(st.integers(1, 9), min_size=3, max_size=3))
def test_a_convolution_shortcut_gives_what_its_meta_run_gives(n, groups, per_group, kernel, stride, padding, dilation, kind, sizes):
    conv = getattr(nn, f"Conv{n}d")(groups * 2, groups * per_group, kernel, stride=1 if kind == "same" else stride,
                                    padding={"ints": padding}.get(kind, kind), dilation=dilation, groups=groups, device="meta")
    x = torch.empty(2, groups * 2, *sizes[:n], device="meta")
    made = _shortcuts._convolution(conv, x)
    try:
        ran = conv(x)
    except RuntimeError:
        assert made is None
        return
    assert made is not None and (made.shape, made.dtype, made.stride()) == (ran.shape, ran.dtype, ran.stride())


class _Hooked(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.lin = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Linear(2, 5)
        self.conv.register_forward_hook(lambda m, args, out: out[:, :, :2])  # changes the output's shape
        self.bn.register_forward_pre_hook(lambda m, args: (args[0][:, :, :, :2],))  # and the input's
        self.lin.register_forward_pre_hook(lambda m, args: (args[0].mean(1),))

    def forward(self, x):
        return self.lin(self.bn(self.conv(x)))


def test_a_module_with_hooks_runs_for_its_shape():
    # a shortcut reads a module's attributes: a hook on it could change what goes in or comes out
    torch.manual_seed(0)
    model, x = _Hooked().eval(), torch.randn(1, 3, 8, 8)
    gm = fx.symbolic_trace(model)
    metas = propagate(gm, gm.graph, (x,))
    assert [metas[n].shape for n in ("conv", "bn", "lin")] == [(1, 4, 2, 6), (1, 4, 2, 2), (1, 2, 5)]
    assert tuple(model(x).shape) == (1, 2, 5)


def _pruned_conv():
    conv = nn.Conv2d(3, 16, 3)  # pruned by hand: the weights say 8 channels, out_channels still 16
    conv.weight, conv.bias = nn.Parameter(conv.weight[:8].detach().clone()), nn.Parameter(conv.bias[:8].detach().clone())
    return conv


def _pruned_linear():
    lin = nn.Linear(6, 10)
    lin.weight, lin.bias = nn.Parameter(lin.weight[:4].detach().clone()), nn.Parameter(lin.bias[:4].detach().clone())
    return lin


def _pruned_batchnorm():
    bn = nn.BatchNorm2d(16).eval()
    bn.weight, bn.bias = nn.Parameter(bn.weight[:8].detach().clone()), nn.Parameter(bn.bias[:8].detach().clone())
    bn.running_mean, bn.running_var = bn.running_mean[:8].clone(), bn.running_var[:8].clone()
    return bn


def _own_forward():
    lin = nn.Linear(6, 10)
    lin.forward = types.MethodType(lambda self, x: nn.functional.linear(x, self.weight, self.bias)[..., :4], lin)  # the instance's
    return lin


class _Weights(nn.Module):
    def __init__(self, **options):
        super().__init__()
        self.mha = nn.MultiheadAttention(8, 2, batch_first=True, **options)

    def forward(self, x):
        return self.mha(x, x, x)[1]  # the attention weights: one more key with either option


@pytest.mark.parametrize("module, x", [
    (_pruned_conv(), torch.randn(2, 3, 8, 8)),
    (_pruned_linear(), torch.randn(2, 6)),
    (_pruned_batchnorm(), torch.randn(2, 8, 4, 4)),
    (_own_forward(), torch.randn(2, 6)),
    (_Weights(add_bias_kv=True), torch.randn(2, 5, 8)),
    (_Weights(add_zero_attn=True), torch.randn(2, 5, 8)),
], ids=["conv-pruned", "linear-pruned", "batchnorm-pruned", "own-forward", "mha-bias-kv", "mha-zero-attn"])
def test_shortcuts_read_the_tensors_and_forward_a_module_really_has(module, x):
    # a shortcut that trusted out_channels, in_features or num_features, the class's forward, or the plain
    # attention gave a shape the module does not make: a layer inserted after it was then built for that
    # shape, the surgery passed (its checks ran the same shortcut) and the result failed at its first call
    gm = fx.symbolic_trace(nn.Sequential(module))
    metas = propagate(gm, gm.graph, (x,))
    assert metas[next(n for n in gm.graph.nodes if n.op == "output").args[0].name].shape == module(x).shape
    insert = nn.LayerNorm if module(x).dim() < 4 else nn.BatchNorm2d
    result = fxs.apply(nn.Sequential(module, nn.Identity()).eval(), [fxs.Insert(fxs.new(insert), after="0")], example_inputs=(x,))
    assert result.module(x).shape == module(x).shape


def test_real_tensors_run_the_ops():
    """Data-dependent code is propagated on real copies: there every value must be real."""
    torch.manual_seed(0)
    model, x = Nonzero(), torch.randn(5, 4)
    gm = fx.symbolic_trace(model)
    metas = propagate(gm, gm.graph, (x,))
    assert metas["nonzero"].shape == tuple(model(x).shape) and 0 < model(x).shape[0] < 20


class Custom(nn.Module):
    """A module that customises copying is copied its own way."""

    copies = 0

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(2, 2)
        self.notes = {"calls": [1, 2]}

    def __deepcopy__(self, memo):
        Custom.copies += 1
        new = Custom()
        new.lin = self.lin
        return new


def test_module_trees_copy_as_deepcopy_does():
    model = nn.Sequential(nn.Linear(3, 3), nn.ReLU(), Custom())
    model[0].register_forward_hook(lambda m, a, o: o * 2)
    model.tag = {"kept": [1]}
    model[0].weight.requires_grad_(False)
    shared = share(model)
    assert shared is not model and shared[0] is not model[0]
    assert shared[0].weight is model[0].weight and shared[2].lin.weight is model[2].lin.weight
    assert Custom.copies == 1
    assert shared.tag == {"kept": [1]} and shared.tag is not model.tag
    x = torch.randn(2, 3)
    assert torch.equal(shared[0](x), model[0](x))               # the hook came along
    assert list(shared[0]._forward_hooks) == list(model[0]._forward_hooks)
    assert shared[0]._forward_hooks is not model[0]._forward_hooks
    copied = clone(model, lambda t: t.detach().clone())
    assert not copied[0].weight.requires_grad and copied[0].weight is not model[0].weight
    assert torch.equal(copied[0].weight, model[0].weight)
    conv = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1, padding_mode="reflect"), nn.BatchNorm2d(3))  # Conv2d has a __setstate__
    conv[1].register_buffer("scratch", torch.zeros(1), persistent=False)
    copied = clone(conv, lambda t: t.detach().clone())
    assert vars(copied[0]).keys() == vars(conv[0]).keys() and copied[0].padding_mode == "reflect"
    assert copied[1]._non_persistent_buffers_set == {"scratch"} and copied[1]._non_persistent_buffers_set is not conv[1]._non_persistent_buffers_set
    assert copied[0]._parameters is not conv[0]._parameters and copied[0].weight is not conv[0].weight
    x = torch.randn(1, 2, 5, 5)
    assert torch.equal(copied.eval()(x), conv.eval()(x))
    tied = nn.Sequential(nn.Linear(2, 2, bias=False), nn.Linear(2, 2, bias=False))
    tied[1].weight = tied[0].weight
    again = clone(tied, lambda t: t.detach().clone())
    assert again[1].weight is again[0].weight                   # ties stay ties


def test_collection_waits_for_the_surgery_and_comes_back():
    seen = []

    class Probe(nn.Module):
        def forward(self, x):
            seen.append(gc.isenabled())
            return x.relu()

    model = nn.Sequential(nn.Linear(2, 2), Probe())
    assert gc.isenabled()
    fxs.apply(model, [fxs.Freeze("0")], example_inputs=(torch.randn(1, 2),))
    assert gc.isenabled() and seen and not any(seen)
    with pytest.raises(fxs.MatchError):
        fxs.apply(model, [fxs.Freeze("nothing.here")], example_inputs=(torch.randn(1, 2),))
    assert gc.isenabled()


STAGES = ["load model (imports included)", "rules", "capture", "modes", "match", "rewrite", "validate", "transfer",
          "gradient flow", "save"]


def test_profile_lists_every_stage_in_order(tmp_path):
    args = ("apply", "torchvision.models:resnet18", os.path.join(RULES, "classifier-head.yaml"), "--set", "num_classes=3",
            "--input", "2x3x64x64", "--profile")
    code, stdout, _ = cli(*args, "-o", tmp_path / "o")
    assert code == 0
    table = stdout[stdout.index("stage "):stdout.index("\n\nwrote")].splitlines()
    assert table[0].split() == ["stage", "seconds", "share"]
    rows = [line.rsplit(None, 2) for line in table[2:]]
    assert [r[0].strip() for r in rows] == STAGES + ["total"]
    seconds = [float(r[1]) for r in rows]
    assert abs(sum(seconds[:-1]) - seconds[-1]) <= 0.001 * len(seconds) and seconds[-1] > 0
    code, stdout, _ = cli(*args, "--json", "--dry-run")
    profile = json.loads(stdout)["profile"]
    assert list(profile) == STAGES and profile["save"] < 0.01 and all(v >= 0 for v in profile.values())
    code, stdout, _ = cli(*args[:-1], "--json", "--dry-run")
    assert "profile" not in json.loads(stdout)


def test_result_times_its_stages():
    result = fxs.apply(nn.Sequential(nn.Linear(2, 2)), [fxs.Freeze("0")], example_inputs=(torch.randn(1, 2),))
    assert list(result.timings) == STAGES[1:-1] and all(t >= 0 for t in result.timings.values())


class TiedHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, 6)
        self.enc = nn.Linear(6, 6)
        self.head = nn.Linear(6, 11, bias=False)
        self.head.weight = self.emb.weight
        self.register_buffer("scale", torch.full((6,), 2.0), persistent=False)

    def forward(self, ids):
        return self.head(self.enc(self.emb(ids)) * self.scale)


def test_load_hands_the_read_tensors_to_the_module(tmp_path):
    """fxs.load assigns the tensors safetensors reads (no second allocation and copy): ties stay one
    Parameter, frozen ones stay frozen, and training the loaded module never writes to the file."""
    torch.manual_seed(0)
    ids = torch.tensor([[1, 4, 7]])
    result = fxs.apply(TiedHead().eval(), [fxs.Freeze("enc")], example_inputs=(ids,))
    result.save(tmp_path / "m")
    loaded = fxs.load(tmp_path / "m")
    assert torch.equal(loaded(ids), result.module(ids))
    assert loaded.head.weight is loaded.emb.weight and isinstance(loaded.emb.weight, nn.Parameter)
    assert [n for n, p in loaded.named_parameters() if p.requires_grad] == ["emb.weight"]
    assert torch.equal(loaded.scale, torch.full((6,), 2.0)) and "scale" not in loaded.state_dict()
    before = {k: v.clone() for k, v in loaded.state_dict().items()}
    with torch.no_grad():
        for p in loaded.parameters():
            p.add_(1.0)
    again = fxs.load(tmp_path / "m")  # the file is as written: its hash still holds
    assert all(torch.equal(again.state_dict()[k], v) for k, v in before.items())
