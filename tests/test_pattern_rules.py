"""Pattern rules written by users (classes, decorated functions, DAGs), explain, the rule library, and safety."""

import os
import re
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_state_equal, cli, state_copy
from test_patterns import ConvBN, Leaky, randomise_bn
from torch import nn

import fxsurgery as fxs

# -- programmatic rules -----------------------------------------------------------------------------

class ScaleByTwo(fxs.Pattern):
    """ReLU followed by Dropout becomes 2 * ReLU: a user's rule with a check."""

    pattern = (nn.ReLU, nn.Dropout)

    def check(self, relu, drop):
        return None if drop.p < 0.9 else f"p={drop.p} is too large"

    def rewrite(self, relu, drop):
        return lambda x: torch.relu(x) * 2


def test_a_pattern_class_with_a_check():
    model = nn.Sequential(nn.ReLU(), nn.Dropout(0.5), nn.ReLU(), nn.Dropout(0.95)).eval()
    x = torch.randn(3, 4)
    result = fxs.apply(model, [fxs.Rewrite(ScaleByTwo())], example_inputs=(x,))
    m = result.plan.matches[0]
    assert m.count == 1 and m.skipped == ["2 (ReLU) + 3 (Dropout): p=0.95 is too large"]
    assert torch.equal(result.module(x), torch.relu(torch.relu(x) * 2))


def test_a_decorated_function_used_from_yaml(tmp_path, monkeypatch):
    package = tmp_path / "myrules"
    package.mkdir()
    (package / "__init__.py").write_text(textwrap.dedent('''
        import torch
        import fxsurgery as fxs

        @fxs.pattern(torch.nn.Linear, torch.nn.ReLU)
        def fused_linear_relu(linear, relu):
            """Linear then ReLU as one Sequential."""
            return torch.nn.Sequential(torch.nn.Linear(linear.in_features, linear.out_features), torch.nn.ReLU())
    '''))
    rules = tmp_path / "r.yaml"
    rules.write_text("fxsurgery: 1\nrules:\n  - use: myrules:fused_linear_relu\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    code, out, err = cli("apply", f"{tmp_path}/models.py:Net", rules, "--input", "2x4", "--dry-run")
    assert (code, err) == (2, f"fxsurgery: error: {rules}:3: 'myrules.fused_linear_relu' is outside the allowlist "
                              "(torch, torchvision); fix: use a public torch/torchvision name, or allow its package with --allow-module myrules\n")
    (tmp_path / "models.py").write_text("import torch\nclass Net(torch.nn.Sequential):\n"
                                        "    def __init__(self):\n        super().__init__(torch.nn.Linear(4, 4), torch.nn.ReLU())\n")
    code, out, err = cli("apply", f"{tmp_path}/models.py:Net", rules, "--input", "2x4", "--dry-run",
                         "--allow-module", "myrules", "--explain")
    assert (code, err) == (0, "")
    assert f"rule 1 'rewrite fused_linear_relu' ({rules}:3): 1 match\n" in out


def test_explain_lists_what_was_left_alone_and_near_misses():
    model = randomise_bn(Leaky())
    result = fxs.apply(model, [fxs.Rewrite(fxs.FoldBatchNorm, optional=True)], example_inputs=(torch.randn(1, 3, 4, 4),))
    origin = result.plan.matches[0].rule.origin
    assert result.plan.explain() == (
        f"rule 1 'rewrite fold_bn (conv + batchnorm -> conv)' ({origin}): 0 matches\n"
        "  near miss: conv (Conv2d) is read by 2 nodes (bn, add): its value is used outside the pattern")


def test_fxsurgery_rules_lists_every_shipped_file():
    code, out, err = cli("rules")
    shipped = sorted(f[:-5] for f in os.listdir(os.path.join(os.path.dirname(__file__), "..", "rules")) if f.endswith(".yaml"))
    assert code == 0 and err == ""
    assert [line for line in out.splitlines() if line and not line.startswith(" ")][:-1] == shipped
    assert "  params: channels=1" in out and out.endswith(f"{len(shipped)} rule files; use one by name: "
                                                          f"fxsurgery apply MODEL {shipped[0]} --set k=v\n")


def test_a_shipped_rule_file_by_name(tmp_path):
    code, out, err = cli("apply", "torchvision.models:resnet18", "fold-bn", "--input", "2x3x32x32", "--dry-run", "--eval")
    assert (code, err) == (0, "")
    assert re.search(r"^1  rewrite fold_bn \(conv \+ batchnorm -> conv\) +20 +conv1, layer1.0.conv1,", out, re.M)


def test_patterns_see_only_traced_code_and_say_so():
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "bad_inputs"))
    from models import Branchy  # noqa: E402  (without example inputs its forward stays opaque Python)
    rule = fxs.Rewrite(fxs.SwapActivation(to=nn.GELU, of=nn.Linear))
    with pytest.raises(fxs.MatchError) as err:
        fxs.apply(Branchy(), [rule])
    text = err.value.full  # as written: the message itself is bounded to 300 characters
    assert len(str(err.value)) <= 300
    assert text.startswith(
        f"rule 1 'rewrite swap_activation torch.nn.Linear -> GELU' ({rule.origin}) matched nothing: no call of torch.nn.Linear "
        "in the traced graphs (types present: Branchy, Linear); opaque code may call it, and without example inputs its "
        "calls are not known ((the model): TraceError: symbolically traced variables cannot be used as inputs to control flow")
    assert text.endswith("models.py:95)); pass example inputs (--input); fix: correct the selector or add 'optional: true'")


class NoRecipeFold(fxs.FoldBatchNorm):
    """A user's fold that map-weights could not replay: no recipe, so its values must be in the model."""

    def recipe(self, conv, bn):
        return None


def test_a_fold_on_a_model_built_without_weights_is_computed_from_the_checkpoint(tmp_path):
    """fold_bn's recipe (what map-weights replays) computes the folded layer from the checkpoint, in memory or
    streamed: the same bits as a fold of the loaded model. A fold without a recipe still needs the values."""
    from safetensors.torch import load_file, save_file
    torch.manual_seed(0)
    model = randomise_bn(ConvBN(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))).eval()
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    with fxs.empty_weights():
        empty = ConvBN(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
    x = torch.randn(1, 3, 6, 6)
    fold = fxs.Rewrite(fxs.FoldBatchNorm)
    loaded = fxs.apply(model, [fold], example_inputs=(x,))
    read = fxs.apply(empty, [fold], example_inputs=(x,), weights=str(path))
    assert_state_equal(read.module, loaded.module.state_dict())
    assert [e.__dict__ for e in read.report.entries] == [e.__dict__ for e in loaded.report.entries]
    assert read.report.recipes == loaded.report.recipes and "conv.weight" in read.report.recipes
    assert torch.equal(read.module(x), loaded.module(x))
    streamed = fxs.apply(empty, [fold], example_inputs=(x,), weights=str(path), stream=True)
    assert streamed.module.conv.weight.is_meta
    streamed.save(tmp_path / "s")
    loaded.save(tmp_path / "m")
    assert (tmp_path / "s" / "model.safetensors").read_bytes() == (tmp_path / "m" / "model.safetensors").read_bytes()
    assert_state_equal(fxs.load(tmp_path / "s"), load_file(tmp_path / "m" / "model.safetensors"))

    torch.manual_seed(5)
    other = randomise_bn(ConvBN(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))).eval()  # values of its own, which weights= replaces
    for stream in (False, True):
        replaced = fxs.apply(other, [fold], example_inputs=(x,), weights=str(path), stream=stream)
        assert_state_equal(replaced.module, loaded.module.state_dict())
    rule = fxs.Rewrite(NoRecipeFold)
    with pytest.raises(fxs.TransferError) as err:
        fxs.apply(other, [rule], example_inputs=(x,), weights=str(path))
    assert str(err.value) == (
        f"rule 1 'rewrite fold_bn (conv + batchnorm -> conv)' ({rule.origin}): conv.weight is computed from the model's own conv, bn, "
        "not weights= (its pattern has no recipe); fix: load the checkpoint into the model and apply without weights=")
    with pytest.raises(fxs.RewriteError) as err:
        fxs.apply(empty, [rule], example_inputs=(x,), weights=str(path))
    assert str(err.value) == (
        f"rule 1 'rewrite fold_bn (conv + batchnorm -> conv)' ({rule.origin}) at 'conv': its weights are computed from "
        "conv, bn, which have no values (the model was built without weights); fix: load the weights into the model "
        "before this rule, or leave the rule out")
    rule = fxs.Rewrite(fxs.FoldBatchNorm)
    with pytest.raises(fxs.TransferError) as err:  # a recipe, but nothing to compute it from
        fxs.apply(empty, [rule], example_inputs=(x,))
    assert str(err.value) == (
        f"rule 1 'rewrite fold_bn (conv + batchnorm -> conv)' ({rule.origin}): conv.weight is computed from conv, bn, which have "
        "no values (the model was built without weights); fix: load the weights into the model before this rule, or leave the rule out")


# -- DAG patterns ------------------------------------------------------------------------------------

class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x):
        h = torch.relu(self.a(x)) + x          # matches
        g = torch.relu(self.b(h)) + h * 2      # matches: y is any value
        r = torch.relu(self.c(g))
        return r + g + r                       # relu(c(g)) is read twice: a near miss


class GeluResidual(fxs.Pattern):
    """relu(linear(x)) + y becomes gelu(linear(x)) + y."""

    def pattern(self, x, y):
        return torch.relu(fxs.calls(nn.Linear)(x)) + y

    def rewrite(self, linear, relu, add):
        return lambda x, y: F.gelu(linear(x)) + y


def test_a_dag_pattern_matches_through_an_index_and_inlines_its_replacement(tmp_path):
    torch.manual_seed(0)
    model = Residual()
    x = torch.randn(3, 4)
    result = fxs.apply(model, [fxs.Rewrite(GeluResidual())], example_inputs=(x,))
    m = result.plan.matches[0]
    assert [s.where for s in m.sites] == ["a", "b"]
    assert m.near == ["at add_2 (add): relu_2 (relu) is also read outside the pattern",   # r + g, r read twice
                      "at add_3 (add): add_2 (add) is not relu"]                          # (r + g) + r
    h = F.gelu(model.a(x)) + x
    g = F.gelu(model.b(h)) + h * 2
    r = torch.relu(model.c(g))
    assert torch.equal(result.module(x), r + g + r)
    assert result.report.counts() == {"transferred": 6, "adapted": 0, "new": 0, "dropped": 0, "frozen": 0}
    result.save(tmp_path / "out")                        # the lambda was inlined: plain torch in model.py
    assert torch.equal(fxs.load(tmp_path / "out")(x), result.module(x))


def test_a_dag_pattern_must_return_a_call():
    class Nothing(fxs.Pattern):
        def pattern(self, x):
            return x

    with pytest.raises(fxs.RuleError) as err:
        fxs.Rewrite(Nothing())
    line = sys._getframe().f_lineno - 1
    assert str(err.value) == (f"tests/test_pattern_rules.py:{line}: pattern Nothing must return the value of a call, "
                              "or a tuple of distinct calls; fix: e.g. def pattern(self, x, y): return torch.relu(x) + y")


def test_lora_on_a_linear_called_twice_is_one_adapter_for_both_calls():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return self.fc(self.fc(x))

    torch.manual_seed(0)
    model, x = Twice(), torch.randn(2, 4)
    result = fxs.apply(model, [fxs.Rewrite(fxs.AddLoRA(rank=2))], example_inputs=(x,))
    assert result.plan.matches[0].count == 2
    assert [n for n, _ in result.module.named_parameters()] == ["fc.weight", "fc.bias", "fc_lora.lora_a.weight",
                                                                 "fc_lora.lora_b.weight"]
    assert torch.equal(result.module(x), model(x))


# -- found by review -----------------------------------------------------------------------------------

class LinearRelu(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.act = nn.Linear(4, 4), nn.ReLU()

    def forward(self, x):
        return self.act(self.fc(x))


def test_a_replacement_that_wraps_a_matched_module_gets_a_copy():
    class Wrap(fxs.Pattern):
        pattern = (nn.Linear, nn.ReLU)

        def rewrite(self, linear, relu):
            return nn.Sequential(linear, nn.GELU())

    model = LinearRelu()
    saved = state_copy(model)
    result = fxs.apply(model, [fxs.Rewrite(Wrap()), fxs.Freeze("fc")], example_inputs=(torch.randn(2, 4),))
    assert result.module.fc[0].weight is not model.fc.weight and model.fc.weight.requires_grad
    assert result.report.entry("fc.0.weight").status == "transferred"
    assert_state_equal(model, saved)


def test_a_match_an_earlier_rule_rewired_is_left_alone():
    model = randomise_bn(ConvBN(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)))
    x = torch.randn(2, 3, 8, 8)
    result = fxs.apply(model, [fxs.Output("conv"), fxs.Rewrite(fxs.FoldBatchNorm, optional=True)], example_inputs=(x,))
    assert result.plan.matches[1].skipped == ["conv: an earlier rule made output read conv, inside the match"]
    assert torch.equal(result.module(x), model.conv(x))


def test_a_rule_on_a_node_an_earlier_rewrite_removed_conflicts():
    model = randomise_bn(ConvBN(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)))
    fold, insert = fxs.Rewrite(fxs.FoldBatchNorm), fxs.Insert(nn.Identity(), after="conv")
    with pytest.raises(fxs.MatchError) as err:
        fxs.apply(model, [fold, insert], example_inputs=(torch.randn(2, 3, 8, 8),))
    assert str(err.value) == (f"rule 2 'insert Identity() after conv' ({insert.origin}) conflicts with rule 1 'rewrite fold_bn "
                              f"(conv + batchnorm -> conv)' ({fold.origin}): node 'conv' was already rewritten; fix: drop one "
                              "of the two rules")


def test_what_a_fold_leaves_alone():
    train = ConvBN(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)).train()
    result = fxs.apply(train, [fxs.Rewrite(fxs.FoldBatchNorm, optional=True)], example_inputs=(torch.randn(2, 3, 8, 8),))
    assert result.plan.matches[0].skipped == ["conv (Conv2d) + bn (BatchNorm2d): BatchNorm2d is in training mode, where it "
                                              "normalises with batch statistics: call .eval() on the model before folding"]
    seq = randomise_bn(ConvBN(nn.Linear(8, 8), nn.BatchNorm1d(8)))      # [N, 8, 8]: BN normalises dim 1
    result = fxs.apply(seq, [fxs.Rewrite(fxs.FoldLinearBatchNorm, optional=True)], example_inputs=(torch.randn(2, 8, 8),))
    assert result.plan.matches[0].skipped == ["conv (Linear) + bn (BatchNorm1d): the Linear's output has 3 dimensions: "
                                              "BatchNorm1d then normalises dimension 1, not the Linear's features"]
    grouped = nn.Sequential(nn.Conv2d(3, 3, 3, groups=3), nn.Conv2d(3, 8, 1))
    result = fxs.apply(grouped, [fxs.Rewrite(fxs.AdaptInputChannels(1), optional=True)],
                       example_inputs=(torch.randn(2, 3, 8, 8),))
    assert result.plan.matches[0].count == 0   # the first convolution or none, never the second
    # a first convolution traced through (timm's StdConv2d computes its filters): it adapted the classifier,
    # a 1x1 convolution at the end, and failed on a shape there
    timm = pytest.importorskip("timm")
    model = nn.Sequential(timm.layers.StdConv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 1))
    result = fxs.apply(model, [fxs.Rewrite(fxs.AdaptInputChannels(1), optional=True)], example_inputs=(torch.randn(2, 3, 8, 8),))
    assert result.plan.matches[0].count == 0
    assert result.plan.matches[0].skipped == ["conv2d (conv2d): the first convolution is conv2d in '0', whose module computes its "
                                              "filters: Replace '0' by hand with a layer of 1 input channels"]


def test_a_chain_with_a_module_instance_gets_one_copy_per_match():
    rep = nn.Conv2d(8, 8, 3, padding=1)
    model = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8))
    result = fxs.apply(model.eval(), [fxs.Rewrite(fxs.Chain([nn.Conv2d, nn.BatchNorm2d], rep))],
                       example_inputs=(torch.randn(1, 8, 6, 6),))
    first, second = result.module.get_submodule("0"), result.module.get_submodule("2")
    assert first is not second and first is not rep and second is not rep


def test_a_dag_pattern_needs_the_calls_keywords_to_match():
    class Sum(fxs.Pattern):
        def pattern(self, x):
            return torch.sum(x)

        def rewrite(self, s):
            return torch.sum

    class M(nn.Module):
        def forward(self, x):
            return torch.sum(x, dim=1)

    result = fxs.apply(M(), [fxs.Rewrite(Sum(), optional=True)], example_inputs=(torch.randn(2, 4),))
    assert result.plan.matches[0].near == ["at sum_1 (sum): sum_1 (sum) is called with dim=, which the pattern does not name"]
    nothing = fxs.apply(nn.Sequential(nn.Linear(4, 4)), [fxs.Rewrite(GeluResidual(), optional=True)],
                        example_inputs=(torch.randn(2, 4),))
    assert nothing.plan.matches[0].reason == "nothing in the traced graphs has the shape of GeluResidual"


def test_a_module_also_called_by_opaque_code_is_not_folded():
    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.block = ConvBN(nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3))

        def forward(self, x):
            y = self.block(x)
            return y + self.block.conv(x) if y.sum() > 0 else y - self.block.conv(x)   # data-dependent: stays Python

    model = randomise_bn(Outer())
    x = torch.randn(2, 3, 8, 8)
    result = fxs.apply(model, [fxs.Rewrite(fxs.FoldBatchNorm, optional=True)], example_inputs=(x,))
    assert result.plan.matches[0].skipped == [
        "block.conv (Conv2d) + block.bn (BatchNorm2d): block.conv is called at 2 places and rewriting one would change "
        "the others; per_site: true gives each match its own copy"]
    with torch.no_grad():
        assert torch.equal(result.module(x), model(x))


def test_a_leaf_layer_with_a_forward_of_its_own_is_not_folded_or_adapted_as_the_plain_layer():
    """timm's BatchNormAct2d adds an activation, StdConv2d standardises its weight: as leaves they match
    the folds' types, and folding them as plain layers dropped the activation (max error 14 on efficientnet_b0).
    BatchNormAct2d is now folded knowingly: its dropout and activation stay after the folded convolution."""
    timm = pytest.importorskip("timm")
    model = timm.create_model("efficientnet_b0", pretrained=False, num_classes=5).eval()
    randomise_bn(model)
    x = torch.randn(2, 3, 64, 64)
    result = fxs.apply(model, fxs.load_rules("fold-bn"), example_inputs=(x,), leaf_types=(timm.layers.BatchNormAct2d,))
    with torch.no_grad():
        torch.testing.assert_close(result.module(x), model(x), rtol=1e-4, atol=1e-4)
    assert result.plan.matches[0].count == 49 and type(result.module.conv_stem[2]) is type(model.bn1.act)
    std = nn.Sequential(timm.layers.StdConv2d(3, 8, 3), nn.BatchNorm2d(8)).eval()
    with pytest.raises(fxs.MatchError) as err:   # input-channels is not optional: a stem it cannot adapt is an error
        fxs.apply(std, fxs.load_rules("input-channels", params={"channels": 1}), example_inputs=(torch.randn(2, 3, 8, 8),),
                  leaf_types=(timm.layers.StdConv2d,))
    assert err.value.full.endswith("matched nothing: every candidate was left alone: 0 (StdConv2d): StdConv2d has a forward of "
                                   "its own, not Conv2d's: rewriting it as one would lose what it adds; fix: correct the "
                                   "selector or add 'optional: true'")
    class Normed(nn.Conv2d):   # overrides _conv_forward, which Conv2d.forward calls: a fold would scale a weight it normalises
        def _conv_forward(self, x, w, b):
            return super()._conv_forward(x, w / w.norm(), b)

    normed = randomise_bn(nn.Sequential(Normed(3, 4, 3), nn.BatchNorm2d(4))).eval()
    x = torch.randn(2, 3, 8, 8)
    result = fxs.apply(normed, [fxs.Rewrite(fxs.FoldBatchNorm, optional=True)], example_inputs=(x,), leaf_types=(Normed,))
    assert result.plan.matches[0].skipped == ["0 (Normed) + 1 (BatchNorm2d): Normed has a forward of its own, not Conv2d's: "
                                              "rewriting it as one would lose what it adds"]
    assert torch.equal(result.module(x), normed(x))

    class MonteCarlo(nn.Dropout):   # drops in eval mode too: removing it changes what eval computes
        def forward(self, x):
            return F.dropout(x, self.p, training=True)

    model = nn.Sequential(nn.Linear(4, 4), MonteCarlo(0.5), nn.Dropout(0.5)).eval()
    x = torch.randn(2, 4)
    result = fxs.apply(model, fxs.load_rules("drop-dropout"), example_inputs=(x,))
    assert result.plan.matches[0].count == 1 and result.plan.matches[0].skipped == [
        "dropout (dropout): dropout is called with training=True (F.dropout's default), so it drops in eval mode too"]
    torch.manual_seed(0)
    expected = model(x)
    torch.manual_seed(0)
    assert torch.equal(result.module(x), expected)
    trained = fxs.apply(model.train(), fxs.load_rules("drop-dropout"), example_inputs=(x,))   # True in both modes: still kept
    assert trained.plan.matches[0].skipped == result.plan.matches[0].skipped

    class Leaf(nn.Dropout):
        def forward(self, x):
            return x * 2

    result = fxs.apply(nn.Sequential(Leaf()).eval(), [fxs.Rewrite(fxs.DropDropout, optional=True)], example_inputs=(x,),
                       leaf_types=(Leaf,))
    assert result.plan.matches[0].skipped == ["0 (Leaf): Leaf has a forward of its own, not Dropout's: rewriting it as one "
                                              "would lose what it adds"]
    assert torch.equal(result.module(x), x * 2)
    class Bare(nn.Module):   # F.dropout's training defaults to True; F.alpha_dropout's to False
        def forward(self, x):
            return F.dropout(x) + F.alpha_dropout(x)

    bare = fxs.apply(Bare().eval(), fxs.load_rules("drop-dropout"), example_inputs=(x,))
    assert bare.plan.matches[0].count == 1 and bare.plan.matches[0].skipped == [
        "dropout (dropout): dropout is called with training=True (F.dropout's default), so it drops in eval mode too"]
