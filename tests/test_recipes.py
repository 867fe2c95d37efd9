"""The fine-tuning walkthrough's recipes, each as a rule with exact numbers, in both result modes:
a regenerated graph module and the model's own class kept (`keep_class=True`)."""

import functools

import pytest
import torch
import torchvision
from conftest import Two, assert_state_equal, state_copy
from torch import nn

import fxsurgery as fxs
from fxsurgery import Delete, Detach, Freeze, Insert, Replace


@pytest.fixture(autouse=True, params=[False, True], ids=["graph", "kept class"])
def result_mode(request, monkeypatch):
    """Every recipe below runs in both result modes, with the same numbers."""
    monkeypatch.setattr(fxs, "apply", functools.partial(fxs.apply, keep_class=request.param))
    return request.param


def refused_when_kept(result_mode, run, rule: str, line: int, module: str, shapes: str):
    """A kept class runs its own code on the original's inputs: a rule that changes what the model
    takes (its first layer deleted or widened) is refused there, where a graph adapts the input."""
    if not result_mode:
        return run()
    with pytest.raises(fxs.ValidateError) as err:
        run()
    assert err.value.full == (f"{rule} (tests/test_recipes.py:{line}): after this rule, '{module}' (Linear) fails: RuntimeError: mat1 and mat2 "
                              f"shapes cannot be multiplied ({shapes}); fix: keep what that module passes on (its output's type and shape) as it was")
    return None


def sgd_step(module, params, x, target):
    opt = torch.optim.SGD(params, lr=0.001, momentum=0.9)
    loss = nn.functional.mse_loss(module(x), target)
    opt.zero_grad()
    loss.backward()
    opt.step()
    return opt


def test_delete_first_layer_passes_input_to_second(two, result_mode):
    saved = state_copy(two)
    result = refused_when_kept(result_mode, lambda: fxs.apply(two, [Delete("liner1")], example_inputs=(torch.randn(1, 3),)),
                               "rule 1 'delete liner1'", 46, "liner2", "1x3 and 2x1")
    if result is None:
        return
    x = torch.tensor([[2.0, 1.0]])
    w2, b2 = two.liner2.weight, two.liner2.bias
    expected = (x[0, 0] * w2[0, 0] + x[0, 1] * w2[0, 1] + b2[0]).reshape(1, 1)
    assert torch.equal(result.module(x), expected)
    assert result.report.dropped == ["liner1.weight", "liner1.bias"]
    assert result.report.transferred == ["liner2.weight", "liner2.bias"]
    assert result.report.new == []
    origin = result.rules[0].origin
    assert origin.file.endswith("test_recipes.py") and origin.line > 0
    assert [str(c) for c in result.input_changes] == [
        f"x: [1, 3] -> [1, 2] because rule 1 'delete liner1' ({origin}) deleted liner1, so its consumers read this input"]
    assert tuple(result.example_inputs[0].shape) == (1, 2)
    assert_state_equal(two, saved)


def test_surgered_model_trains_and_original_does_not_move(two, result_mode):
    saved = state_copy(two)
    result = refused_when_kept(result_mode, lambda: fxs.apply(two, [Delete("liner1")], example_inputs=(torch.randn(1, 3),)),
                               "rule 1 'delete liner1'", 67, "liner2", "1x3 and 2x1")
    if result is None:
        return
    w = result.module.liner2.weight
    before = w.detach().clone()
    x, target = torch.tensor([[2.0, 1.0]]), torch.tensor([[0.5]])
    sgd_step(result.module, result.module.parameters(), x, target)
    assert torch.equal(w.detach(), before.add(w.grad, alpha=-0.001))
    assert not torch.equal(w.detach(), before)
    assert_state_equal(two, saved)
    assert two.liner2.weight.grad is None


def test_freeze_first_layer(two):
    result = fxs.apply(two, [Freeze("liner1")], example_inputs=(torch.randn(1, 3),))
    m = result.module
    l1, l2 = m.liner1.weight.detach().clone(), m.liner2.weight.detach().clone()
    assert result.report.frozen == ["liner1.weight", "liner1.bias"]
    assert [id(p) for p in result.trainable_parameters()] == [id(m.liner2.weight), id(m.liner2.bias)]
    # Case 1: frozen parameters have no grad, so SGD skips them whether or not
    # they are in the optimizer: filtering makes no difference here.
    sgd_step(m, m.parameters(), torch.randn(4, 3), torch.randn(4, 1))
    assert torch.equal(m.liner1.weight, l1)
    assert not torch.equal(m.liner2.weight, l2)
    assert m.liner1.weight.grad is None


def test_freeze_matters_once_a_parameter_has_a_stale_grad(two):
    x, target = torch.randn(4, 3), torch.randn(4, 1)
    # Case 2, the naive recipe: train a step, then set requires_grad=False.
    naive = Two()
    naive.load_state_dict(two.state_dict())
    opt = torch.optim.SGD(naive.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1)
    nn.functional.mse_loss(naive(x), target).backward()
    opt.step()
    naive.liner1.requires_grad_(False)
    frozen_at = naive.liner1.weight.detach().clone()
    opt.zero_grad(set_to_none=False)  # the stale grad is a zero tensor, not None
    nn.functional.mse_loss(naive(x), target).backward()
    opt.step()
    assert not torch.equal(naive.liner1.weight, frozen_at)  # momentum and weight decay moved it
    # fxsurgery: the frozen parameter is a fresh tensor without grad, and the
    # optimizer gets only trainable_parameters().
    result = fxs.apply(naive, [Freeze("liner1")], example_inputs=(x,))
    m = result.module
    assert m.liner1.weight.grad is None
    opt = torch.optim.SGD(result.trainable_parameters(), lr=0.1, momentum=0.9, weight_decay=0.1)
    kept = m.liner1.weight.detach().clone()
    for _ in range(3):
        opt.zero_grad(set_to_none=False)
        nn.functional.mse_loss(m(x), target).backward()
        opt.step()
    assert torch.equal(m.liner1.weight, kept)


def test_detach_before_last_layer(three, result_mode):
    x = torch.randn(4, 3)
    result = fxs.apply(three, [Detach(before="liner3")], example_inputs=(x,))
    m = result.module
    assert torch.equal(m(x), three(x))
    before = {k: v.detach().clone() for k, v in m.named_parameters()}
    sgd_step(m, m.parameters(), x, torch.randn(4, 1))
    for name in ("liner1.weight", "liner1.bias", "liner2.weight", "liner2.bias"):
        assert m.get_parameter(name).grad is None, name
        assert torch.equal(m.get_parameter(name), before[name]), name
    last = next(n for n in before if n.startswith("liner3.") and n.endswith("weight"))  # kept: the detach wraps liner3
    assert not torch.equal(m.get_parameter(last), before[last])
    if not result_mode:
        assert [n.op for n in m.graph.nodes].count("call_method") == 1


def test_replace_first_layer_by_wider_one(two, result_mode):
    torch.manual_seed(1)
    wider = nn.Linear(4, 2)
    result = refused_when_kept(result_mode, lambda: fxs.apply(two, [Replace("liner1", wider)], example_inputs=(torch.randn(1, 3),)),
                               "rule 1 'replace liner1 with Linear(in_features=4, out_features=2, bias=True)'", 142, "liner1", "1x3 and 4x2")
    if result is None:
        return
    m = result.module
    assert torch.equal(m.liner2.weight, two.liner2.weight) and torch.equal(m.liner2.bias, two.liner2.bias)
    assert torch.equal(m.liner1.weight, wider.weight) and m.liner1 is not wider  # copied per match
    assert result.report.new == ["liner1.weight", "liner1.bias"]
    assert result.report.dropped == ["liner1.weight", "liner1.bias"]
    x = torch.randn(5, 4)
    assert torch.equal(m(x), two.liner2(wider(x)))
    assert str(result.input_changes[0]).startswith("x: [1, 3] -> [1, 4] because rule 1 'replace liner1 with Linear(")


def test_delete_then_insert_after(two, result_mode):
    torch.manual_seed(2)
    head = nn.Linear(1, 1)
    result = refused_when_kept(result_mode, lambda: fxs.apply(two, [Delete("liner1"), Insert(head, after="liner2")],
                                                              example_inputs=(torch.randn(1, 3),)),
                               "rule 2 'insert Linear(in_features=1, out_features=1, bias=True) after liner2'", 159, "liner2.module", "1x3 and 2x1")
    if result is None:
        return
    m = result.module
    assert result.report.transferred == ["liner2.weight", "liner2.bias"]
    assert result.report.new == ["liner2_linear.weight", "liner2_linear.bias"]
    assert {e.rule for e in result.report.entries if e.status == "new"} == {2}
    x = torch.randn(3, 2)
    assert torch.equal(m(x), head(two.liner2(x)))


@pytest.mark.parametrize("factory, in_features", [(torchvision.models.resnet18, 512), (torchvision.models.resnet50, 2048)])
def test_resnet_new_head_and_frozen_backbone(factory, in_features):
    torch.manual_seed(0)
    model = factory(weights=None).eval()
    saved = state_copy(model)
    result = fxs.apply(model, [Replace("fc", fxs.new(nn.Linear, out_features=10)),
                               Freeze("*", exclude=["layer4.*", "fc"])],
                       example_inputs=(torch.randn(1, 3, 64, 64),))
    m = result.module
    assert (m.fc.in_features, m.fc.out_features) == (in_features, 10)
    assert m(torch.randn(3, 3, 64, 64)).shape == (3, 10)
    original = model.state_dict()
    for name, t in m.state_dict().items():
        if not name.startswith("fc."):
            assert torch.equal(t, original[name]), name
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("layer4.", "fc.")) for n in trainable)
    assert trainable == {n for n, _ in m.named_parameters() if n.startswith(("layer4.", "fc."))}
    assert result.report.new == ["fc.weight", "fc.bias"]
    assert_state_equal(model, saved)
    assert all(p.requires_grad for p in model.parameters())
