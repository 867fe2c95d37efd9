"""Pattern rules: built-in rewrites against their maths, safety on shared modules, programmatic rules."""

import copy

import pytest
import torch
import torch.nn.functional as F
import torchvision
from conftest import assert_state_equal, state_copy
from torch import nn

import fxsurgery as fxs


def randomise_bn(model):
    torch.manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            if m.affine:
                m.weight.data.uniform_(0.5, 1.5)
                m.bias.data.uniform_(-0.2, 0.2)
    return model.eval()


class ConvBN(nn.Module):
    def __init__(self, conv, bn):
        super().__init__()
        self.conv, self.bn = conv, bn

    def forward(self, x):
        return self.bn(self.conv(x))


@pytest.mark.parametrize("conv, bn, shape", [
    (nn.Conv1d(4, 6, 3, padding=1, groups=2), nn.BatchNorm1d(6), (2, 4, 10)),
    (nn.Conv2d(4, 8, 3, stride=2, dilation=2, bias=False), nn.BatchNorm2d(8), (2, 4, 12, 12)),
    (nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.BatchNorm2d(8, affine=False), (2, 8, 6, 6)),
    (nn.Conv3d(2, 4, 2, groups=2), nn.BatchNorm3d(4), (1, 2, 4, 4, 4)),
], ids=["conv1d-grouped", "conv2d-no-bias-dilated", "depthwise-bn-not-affine", "conv3d-grouped"])
def test_fold_bn_matches_the_formula_and_the_original(conv, bn, shape):
    torch.manual_seed(0)
    model = randomise_bn(ConvBN(conv, bn))
    x = torch.randn(shape)
    result = fxs.apply(model, [fxs.Rewrite(fxs.FoldBatchNorm)], example_inputs=(x,))
    fused = result.module.conv
    # W' = W * gamma / sigma, b' = (b - mu) * gamma / sigma + beta, by hand in float64
    sigma = (bn.running_var.double() + bn.eps).sqrt()
    gamma = bn.weight.double() if bn.affine else torch.ones(bn.num_features, dtype=torch.float64)
    beta = bn.bias.double() if bn.affine else torch.zeros(bn.num_features, dtype=torch.float64)
    b = conv.bias.double() if conv.bias is not None else torch.zeros_like(sigma)
    want_w = conv.weight.double() * (gamma / sigma).reshape(-1, *[1] * (conv.weight.dim() - 1))
    assert torch.equal(fused.weight, want_w.float())
    assert torch.equal(fused.bias, ((b - bn.running_mean.double()) * gamma / sigma + beta).float())
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in result.module.modules())
    with torch.no_grad():
        torch.testing.assert_close(result.module(x), model(x), rtol=1e-5, atol=1e-5)
    assert result.report.entry("conv.weight").status == "adapted"
    assert result.report.entry("conv.weight").source == "conv, bn"
    assert result.report.dropped == []   # the BatchNorm's tensors were used: folded in


def test_fold_bn_on_resnet50_leaves_no_batchnorm_and_keeps_the_output():
    model = randomise_bn(torchvision.models.resnet50())
    saved = state_copy(model)
    x = torch.randn(2, 3, 96, 96)
    result = fxs.apply(model, [fxs.Rewrite(fxs.FoldBatchNorm)], example_inputs=(x,))
    assert result.plan.matches[0].count == 53
    assert sum(isinstance(m, nn.BatchNorm2d) for m in result.module.modules()) == 0
    with torch.no_grad():
        torch.testing.assert_close(result.module(x), model(x), rtol=1e-4, atol=1e-4)
    assert result.report.counts() == {"transferred": 2, "adapted": 106, "new": 0, "dropped": 0, "frozen": 0}
    assert_state_equal(model, saved)


def test_folded_layers_of_frozen_ones_stay_frozen_and_a_half_frozen_fold_is_warned_about():
    # `freeze *` then fold-bn left 40 of 42 parameters trainable, without a word
    model = randomise_bn(torchvision.models.resnet18()).eval()
    x = torch.randn(2, 3, 64, 64)
    result = fxs.apply(model, [fxs.Freeze("*"), fxs.Rewrite(fxs.FoldBatchNorm)], example_inputs=(x[:1],))
    assert [n for n, p in result.module.named_parameters() if p.requires_grad] == []
    assert result.report.counts() == {"transferred": 2, "adapted": 40, "new": 0, "dropped": 0, "frozen": 42}
    with torch.no_grad():
        torch.testing.assert_close(result.module(x), model(x), rtol=1e-4, atol=1e-4)
    fold = fxs.Rewrite(fxs.FoldBatchNorm)
    with pytest.warns(fxs.SurgeryWarning) as caught:
        half = fxs.apply(model, [fxs.Freeze("layer1.0.conv1"), fold], example_inputs=(x[:1],))
    assert [str(w.message) for w in caught] == [
        f"rule 2 'rewrite fold_bn (conv + batchnorm -> conv)' ({fold.origin}) computed layer1.0.conv1 from layer1.0.conv1, "
        "layer1.0.bn1, of which layer1.0.conv1.weight is frozen and layer1.0.bn1.weight is not: layer1.0.conv1 trains; "
        "fix: freeze all of layer1.0.conv1, layer1.0.bn1, or put a Freeze of layer1.0.conv1 after this rule"]
    assert [n for n, p in half.module.named_parameters() if not p.requires_grad] == []
    after = fxs.apply(model, [fold, fxs.Freeze("*")], example_inputs=(x[:1],))  # a Freeze after the fold: as before
    assert [n for n, p in after.module.named_parameters() if p.requires_grad] == []


def test_a_model_that_comes_frozen_stays_frozen_where_a_pattern_or_prune_remakes_its_layers():
    """A result chained into another surgery comes frozen (requires_grad=False): fold-bn and input-channels
    made its layers trainable again, and Freeze then Prune thawed the pruned layers (the other order did not)."""
    model = randomise_bn(torchvision.models.resnet18()).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    model.fc.requires_grad_(True)
    x = torch.randn(1, 3, 32, 32)
    for rules in ([fxs.Rewrite(fxs.FoldBatchNorm)], [fxs.Rewrite(fxs.AdaptInputChannels(1))]):
        result = fxs.apply(model, rules, example_inputs=(x,))
        assert [n for n, p in result.module.named_parameters() if p.requires_grad] == ["fc.weight", "fc.bias"]
        assert result.report.entry("conv1.weight").frozen
    fresh = torchvision.models.resnet18().eval()
    for rules in ([fxs.Freeze("*", exclude=["fc"]), fxs.Prune("layer1.0.conv1", channels=[0, 1, 2])],
                  [fxs.Prune("layer1.0.conv1", channels=[0, 1, 2]), fxs.Freeze("*", exclude=["fc"])]):
        result = fxs.apply(fresh, rules, example_inputs=(x,))
        assert [n for n, p in result.module.named_parameters() if p.requires_grad] == ["fc.weight", "fc.bias"]
        assert result.module.get_submodule("layer1.0.conv1").out_channels == 61


def test_fold_linear_bn():
    torch.manual_seed(0)
    model = randomise_bn(nn.Sequential(nn.Linear(5, 7), nn.BatchNorm1d(7), nn.ReLU(), nn.Linear(7, 3, bias=False), nn.BatchNorm1d(3)))
    x = torch.randn(4, 5)
    result = fxs.apply(model, [fxs.Rewrite(fxs.FoldLinearBatchNorm)], example_inputs=(x,))
    assert result.plan.matches[0].count == 2
    assert [type(m).__name__ for m in result.module.children()] == ["Linear", "ReLU", "Linear"]
    with torch.no_grad():
        torch.testing.assert_close(result.module(x), model(x), rtol=1e-5, atol=1e-5)


class Reused(nn.Module):
    """One convolution called twice, each call followed by its own BatchNorm."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn_a, self.bn_b = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.BatchNorm2d(8)

    def forward(self, x):
        return self.bn_a(self.conv(x)) + self.bn_b(self.conv(x * 2))


def test_a_reused_convolution_is_left_alone_with_the_reason():
    model = randomise_bn(Reused())
    x = torch.randn(2, 3, 8, 8)
    result = fxs.apply(model, [fxs.Rewrite(fxs.FoldBatchNorm, optional=True)], example_inputs=(x,))
    m = result.plan.matches[0]
    reason = "is called at 2 places and rewriting one would change the others; per_site: true gives each match its own copy"
    assert m.count == 0 and m.skipped == [f"conv (Conv2d) + bn_a (BatchNorm2d): conv {reason}",
                                          f"conv (Conv2d) + bn_b (BatchNorm2d): conv {reason}"]
    with torch.no_grad():
        assert torch.equal(result.module(x), model(x))


def test_a_reused_convolution_per_site_gets_a_copy_per_match():
    model = randomise_bn(Reused())
    x = torch.randn(2, 3, 8, 8)
    result = fxs.apply(model, [fxs.Rewrite(fxs.FoldBatchNorm, per_site=True)], example_inputs=(x,))
    assert result.plan.matches[0].count == 2
    convs = [n for n, m in result.module.named_modules() if isinstance(m, nn.Conv2d)]
    assert convs == ["conv_1", "conv_2"] and not any(isinstance(m, nn.BatchNorm2d) for m in result.module.modules())
    with torch.no_grad():
        assert (result.module(x) - model(x)).abs().max() < 1e-5   # torch.fx's fuse() is off by 0.59 here
    assert [result.report.entry(f"conv_{i}.weight").source for i in (1, 2)] == ["conv, bn_a", "conv, bn_b"]


class Leaky(nn.Module):
    """The convolution's output is also read outside the pattern."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y


def test_an_inner_value_used_outside_the_pattern_is_a_near_miss():
    model = randomise_bn(Leaky())
    x = torch.randn(1, 3, 4, 4)
    result = fxs.apply(model, [fxs.Rewrite(fxs.FoldBatchNorm, optional=True)], example_inputs=(x,))
    m = result.plan.matches[0]
    assert m.count == 0 and m.near == ["conv (Conv2d) is read by 2 nodes (bn, add): its value is used outside the pattern"]
    with torch.no_grad():
        assert torch.equal(result.module(x), model(x))


class Activations(nn.Module):
    def __init__(self):
        super().__init__()
        self.act = nn.ReLU()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return self.fc(self.act(x)) + F.relu(x) + torch.relu(-x) + x.relu() * 2


def test_swap_activation_in_module_function_and_method_form():
    torch.manual_seed(0)
    model = Activations()
    x = torch.randn(3, 4)
    result = fxs.apply(model, [fxs.Rewrite(fxs.SwapActivation(to=nn.GELU))], example_inputs=(x,))
    assert result.plan.matches[0].count == 4
    assert isinstance(result.module.act, nn.GELU)
    assert sum(n.target is F.gelu for n in result.module.graph.nodes) == 3
    want = model.fc(F.gelu(x)) + F.gelu(x) + F.gelu(-x) + F.gelu(x) * 2
    assert torch.equal(result.module(x), want)


def test_drop_dropout_module_and_function_forms():
    class Drops(nn.Module):
        def __init__(self):
            super().__init__()
            self.drop, self.fc = nn.Dropout(0.5), nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(F.dropout(self.drop(x), 0.3, self.training))

    model = Drops().train()
    x = torch.randn(5, 4)
    result = fxs.apply(model, [fxs.Rewrite(fxs.DropDropout)], example_inputs=(x,))
    assert result.plan.matches[0].count == 2
    assert torch.equal(result.module.train()(x), model.fc(x))   # no randomness left, even in training mode


class Attention(nn.Module):
    """Attention as timm and transformers write it: dropout_p from the mode, no dropout module to match."""

    def __init__(self, p: float, positional: bool, always: bool = False):
        super().__init__()
        self.qkv, self.p, self.positional, self.always = nn.Linear(8, 24), p, positional, always

    def forward(self, x):
        q, k, v = self.qkv(x).unflatten(-1, (3, 2, 4)).transpose(1, 3).unbind(2)
        p = self.p if self.training or self.always else 0.0  # always: Monte Carlo dropout
        if self.positional:
            return F.scaled_dot_product_attention(q, k, v, None, p, True)
        return F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)


@pytest.mark.parametrize("positional", [False, True])
@pytest.mark.parametrize("captured_in", ["train", "eval"])
def test_drop_dropout_removes_attention_dropout(captured_in, positional):
    torch.manual_seed(0)
    model, x = getattr(Attention(0.5, positional), captured_in)(), torch.randn(2, 6, 8)
    result = fxs.apply(model, [fxs.Rewrite(fxs.DropDropout)], example_inputs=(x,))
    assert result.plan.matches[0].count == 1
    with torch.no_grad():
        reference = model.eval()(x)
        assert torch.equal(result.module.train()(x), reference)  # was random: the call kept dropout_p=0.5 in train mode
        assert torch.equal(result.module.eval()(x), reference)
    without = Attention(0.0, positional)  # a constant 0 in both modes: nothing to remove, and said so
    with pytest.raises(fxs.MatchError) as err:
        fxs.apply(without, [fxs.Rewrite(fxs.DropDropout)], example_inputs=(x,))
    assert "scaled_dot_product_attention is called without dropout" in err.value.full
    with pytest.raises(fxs.MatchError) as err:  # Monte Carlo dropout drops in eval mode too: removing it changes eval outputs
        fxs.apply(Attention(0.5, positional, always=True).eval(), [fxs.Rewrite(fxs.DropDropout)], example_inputs=(x,))
    assert "scaled_dot_product_attention is called with dropout_p=0.5 in both modes, so it drops in eval mode too" in err.value.full


def test_drop_dropout_leaves_no_dropout_in_a_timm_vit():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, drop_rate=0.3, attn_drop_rate=0.3,
                              proj_drop_rate=0.3).train()
    x = torch.randn(2, 3, 32, 32)
    result = fxs.apply(model, [fxs.Rewrite(fxs.DropDropout)], example_inputs=(x,))
    assert result.plan.matches[0].count == 10  # 8 modules and each block's attention
    with torch.no_grad():
        assert torch.equal(result.module.train()(x), model.eval()(x))



class Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.5, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.mha, self.head = nn.MultiheadAttention(16, 2, dropout=0.5, batch_first=True), nn.Linear(16, 3)

    def forward(self, x):
        h = self.enc(x)
        return self.head(self.mha(h, h, h)[0])


def test_drop_dropout_reaches_into_torch_transformer_layers(tmp_path):
    """torch.fx calls nn.TransformerEncoder and nn.MultiheadAttention as one module each: drop-dropout matched
    nothing (optional, so silently) and the result still dropped in train mode."""
    torch.manual_seed(0)
    model, x = Encoder().train(), torch.randn(2, 5, 16)
    result = fxs.apply(model, fxs.load_rules("drop-dropout"), example_inputs=(x,))
    assert [s.shown for s in result.plan.matches[0].sites] == ["enc", "mha"]
    assert {e.status for e in result.report.entries} == {"transferred"}
    reference = copy.deepcopy(model)
    for sub in reference.modules():
        if isinstance(sub, nn.Dropout):
            sub.p = 0.0
        if isinstance(sub, nn.MultiheadAttention):
            sub.dropout = 0.0
    assert torch.equal(result.module.train()(x), reference(x))  # train mode, bit for bit, and no randomness left
    assert torch.equal(result.module(x), result.module(x))
    # model.py rebuilds nn.TransformerEncoder from what its layers keep (its own d_model, encoder_layer: none)
    result.save(tmp_path / "o")
    assert "torch.nn.TransformerEncoder(encoder_layer=torch.nn.TransformerEncoderLayer(d_model=16, nhead=2, dim_feedforward=32, " \
           "dropout=0.0, activation='relu', batch_first=True), num_layers=2, enable_nested_tensor=False)" in (tmp_path / "o" / "model.py").read_text()
    assert torch.equal(fxs.load(tmp_path / "o").train()(x), reference(x))
    torch.save(result.module, tmp_path / "m.pt")
    assert torch.equal(torch.load(tmp_path / "m.pt", weights_only=False).train()(x), reference(x))
    with torch.no_grad():
        torch.testing.assert_close(result.module.train()(x), model.eval()(x))
    assert type(model.enc.layers[0].dropout1) is nn.Dropout and model.mha.dropout == 0.5  # the original keeps its dropout
    assert not {id(p) for p in model.parameters()} & {id(p) for p in result.module.parameters()}  # and its own tensors
    assert all(p.requires_grad for p in model.parameters())
    quiet = Encoder()
    for sub in quiet.modules():
        if isinstance(sub, nn.MultiheadAttention):
            sub.dropout = 0.0
        if isinstance(sub, nn.Dropout):
            sub.p = 0.0
    with pytest.raises(fxs.MatchError) as err:
        fxs.apply(quiet, [fxs.Rewrite(fxs.DropDropout)], example_inputs=(x,))
    assert "enc (TransformerEncoder): TransformerEncoder does not drop" in err.value.full


@pytest.mark.parametrize("kind", ["TransformerEncoder", "TransformerEncoderLayer", "MultiheadAttention"])
def test_drop_dropout_of_a_transformer_layer_that_is_the_whole_model(kind):
    """Traced as the model's own graph, the model was also matched as a layer to copy: the result was no graph
    module (an AttributeError). A traced nn.MultiheadAttention calls multi_head_attention_forward, whose
    dropout_p the rule now sets to 0."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.3, batch_first=True)
    model = {"TransformerEncoder": lambda: nn.TransformerEncoder(layer, 2, enable_nested_tensor=False), "TransformerEncoderLayer": lambda: layer,
             "MultiheadAttention": lambda: nn.MultiheadAttention(16, 4, dropout=0.3, batch_first=True)}[kind]().train()
    x = torch.randn(2, 5, 16)
    inputs = (x, x, x) if kind == "MultiheadAttention" else (x,)
    result = fxs.apply(model, [fxs.Rewrite(fxs.DropDropout)], example_inputs=inputs)
    assert isinstance(result.module, torch.fx.GraphModule) and result.capture.complete
    first = lambda out: out[0] if isinstance(out, tuple) else out  # noqa: E731
    with torch.no_grad():
        want = first(model.eval()(*inputs))
        got = first(result.module.train()(*inputs))
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)  # train mode without randomness: eval's values
        assert torch.equal(first(result.module(*inputs)), got)
    assert result.gradient_flow.counts()["trainable"] == len(list(model.parameters()))


class AlwaysDrops(nn.Dropout):
    def forward(self, x):  # Monte Carlo dropout: drops in eval mode too
        return F.dropout(x, self.p, True)


def test_drop_dropout_of_transformer_layers_keeps_earlier_freezes_and_streams(tmp_path):
    """Its copy of an nn.TransformerEncoder counted as a layer the rule made, which an earlier Freeze does not
    reach: freeze-backbone + drop-dropout trained the backbone. A model built without weights was refused ('its
    weights are computed from mha, which have no values'): the copy computes nothing."""
    from safetensors.torch import save_file
    torch.manual_seed(0)
    model, x = Encoder().train(), torch.randn(2, 5, 16)
    result = fxs.apply(model, [fxs.Freeze("*", exclude=["head"]), fxs.Rewrite(fxs.DropDropout)], example_inputs=(x,))
    assert [n for n, p in result.module.named_parameters() if p.requires_grad] == ["head.weight", "head.bias"]
    assert len(result.report.frozen) == len(list(model.parameters())) - 2
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    with fxs.empty_weights():
        empty = Encoder().train()
    loaded = fxs.apply(model, [fxs.Rewrite(fxs.DropDropout)], example_inputs=(x,))
    for stream in (False, True):
        read = fxs.apply(empty, [fxs.Rewrite(fxs.DropDropout)], example_inputs=(x,), weights=str(path), stream=stream)
        assert {e.status for e in read.report.entries} == {"transferred"}
        if not stream:
            assert torch.equal(read.module.train()(x), loaded.module.train()(x))
    monte_carlo = Encoder()
    monte_carlo.enc.layers[0].dropout = AlwaysDrops(0.5)
    with pytest.raises(fxs.MatchError) as err:  # its copy would not drop in eval mode, where the original does
        fxs.apply(monte_carlo, [fxs.Rewrite(fxs.DropDropout, select="enc")], example_inputs=(x,))
    assert ("enc (TransformerEncoder): inside it, AlwaysDrops has a forward of its own, not Dropout's: rewriting it as one "
            "would lose what it adds") in err.value.full

def test_lora_outputs_unchanged_base_frozen_adapters_train(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    saved = state_copy(model)
    x = torch.randn(4, 6)
    result = fxs.apply(model, [fxs.Rewrite(fxs.AddLoRA(rank=2, alpha=4), select="0")], example_inputs=(x,))
    new = result.module
    assert torch.equal(new(x), model(x))                       # B = 0 at insertion
    assert (new.get_submodule("0_lora.lora_a").weight.shape, new.get_submodule("0_lora.lora_b").weight.shape) == \
        (torch.Size([2, 6]), torch.Size([8, 2]))
    flow = result.gradient_flow.status
    assert {k: v for k, v in flow.items() if k.startswith("0")} == {
        "0.weight": "frozen", "0.bias": "frozen", "0_lora.lora_a.weight": "trainable", "0_lora.lora_b.weight": "trainable"}
    assert {e.name: (e.status, e.rule) for e in result.report.entries if "lora" in e.name} == {
        "0_lora.lora_a.weight": ("new", 1), "0_lora.lora_b.weight": ("new", 1)}
    opt = torch.optim.SGD(result.trainable_parameters(), lr=0.1)
    new(x).square().sum().backward()
    opt.step()
    assert torch.equal(new.get_submodule("0").weight, saved["0.weight"])   # the base never moves
    assert not torch.equal(new(x), model(x))                                 # the adapter does
    assert_state_equal(model, saved)
    result.save(tmp_path / "out")                               # plain torch modules: model.py needs no fxsurgery
    loaded = fxs.load(tmp_path / "out")
    assert torch.equal(loaded(x), new(x))
    source = (tmp_path / "out" / "model.py").read_text()
    assert "import fxsurgery" not in source and "from fxsurgery" not in source and "torch.nn.Linear(in_features=6, out_features=2, bias=False)" in source


def test_lora_params_that_would_break_the_model_are_refused():
    # alpha nan or inf made every output nan (nan times B = 0); a rank of 10^9 failed to allocate, as an internal error
    for alpha in (float("nan"), float("inf"), True):
        with pytest.raises(ValueError) as err:
            fxs.AddLoRA(rank=2, alpha=alpha)
        assert str(err.value) == f"alpha must be a finite number, got {alpha!r}"
    model = nn.Sequential(nn.Linear(8, 5))
    rule = fxs.Rewrite(fxs.AddLoRA(rank=9), select="0")
    with pytest.raises(fxs.RewriteError) as err:
        fxs.apply(model, [rule], example_inputs=(torch.randn(2, 8),))
    assert str(err.value) == (f"rule 1 'rewrite lora (rank 9, alpha 16) in 0' ({rule.origin}) at '0': lora (rank 9, alpha 16): "
                              "rank 9 is above 8, the larger side of Linear(8, 5): the adapter would outgrow the layer; "
                              "fix: change the rule's params, or select other layers")
    fitted = fxs.apply(model, [fxs.Rewrite(fxs.AddLoRA(rank=8), select="0")], example_inputs=(torch.randn(2, 8),))
    x = torch.randn(3, 8)
    assert torch.equal(fitted.module(x), model(x))


def test_adapt_input_channels_takes_the_first_convolution_by_graph_position():
    model = torchvision.models.resnet18().eval()
    x = torch.randn(1, 3, 64, 64)
    result = fxs.apply(model, [fxs.Rewrite(fxs.AdaptInputChannels(in_channels=1))], example_inputs=(x,))
    assert result.plan.matches[0].sites[0].where == "conv1" and result.module.conv1.in_channels == 1
    assert [str(c) for c in result.input_changes] == [
        "x: [1, 3, 64, 64] -> [1, 1, 64, 64] because rule 1 'rewrite adapt_input_channels -> 1' "
        f"({result.plan.matches[0].rule.origin}) made conv1 Conv2d(1, 64, kernel_size=(7, 7), stride=(2, 2), padding=(3, 3), bias=False)"]
    entry = result.report.entry("conv1.weight")
    assert (entry.status, entry.source) == ("adapted", "conv1")
    grey = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(result.module.eval()(grey), model(grey.expand(-1, 3, -1, -1)), rtol=1e-4, atol=1e-4)


def test_output_returns_the_named_layer_and_drops_the_rest():
    model = torchvision.models.resnet18().eval()
    x = torch.randn(1, 3, 64, 64)
    result = fxs.apply(model, [fxs.Output("layer2")], example_inputs=(x,))
    trunk = nn.Sequential(*list(model.children())[:6])
    with torch.no_grad():
        assert torch.equal(result.module(x), trunk(x))
    dropped = result.report.dropped
    assert dropped and all(n.split(".")[0] in ("layer3", "layer4", "fc") for n in dropped)
    assert len(dropped) == sum(1 for k in model.state_dict() if k.split(".")[0] in ("layer3", "layer4", "fc"))


def test_a_chain_replaced_by_a_new_module_infers_its_shape():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    rule = fxs.Rewrite(fxs.Chain([nn.Linear, nn.ReLU], fxs.new(nn.Linear, out_features=8)))
    result = fxs.apply(model, [rule], example_inputs=(torch.randn(3, 4),))
    assert result.plan.matches[0].count == 1
    assert [type(m).__name__ for m in result.module.children()] == ["Linear", "Linear"]
    assert result.module.get_submodule("0").in_features == 4
    assert {(e.name, e.status) for e in result.report.entries if e.name.startswith("0.")} == {
        ("0.weight", "new"), ("0.bias", "new"), ("0.weight", "dropped"), ("0.bias", "dropped")}


def test_the_report_says_new_for_what_a_rewrite_made_afresh_and_adapted_for_what_it_computed():
    # a pattern is `weights = "derived"` by default; the README's linear_relu makes a fresh Linear, which was reported
    # "adapted from a, r" while it sat at its random init, and the matched Linear's tensors were never reported dropped
    torch.manual_seed(0)
    net = nn.Sequential()
    net.add_module("a", nn.Linear(4, 4))
    net.add_module("r", nn.ReLU())
    net.add_module("b", nn.Linear(4, 2))
    x = torch.randn(2, 4)

    @fxs.pattern(nn.Linear, nn.ReLU)
    def fresh(linear, relu):
        return nn.Sequential(nn.Linear(linear.in_features, linear.out_features), nn.ReLU())

    @fxs.pattern(nn.Linear, nn.ReLU)
    def half(linear, relu):  # the weight computed from the match, the bias left at its init
        new = nn.Linear(linear.in_features, linear.out_features)
        with torch.no_grad():
            new.weight.copy_(linear.weight * 0.5)
        return nn.Sequential(new, nn.ReLU())

    @fxs.pattern(nn.Linear, nn.ReLU)
    def copied(linear, relu):
        return nn.Sequential(copy.deepcopy(linear), nn.ReLU())

    def statuses(pattern):
        report = fxs.apply(net, [fxs.Rewrite(pattern)], example_inputs=(x,)).report
        return {e.name: (e.status, e.source) for e in report.entries if not e.name.startswith("b.")}

    made_afresh = {"a.0.weight": ("new", None), "a.0.bias": ("new", None), "a.weight": ("dropped", None), "a.bias": ("dropped", None)}
    assert statuses(fresh) == made_afresh
    assert statuses(half) == {"a.0.weight": ("adapted", "a, r"), "a.0.bias": ("new", None)}
    assert statuses(copied) == {"a.0.weight": ("adapted", "a, r"), "a.0.bias": ("adapted", "a, r")}

    def idiom(body):
        @fxs.pattern(nn.Linear, nn.ReLU)
        def written(linear, relu):
            new = nn.Linear(4, 4)
            with torch.no_grad():
                body(linear, new)
            return nn.Sequential(new, nn.ReLU())
        return statuses(written)

    def assigned(linear, new):  # __setitem__ returns nothing: what it writes is followed
        new.weight[:] = linear.weight
        new.bias[:] = linear.bias

    def reinitialised(linear, new):  # a copy re-initialised holds nothing of the match (nn.init passes tensor=)
        again = copy.deepcopy(linear)
        again.reset_parameters()
        new.weight.data, new.bias.data = again.weight.data, again.bias.data

    assert idiom(assigned) == {"a.0.weight": ("adapted", "a, r"), "a.0.bias": ("adapted", "a, r")}
    assert idiom(reinitialised) == made_afresh
    assert idiom(lambda linear, new: new.weight.copy_(torch.zeros_like(linear.weight))) == made_afresh  # a shape, not values
    assert idiom(lambda linear, new: setattr(new.weight, "data", new.weight.type_as(linear.weight))) == made_afresh

    @fxs.pattern(nn.ReLU)
    def grown(relu):  # a match without tensors: what the rewrite makes is new
        return nn.Sequential(nn.ReLU(), nn.Linear(4, 4))

    report = fxs.apply(net, [fxs.Rewrite(grown)], example_inputs=(x,)).report
    assert {e.name: e.status for e in report.entries if e.name.startswith("r.")} == {"r.1.weight": "new", "r.1.bias": "new"}


def test_a_rewrite_that_writes_into_the_matched_modules_is_refused_and_leaves_the_original_alone():
    # they are the original model's tensors: linear.weight.mul_(2) changed the user's model, and the report said transferred
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    saved = state_copy(model)

    @fxs.pattern(nn.Linear, nn.ReLU)
    def doubled(linear, relu):
        with torch.no_grad():
            linear.weight.mul_(2)
        return nn.Sequential(linear, nn.ReLU())

    with pytest.raises(fxs.RewriteError) as err:
        fxs.apply(model, [fxs.Rewrite(doubled)], example_inputs=(torch.randn(2, 4),))
    assert str(err.value).endswith(" at '0': doubled.rewrite writes into the matched Linear.weight, which the original model "
                                   "holds; fix: compute a new tensor from it (new.weight.copy_(linear.weight * 2))")
    assert_state_equal(model, saved)
