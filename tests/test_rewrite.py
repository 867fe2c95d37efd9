"""Selectors, rewrites and their errors, each with a must-not-match twin."""

import copy
import re

import pytest
import torch
import torchvision
from torch import nn
from torch.nn import functional as F

import fxsurgery as fxs
from fxsurgery import Delete, Detach, Freeze, Insert, Replace
from fxsurgery.errors import bounded


def line_of(rule):
    return f"{rule.origin.file}:{rule.origin.line}"


class Chain(nn.Module):
    """Linear(3, 4) -> Linear(4, 2) -> Linear(2, 1), with a view and a size call."""

    def __init__(self):
        super().__init__()
        self.liner1 = nn.Linear(3, 4)
        self.liner2 = nn.Linear(4, 2)
        self.liner3 = nn.Linear(2, 1)

    def forward(self, x):
        h = self.liner2(self.liner1(x))
        h = h.view(x.size(0), -1)
        return self.liner3(F.relu(h))


@pytest.fixture
def chain():
    torch.manual_seed(0)
    return Chain()


def graph_ops(module):
    return [(n.op, str(n.target)) for n in module.graph.nodes]


X = (torch.randn(2, 3, 64, 64),)


# -- selectors: each kind, then a twin that matches nothing and changes nothing --

@pytest.mark.parametrize("selector, sites", [
    ("layer1.*", ["layer1.0", "layer1.1"]),                       # outermost modules only
    ("re:layer[12]\\.0\\.conv1", ["layer1.0.conv1", "layer2.0.conv1"]),
    (nn.BatchNorm2d, ["bn1"] + [f"layer{i}.{j}.bn{k}" for i in range(1, 5) for j in (0, 1) for k in (1, 2)][:1]),
    (torch.flatten, ["flatten"]),
    ("add_*", [f"add_{i}" for i in range(1, 8)]),
])
def test_selector_kinds(resnet18, selector, sites):
    result = fxs.apply(resnet18, [Detach(after=selector)], example_inputs=X)
    got = [s.key for s in result.plan.matches[0].sites]
    assert got[:len(sites)] == sites
    if selector is nn.BatchNorm2d:
        assert len(got) == 20  # bn1 + 2 per block x 8 + 1 per downsample x 3
    else:
        assert len(got) == len(sites)
    assert sum(1 for n in result.module.graph.nodes if n.target == "detach") == len(got)


def test_method_selector(chain):
    result = fxs.apply(chain, [Detach(after="method:view")], example_inputs=(torch.randn(2, 3),))
    assert [s.key for s in result.plan.matches[0].sites] == ["view"]
    assert torch.equal(result.module(torch.ones(2, 3)), chain(torch.ones(2, 3)))


@pytest.mark.parametrize("selector", ["layer9.*", "re:nothing\\d", nn.GELU, torch.relu, "method:permute"])
def test_selector_twin_matches_nothing_and_changes_nothing(resnet18, selector):
    resnet18.eval()
    result = fxs.apply(resnet18, [Detach(after=selector, optional=True)], example_inputs=X)
    assert result.plan.matches[0].count == 0 and result.plan.matches[0].reason
    assert graph_ops(result.module) == graph_ops(torch.fx.symbolic_trace(resnet18))
    result.module.eval()
    assert torch.equal(result.module(X[0]), resnet18(X[0]))


# -- replace ------------------------------------------------------------------

def test_replace_module_type_by_function_equals_module_form(resnet18):
    resnet18.eval()
    as_function = fxs.apply(resnet18, [Replace(nn.ReLU, F.gelu)], example_inputs=X).module.eval()
    as_module = fxs.apply(resnet18, [Replace(nn.ReLU, nn.GELU())], example_inputs=X).module.eval()
    assert sum(1 for n in as_function.graph.nodes if n.target is F.gelu) == 17
    assert not any(isinstance(m, nn.ReLU) for m in as_function.modules())
    assert torch.equal(as_function(X[0]), as_module(X[0]))


def test_replace_and_delete_a_traced_through_block_equal_the_hand_edit(resnet18):
    resnet18.eval()
    by_hand = copy.deepcopy(resnet18)
    by_hand.layer4[1] = nn.Identity()
    replaced = fxs.apply(resnet18, [Replace("layer4.1", nn.Identity())], example_inputs=X)
    deleted = fxs.apply(resnet18, [Delete("layer4.1")], example_inputs=X)
    for result in (replaced, deleted):
        result.module.eval()
        assert torch.equal(result.module(X[0]), by_hand(X[0]))
        assert not any(n.startswith("layer4.1.") for n in result.module.state_dict())
    assert len(deleted.report.dropped) == 12  # conv1, bn1 (5 tensors), conv2, bn2 (5 tensors)


def test_replace_function_calls_by_module(chain):
    result = fxs.apply(chain, [Replace(F.relu, nn.GELU())], example_inputs=(torch.randn(2, 3),))
    x = torch.randn(2, 3)
    assert isinstance(result.module.get_submodule("relu"), nn.GELU)
    assert torch.equal(result.module(x), chain.liner3(F.gelu(chain.liner2(chain.liner1(x)))))


def test_new_infers_shape_arguments(resnet18):
    result = fxs.apply(resnet18, [Insert(fxs.new(nn.BatchNorm2d), after="layer2"),
                                  Replace("fc", fxs.new(nn.Linear, out_features=3, bias=False))], example_inputs=X)
    m = result.module
    assert m.layer2_batch_norm2d.num_features == 128
    assert (m.fc.in_features, m.fc.out_features, m.fc.bias) == (512, 3, None)


def test_insert_before_reads_the_edge_into_the_node(two):
    torch.manual_seed(3)
    scale = nn.Linear(2, 2)
    result = fxs.apply(two, [Insert(scale, before="liner2")], example_inputs=(torch.randn(1, 3),))
    x = torch.randn(4, 3)
    assert torch.equal(result.module(x), two.liner2(scale(two.liner1(x))))
    assert result.module.liner2_linear is not scale


def test_detach_on_one_edge_leaves_the_other_path_trainable():
    class Fork(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem, self.a, self.b = nn.Linear(2, 2), nn.Linear(2, 1), nn.Linear(2, 1)

        def forward(self, x):
            h = self.stem(x)
            return self.a(h) + self.b(h)

    torch.manual_seed(0)
    model = Fork()
    result = fxs.apply(model, [Detach(before="a")], example_inputs=(torch.randn(1, 2),))
    m = result.module
    x = torch.randn(3, 2)
    m(x).sum().backward()
    assert m.stem.weight.grad is not None and m.a.weight.grad is not None
    # The stem's gradient now comes through b alone.
    reference = copy.deepcopy(model)
    (reference.b(reference.stem(x))).sum().backward()
    assert torch.equal(m.stem.weight.grad, reference.stem.weight.grad)


# -- errors -------------------------------------------------------------------

def test_no_match_names_the_rule_and_the_closest_names(resnet18):
    rule = Replace("fcc", nn.Identity())
    with pytest.raises(fxs.MatchError) as err:
        fxs.apply(resnet18, [rule], example_inputs=X)
    assert str(err.value) == (f"rule 1 'replace fcc with Identity()' ({line_of(rule)}) matched nothing: "
                              "no module path or node name matches 'fcc'; closest: fc; "
                              "fix: correct the selector or add 'optional: true'")


def test_no_match_in_a_wrapped_model_offers_the_path_under_the_wrapper(resnet18):
    # nn.DataParallel (or any wrapper) holds the model as `module`: `fc` is `module.fc`, which spelling did not find
    rule = Replace("fc", nn.Identity())
    with pytest.raises(fxs.MatchError) as err:
        fxs.apply(nn.DataParallel(resnet18), [rule], example_inputs=X)
    assert str(err.value) == (f"rule 1 'replace fc with Identity()' ({line_of(rule)}) matched nothing: "
                              "no module path or node name matches 'fc'; closest: module.fc; "
                              "fix: correct the selector or add 'optional: true'")
    result = fxs.apply(nn.DataParallel(resnet18), [Replace("module.fc", fxs.new(nn.Linear, out_features=3))], example_inputs=X)
    y = torch.randn(3, 3, 32, 32)
    result.module.eval(), resnet18.eval()
    features = nn.Sequential(*list(resnet18.children())[:-1])
    assert torch.equal(result.module(y), result.module.module.fc(features(y).flatten(1)))


def test_no_match_by_type_lists_the_types_present(two):
    rule = Delete(nn.Dropout)
    with pytest.raises(fxs.MatchError) as err:
        fxs.apply(two, [rule], example_inputs=(torch.randn(1, 3),))
    assert str(err.value) == (f"rule 1 'delete torch.nn.Dropout' ({line_of(rule)}) matched nothing: "
                              "no module of type Dropout (types present: Linear, M); "
                              "fix: correct the selector or add 'optional: true'")


def test_conflicting_rules(resnet18):
    first, second = Delete("fc"), Replace("fc", nn.Identity())
    with pytest.raises(fxs.MatchError) as err:
        fxs.apply(resnet18, [first, second], example_inputs=X)
    assert str(err.value) == (f"rule 2 'replace fc with Identity()' ({line_of(second)}) conflicts with "
                              f"rule 1 'delete fc' ({line_of(first)}): node 'fc' was already deleted; "
                              "fix: drop one of the two rules")


def test_two_patterns_on_one_conv_say_what_each_order_leaves(resnet18):
    """fold-bn and input-channels both rewrite conv1, and each rule sees the original graph: adapting first leaves
    conv1's BatchNorm unfolded (a warning, not silence); folding first makes the adapt conflict, whose fix says so."""
    adapt, fold = fxs.Rewrite(fxs.AdaptInputChannels(1)), fxs.Rewrite(fxs.FoldBatchNorm)
    model = resnet18.eval()
    with pytest.warns(fxs.SurgeryWarning) as caught:
        result = fxs.apply(model, [adapt, fold], example_inputs=X)
    assert [str(w.message) for w in caught] == [
        f"rule 2 'rewrite fold_bn (conv + batchnorm -> conv)' ({line_of(fold)}) left conv1 as it is: rule 1 "
        f"'rewrite adapt_input_channels -> 1' ({line_of(adapt)}) rewrote it first, and a rule sees the original graph; fix: apply "
        "this rule to the first surgery's result (fxs.apply(result.module, rules), or its saved directory)"]
    assert [n for n, m in result.module.named_modules() if isinstance(m, nn.BatchNorm2d)] == ["bn1"]
    grey = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        assert torch.allclose(result.module(grey), model(grey.expand(-1, 3, -1, -1)), atol=1e-4, rtol=0)
    with pytest.raises(fxs.MatchError) as err:
        fxs.apply(model, [fold, adapt], example_inputs=X)
    assert err.value.full == (f"rule 2 'rewrite adapt_input_channels -> 1' ({line_of(adapt)}) conflicts with rule 1 'rewrite fold_bn "
                              f"(conv + batchnorm -> conv)' ({line_of(fold)}): node 'conv1' was already rewritten; fix: apply "
                              "this rule to the first surgery's result (fxs.apply(result.module, rules), or its saved directory), "
                              "or drop one of the two rules")
    second = fxs.apply(fxs.apply(model, [fold], example_inputs=X).module, [adapt], example_inputs=X)  # the fix, followed
    assert not any(isinstance(m, nn.BatchNorm2d) for m in second.module.modules())
    with torch.no_grad():
        assert torch.allclose(second.module(grey), model(grey.expand(-1, 3, -1, -1)), atol=1e-4, rtol=0)


def test_delete_of_a_node_with_two_inputs(resnet18):
    rule = Delete("add")
    with pytest.raises(fxs.RewriteError) as err:
        fxs.apply(resnet18, [rule], example_inputs=X)
    assert str(err.value) == (f"rule 1 'delete add' ({line_of(rule)}) at 'add': it reads 2 tensors "
                              "(layer1_0_bn2, maxpool), so there is no single input to pass on; "
                              "fix: replace it instead, or select a node with one input")


def test_delete_that_breaks_a_consumer_names_rule_and_node(chain):
    rule = Delete("liner2")
    with pytest.raises(fxs.ValidateError) as err:
        fxs.apply(chain, [rule], example_inputs=(torch.randn(2, 3),))
    assert str(err.value) == (f"rule 1 'delete liner2' ({line_of(rule)}) at node 'liner3' [call_module]: "
                              "Linear(in_features=2, out_features=1, bias=True) does not fit the incoming shape [2, 4]; "
                              "fix: replace this layer too (fxs.new infers its input size), or insert a layer that maps the shape")


def test_a_layer_a_later_rule_replaces_may_stop_fitting_in_between(resnet18):
    # Delete("layer4") leaves fc (512 inputs) fed 256 features; the next rule's new head infers 256. The shape
    # pass for that rule failed at the old fc, and the Delete was refused with "replace this layer too"
    model = resnet18.eval()
    x = torch.randn(2, 3, 64, 64)
    result = fxs.apply(model, [Delete("layer4"), Replace("fc", fxs.new(nn.Linear, out_features=10))], example_inputs=(x[:1],))
    head = result.module.get_submodule("fc")
    assert (head.in_features, head.out_features) == (256, 10)
    by_hand = copy.deepcopy(model)
    by_hand.layer4, by_hand.fc = nn.Identity(), head
    assert torch.equal(result.module(x), by_hand(x))
    alone = Delete("layer4")
    with pytest.raises(fxs.ValidateError) as err:  # with no rule after it to replace fc, it is still refused
        fxs.apply(model, [alone], example_inputs=(x[:1],))
    assert str(err.value) == (f"rule 1 'delete layer4' ({line_of(alone)}) at node 'fc' [call_module]: Linear(in_features=512, "
                              "out_features=1000, bias=True) does not fit the incoming shape [1, 256]; fix: replace this layer too "
                              "(fxs.new infers its input size), or insert a layer that maps the shape")


def test_a_new_layer_sized_before_a_later_rule_changed_its_input_says_to_reorder_the_rules(resnet18):
    # the error named only the Replace and told the user to use fxs.new, which they had
    head = Replace("fc", fxs.new(nn.Linear, out_features=10))
    x = torch.randn(1, 3, 64, 64)
    with pytest.raises(fxs.ValidateError) as err:
        fxs.apply(resnet18, [head, Delete("layer4")], example_inputs=(x,))
    assert str(err.value) == (f"rule 1 'replace fc with Linear(out_features=10)' ({line_of(head)}) at node 'fc' [call_module]: "
                              "what reaches it is now [1, 256], changed by rule 2 'delete layer4' after this rule sized it; "
                              "fix: put rule 1 after rule 2 (fxs.new then infers the new size), or set it to match [1, 256]")


def _overcommits() -> bool:
    try:
        with open("/proc/sys/vm/overcommit_memory") as f:
            return f.read().strip() == "1"  # allocations always succeed, and touching the pages kills the process
    except OSError:
        return True


@pytest.mark.skipif(_overcommits(), reason="this kernel hands out any amount of memory until it is touched")
def test_a_new_layer_too_large_for_memory_says_so():
    rule = Replace("0", fxs.new(nn.Linear, out_features=10**11))
    with pytest.raises(fxs.RewriteError) as err:
        fxs.apply(nn.Sequential(nn.Linear(4, 3)), [rule], example_inputs=(torch.randn(2, 4),))
    assert str(err.value).startswith(f"rule 1 'replace 0 with Linear(out_features=100000000000)' ({line_of(rule)}) at '0': ")
    # measured on the meta device before anything is allocated (the allocator's "Cannot allocate memory" came after)
    assert re.search(r"torch.nn.Linear\(out_features=100000000000, in_features=4\) would hold 1862.6 GiB of tensors, more than half "
                     r"this machine's memory \(\d+\.\d GiB\); fix: give sizes that fit$", str(err.value)), str(err.value)


def test_replace_whose_shape_cannot_fit(chain):
    rule = Replace("liner2", nn.Linear(5, 2))
    with pytest.raises(fxs.ValidateError) as err:
        fxs.apply(chain, [rule], example_inputs=(torch.randn(2, 3),))
    assert str(err.value) == bounded(f"rule 1 'replace liner2 with Linear(in_features=5, out_features=2, bias=True)' ({line_of(rule)}) "
                                     "at node 'liner2' [call_module]: Linear(in_features=5, out_features=2, bias=True) does not fit "
                                     "the incoming shape [2, 4]; fix: drop the shape argument and let it be inferred (fxs.new), "
                                     "or set it to match [2, 4]")


def test_detach_of_a_value_that_is_not_a_tensor(chain):
    rule = Detach(after="method:size")
    with pytest.raises(fxs.RewriteError) as err:
        fxs.apply(chain, [rule], example_inputs=(torch.randn(2, 3),))
    assert str(err.value) == (f"rule 1 'detach after method:size' ({line_of(rule)}) at 'size': value 'size' has type int, "
                              "not Tensor; only tensors carry gradients; fix: detach a node whose value is a tensor")


def test_freeze_of_a_module_without_parameters_warns(resnet18):
    rule = Freeze("relu")
    with pytest.warns(fxs.SurgeryWarning) as caught:
        result = fxs.apply(resnet18, [rule], example_inputs=X)
    assert [str(w.message) for w in caught] == [f"rule 1 'freeze relu' ({line_of(rule)}): relu has no parameters; nothing to freeze"]
    assert result.report.frozen == []


def test_rule_arguments_are_checked_when_built():
    with pytest.raises(fxs.RuleError, match=r"needs exactly one of after= or before=; fix: write insert\(after='layer3'\)"):
        Insert(nn.ReLU())
    with pytest.raises(fxs.RuleError, match=r"torch.nn.Linear does not take 'outfeatures'; fix: use its arguments \(in_features, out_features, bias\)"):
        fxs.new(nn.Linear, outfeatures=3)
    with pytest.raises(fxs.RuleError, match=r"unknown weights policy 'copy'; fix: use one of new, keep, slice, pad, adapt_input_channels"):
        Replace("fc", nn.Identity(), weights="copy")
    with pytest.raises(fxs.RuleError, match=r"bad regular expression 're:\(': "):
        Delete("re:(")


def test_replace_keep_copies_matching_weights(resnet18):
    result = fxs.apply(resnet18, [Replace("fc", nn.Linear(512, 1000), weights="keep")], example_inputs=X)
    assert torch.equal(result.module.fc.weight, resnet18.fc.weight)
    assert result.report.new == [] and result.report.dropped == []
    rule = Replace("fc", nn.Linear(512, 10), weights="keep")
    with pytest.raises(fxs.TransferError) as err:
        fxs.apply(resnet18, [rule], example_inputs=X)
    assert str(err.value) == (f"rule 1 'replace fc with Linear(in_features=512, out_features=10, bias=True)' ({line_of(rule)}): "
                              "weights 'keep' cannot fill fc.weight [10, 512]: the replaced module has [1000, 512] there; fix: use weights: new")


def test_freeze_by_type_and_rule_order(resnet18):
    result = fxs.apply(resnet18, [Freeze(nn.BatchNorm2d), Replace("bn1", fxs.new(nn.BatchNorm2d))], example_inputs=X)
    frozen = set(result.report.frozen)
    assert len(frozen) == 19 * 2  # 20 BatchNorms x (weight, bias), less the bn1 made after the freeze
    assert "bn1.weight" not in frozen and "layer1.0.bn1.weight" in frozen


def test_a_replacement_of_another_dtype_than_the_model_is_refused_at_apply():
    """A float32 Linear in a bfloat16 model: fake tensors propagate the mix, the first real call refused it.
    A norm takes bfloat16 into float32 weights, so an inserted float32 LayerNorm stays allowed."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval().to(torch.bfloat16)
    x = torch.randn(2, 3, 32, 32, dtype=torch.bfloat16)
    rule = fxs.Replace("fc", nn.Linear(512, 10))
    with pytest.raises(fxs.ValidateError) as err:
        fxs.apply(model, [rule], (x,))
    assert str(err.value) == (f"rule 1 'replace fc with Linear(in_features=512, out_features=10, bias=True)' ({rule.origin}) at node "
                              "'fc': Linear holds float32 weights and receives bfloat16; fix: build it in bfloat16 "
                              "(.to(torch.bfloat16)), or with fxs.new, which takes the model's dtype")
    result = fxs.apply(model, [fxs.Replace("fc", fxs.new(nn.Linear, out_features=10))], (x,))
    assert result.module.fc.weight.dtype == torch.bfloat16 and result.module(x).dtype == torch.bfloat16
    norm = nn.LayerNorm(512)
    result = fxs.apply(model, [fxs.Insert(norm, before="fc")], (x,))
    with torch.no_grad():
        features = torch.flatten(model.avgpool(model.layer4(model.layer3(model.layer2(model.layer1(
            model.maxpool(model.relu(model.bn1(model.conv1(x))))))))), 1)
        assert torch.equal(result.module(x), model.fc(norm(features)))


def test_a_pattern_after_prune_leaves_the_pruned_layers_as_prune_made_them():
    """prune-half then fold-bn: the fold computed from the original convolutions and put them back at full width,
    undoing the prune without a word. It now leaves what Prune made, says so, and folds the rest."""
    from conftest import RULES

    from fxsurgery.spec import load_rule_files
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    x = torch.randn(2, 3, 64, 64)
    prune, fold = load_rule_files([f"{RULES}/prune-half.yaml", f"{RULES}/fold-bn.yaml"], {}, ())
    pruned = fxs.apply(model, list(prune), example_inputs=(x,))
    with pytest.warns(fxs.SurgeryWarning) as caught:
        both = fxs.apply(model, [*prune, *fold], example_inputs=(x,))
    assert str(caught[0].message) == (
        f"rule 2 'rewrite fold_bn (conv + batchnorm -> conv)' ({RULES}/fold-bn.yaml:11) left layer1.0.conv1, layer1.0.conv2, "
        f"layer1.1.conv1 and more as they are: rule 1 'prune re:layer\\d\\.\\d+\\.conv1 amount=0.5 (l1)' ({RULES}/prune-half.yaml:7) "
        "changed them first, and a pattern computes from the original modules; fix: apply this rule to the first surgery's result "
        "(fxs.apply(result.module, rules), or its saved directory)")
    assert both.module.get_submodule("layer1.0.conv1").out_channels == 32 == pruned.module.get_submodule("layer1.0.conv1").out_channels
    assert not hasattr(both.module, "bn1")  # the stem's BatchNorm, which no prune reached, is folded
    with torch.no_grad():
        assert torch.allclose(both.module(x), pruned.module(x), atol=1e-5, rtol=0)
    rule = fxs.Rewrite(fxs.AdaptInputChannels(1))
    with pytest.raises(fxs.RewriteError) as err:
        fxs.apply(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 1)), [fxs.Prune("0", channels=[0, 5]), rule],
                  example_inputs=(torch.randn(2, 3, 8, 8),))
    assert err.value.full.endswith("changed it first, and a pattern computes from the original modules; fix: apply this rule to the "
                                   "first surgery's result (fxs.apply(result.module, rules), or its saved directory), or drop one of "
                                   "the two rules")


def test_insert_after_a_layer_called_at_two_places_says_each_gets_its_own_weights():
    """torchvision's BasicBlock calls self.relu twice: an Insert makes one layer per call, unlike a hand-made wrapper."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=4).eval()
    x = torch.randn(2, 3, 64, 64)
    with pytest.warns(fxs.SurgeryWarning):
        result = fxs.apply(model, [fxs.Insert(nn.PReLU(), after="layer1.*.relu")], example_inputs=(x,))
    assert result.report.new == ["layer1.0.relu_pre_lu.weight", "layer1.0.relu_pre_lu_1.weight",
                                 "layer1.1.relu_pre_lu.weight", "layer1.1.relu_pre_lu_1.weight"]
    assert [re.sub(r" \(tests/test_rewrite\.py:\d+\)", "", w) for w in result.plan.warnings if "places" in w] == [
        "rule 1 'insert PReLU(num_parameters=1) after layer1.*.relu': the forward calls 'layer1.0.relu' at 2 places, "
        "so each gets its own new layer with its own weights (layer1.0.relu_pre_lu, layer1.0.relu_pre_lu_1) (and 1 more layers "
        "called at several places); to share one, replace 'layer1.0.relu' with nn.Sequential(it, the new layer)"]
    assert torch.allclose(result.module(x), model(x), atol=1e-5, rtol=0)  # PReLU(0.25) after ReLU is the identity
    plain = fxs.apply(model, [fxs.Insert(nn.Hardtanh(0, 100), after="layer1.0.relu")], example_inputs=(x,))
    assert not [w for w in plain.plan.warnings if "places" in w]  # nothing to share
