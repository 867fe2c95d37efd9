"""What the forward runs with gradients off (`torch.no_grad`, `@torch.no_grad()`, `torch.set_grad_enabled(False)`,
`torch.inference_mode`) gets no gradient in the result either, and a `torch.autocast` region keeps its dtypes.

torch.fx records neither: an EMA teacher traced as plain nodes got gradients, and an optimizer step moved it."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import fxsurgery as fxs
from fxsurgery import Freeze, Replace


class Blocked(nn.Module):
    def __init__(self):
        super().__init__()
        self.teacher, self.student, self.head = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x):
        with torch.no_grad():
            t = self.teacher(x)  # targets: never trained by backprop
        return self.head(self.student(x) + t)


class Decorated(Blocked):
    @torch.no_grad()
    def targets(self, x):
        return torch.relu(self.teacher(x))

    def forward(self, x):
        return self.head(self.student(x) + self.targets(x))


class Switched(Blocked):
    def forward(self, x):
        with torch.set_grad_enabled(False):
            t = self.teacher(x) * self.student.weight.sum()  # a parameter used again outside: cut here only
        return self.head(self.student(x) + t)


class Inference(Blocked):
    def forward(self, x):
        with torch.inference_mode():
            t = self.teacher(x).clone()
        return self.head(self.student(x) + t.clone())


class Center(nn.Module):
    """DINO's centre: a buffer updated in place with gradients off, from a module that trains."""

    def __init__(self):
        super().__init__()
        self.teacher, self.student = nn.Linear(4, 4), nn.Linear(4, 4)
        self.register_buffer("center", torch.zeros(4))

    def forward(self, x):
        with torch.no_grad():
            t = self.teacher(x) - self.center
            self.center.mul_(0.9).add_(0.1 * self.student(x).mean(0))
        return (self.student(x) - t).pow(2).mean()


class Picked(nn.Module):
    """A value picked out of a tuple made before the region: half of proj's output gets no gradient there."""

    def __init__(self):
        super().__init__()
        self.proj, self.head = nn.Linear(4, 8), nn.Linear(4, 4)

    def forward(self, x):
        parts = self.proj(x).chunk(2, -1)
        with torch.no_grad():
            target = parts[0] * 2
        return self.head(parts[1]) + target


class States(nn.Module):
    """A module's nested tuple of outputs read in the region and after it: out, (h, c) = self.lstm(x)."""

    def __init__(self):
        super().__init__()
        self.lstm, self.head = nn.LSTM(4, 4, batch_first=True), nn.Linear(4, 4)

    def forward(self, x):
        with torch.no_grad():
            out, (h, c) = self.lstm(x)
        return self.head(out[:, -1] + h[0] + c[0])


def _grads(module: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    out = module(x)
    out.sum().backward()
    return out, {n: p.grad for n, p in module.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("cls", [Blocked, Decorated, Switched, Inference, Center, Picked, States])
def test_a_region_without_gradients_stays_without(cls, tmp_path):
    torch.manual_seed(0)
    model = cls()
    x = torch.randn(3, 2, 4) if cls is States else torch.randn(3, 4)
    kept = cls in (Center, Picked, States)  # no head of 2 outputs to swap in: a layer inserted instead
    result = fxs.apply(model, [fxs.Insert(nn.Identity(), after="teacher" if cls is Center else "head")] if kept else
                       [Replace("head", fxs.new(nn.Linear, out_features=2))], example_inputs=(x,))
    if not kept:
        result.module.head.load_state_dict(model.head.state_dict())
    result.save(tmp_path / "o")
    cut = {Picked: "head.weight", States: "lstm.weight_ih_l0"}.get(cls, "teacher.weight")
    assert result.gradient_flow.status[cut] == ("trainable" if cls is Picked else "cut")  # proj trains by its other half
    x = torch.randn(5, 2, 4) if cls is States else torch.randn(5, 4)
    expected, grads = _grads(copy.deepcopy(model), x)
    assert sorted(grads) == sorted(n for n, _ in model.named_parameters() if not n.startswith(("teacher", "lstm")))
    for made in (result.module, fxs.load(tmp_path / "o"), fxs.load(tmp_path / "o", trust_code=True)):
        before = copy.deepcopy(made.state_dict())
        out, got = _grads(made, x)
        # CPU's LSTM takes another kernel when no gradient is wanted, which the graph (detached, not switched) does not
        same = (lambda a, b: torch.allclose(a, b, rtol=0, atol=1e-6)) if cls is States else torch.equal
        assert same(out, expected)
        assert sorted(got) == sorted(grads) and all(same(got[n], grads[n]) for n in grads)
        if cls is Center:  # updated in place as the original updates it, and no gradient kept on it
            assert torch.equal(made.center, 0.9 * before["center"] + 0.1 * model.student(x).mean(0).detach())
            assert not made.center.requires_grad
        with torch.no_grad():  # called under no_grad, the region's end does not turn gradients back on
            assert not made(x).requires_grad


class Island(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(16, 16), nn.Linear(16, 16)

    def forward(self, x):
        y = self.a(x)
        with torch.autocast("cpu", enabled=False):
            y = self.b(y.float())  # kept in float32 under mixed precision
        return y


def test_an_autocast_region_keeps_its_dtypes():
    torch.manual_seed(0)
    model = Island()
    result = fxs.apply(model, [Freeze("a")], example_inputs=(torch.randn(2, 16),))
    line = next(i for i, text in enumerate(open(__file__), start=1) if 'with torch.autocast("cpu", enabled=False)' in text)
    assert result.coverage()["opaque"] == {"": "TraceError: the code enters torch.autocast, whose dtypes a graph does not hold "
                                               f"(at tests/test_grad_regions.py:{line})"}
    x = torch.randn(4, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, expected = result.module(x), model(x)
    assert got.dtype == expected.dtype == torch.float32 and torch.equal(got, expected)


class TrainSwitch(nn.Module):
    """The backbone trains only in train mode: `with torch.set_grad_enabled(self.training)`."""

    def __init__(self):
        super().__init__()
        self.backbone, self.head = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x):
        with torch.set_grad_enabled(self.training):
            f = self.backbone(x)
        return self.head(f)


def test_a_region_only_the_other_mode_has_is_kept_in_that_mode():
    """Captured in train mode, the eval graph (traced again for the other mode) needs example values to cut its
    region: a call in eval mode failed "cannot be traced in eval mode" before."""
    torch.manual_seed(0)
    model = TrainSwitch()
    result = fxs.apply(model, [fxs.Insert(nn.Identity(), after="head")], example_inputs=(torch.randn(3, 4),))
    x = torch.randn(5, 4)
    for mode, trained in ((True, ["backbone.bias", "backbone.weight", "head.bias", "head.weight"]), (False, ["head.bias", "head.weight"])):
        expected, grads = _grads(copy.deepcopy(model).train(mode), x)
        out, got = _grads(result.module.train(mode), x)
        assert torch.equal(out, expected) and sorted(got) == sorted(grads) == trained
        assert all(torch.equal(got[n], grads[n]) for n in grads)
        result.module.zero_grad(set_to_none=True)


class Averaged(nn.Module):
    """An EMA teacher updated in the forward the usual way, through .parameters(): real tensors while tracing."""

    def __init__(self):
        super().__init__()
        self.student, self.teacher, self.head = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x):
        with torch.no_grad():
            for pt, ps in zip(self.teacher.parameters(), self.student.parameters()):
                pt.mul_(0.5).add_(ps, alpha=0.5)
            t = self.teacher(x)
        return self.head(self.student(x) - t)


def test_a_forward_writing_to_its_parameters_while_traced_stays_python_and_the_model_unchanged():
    """The loop ran for real on the model given while it was traced (apply changed the user's teacher), and the
    graph held no update: every call then differed from the original's."""
    torch.manual_seed(0)
    model = Averaged()
    before = copy.deepcopy(model.state_dict())
    result = fxs.apply(model, [Freeze("head")], example_inputs=(torch.randn(3, 4),))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert result.coverage()["opaque"][""].startswith("TraceError: the code writes to a parameter or buffer in place (mul_.Tensor)")
    reference = copy.deepcopy(model)
    x = torch.randn(5, 4)
    for _ in range(3):  # the teacher moves towards the student at every call, as in the original
        assert torch.equal(result.module(x), reference(x))
        assert torch.equal(result.module.teacher.weight, reference.teacher.weight)


def test_an_output_made_in_a_region_gives_no_gradient_as_there():
    """`Output` of the teacher, called under no_grad: the value the region gives, which trains nothing (it returned
    the teacher's own output, and a loss on it moved the teacher)."""
    torch.manual_seed(0)
    model, x = Blocked(), torch.randn(3, 4)
    features = fxs.apply(model, [fxs.Output({"teacher": "t", "student": "s"})], example_inputs=(x,)).module
    out = features(x)
    with torch.no_grad():
        want_t = model.teacher(x)
    assert torch.equal(out["t"], want_t) and torch.equal(out["s"], model.student(x))
    assert (out["t"].requires_grad, out["s"].requires_grad) == (False, True)
    (out["s"] + out["t"]).sum().backward()  # a loss on both: only the student learns
    assert features.teacher.weight.grad is None and features.student.weight.grad is not None


def test_an_output_of_a_tuple_made_in_a_region_is_refused_and_its_tensors_are_cut():
    """An LSTM teacher under no_grad: its (out, (h, c)) left the region whole, with gradients, through an Output."""
    torch.manual_seed(0)
    model, x = States(), torch.randn(2, 5, 4)
    rule = fxs.Output("lstm")
    with pytest.raises(fxs.RewriteError) as err:
        fxs.apply(model, [rule], example_inputs=(x,))
    assert str(err.value) == (f"rule 1 'output lstm' ({rule.origin}) at 'lstm': its value is a tuple made with gradients off "
                              "(torch.no_grad), which would leave with the gradients the region cuts; fix: select a tensor "
                              "of it instead (its getitem nodes: fxsurgery inspect)")
    out = fxs.apply(model, [fxs.Output("getitem")], example_inputs=(x,)).module(x)
    with torch.no_grad():
        want = model.lstm(x)[0]
    assert torch.allclose(out, want, atol=1e-6, rtol=0) and not out.requires_grad  # CPU's LSTM: another kernel without grad
