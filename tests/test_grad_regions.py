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


def _grads(module: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    out = module(x)
    out.sum().backward()
    return out, {n: p.grad for n, p in module.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("cls", [Blocked, Decorated, Switched, Inference, Center])
def test_a_region_without_gradients_stays_without(cls, tmp_path):
    torch.manual_seed(0)
    model = cls()
    x = torch.randn(3, 4)
    result = fxs.apply(model, [fxs.Insert(nn.Identity(), after="teacher")] if cls is Center else
                       [Replace("head", fxs.new(nn.Linear, out_features=2))], example_inputs=(x,))
    if cls is not Center:
        result.module.head.load_state_dict(model.head.state_dict())
    result.save(tmp_path / "o")
    assert result.gradient_flow.status["teacher.weight"] == "cut"
    assert result.gradient_flow.status["student.weight"] == "trainable"
    x = torch.randn(5, 4)
    expected, grads = _grads(copy.deepcopy(model), x)
    assert sorted(grads) == sorted(n for n, _ in model.named_parameters() if not n.startswith("teacher"))
    for made in (result.module, fxs.load(tmp_path / "o"), fxs.load(tmp_path / "o", trust_code=True)):
        before = copy.deepcopy(made.state_dict())
        out, got = _grads(made, x)
        assert torch.equal(out, expected)
        assert sorted(got) == sorted(grads) and all(torch.equal(got[n], grads[n]) for n in grads)
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
