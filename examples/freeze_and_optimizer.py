"""Freeze a layer, and why filtering frozen parameters out of the optimizer
seemed to make no difference.

SGD and Adam skip every parameter whose .grad is None. A frozen parameter
never gets a gradient, so handing it to the optimizer is harmless at first.
It stops being harmless once the parameter has a stale .grad (frozen after a
step, with zero_grad(set_to_none=False)) or optimizer state: momentum and
weight decay keep moving it. fxsurgery's result has fresh tensors without
.grad, and trainable_parameters() is what the optimizer should get.
"""
import torch
from torch import nn
from walkthrough import M

import fxsurgery as fxs


def steps(model, params, n=3):
    opt = torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=0.1)
    for _ in range(n):
        opt.zero_grad(set_to_none=False)
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    return opt


torch.manual_seed(0)
x, y = torch.randn(8, 3), torch.randn(8, 1)

# The naive recipe: train, then set requires_grad=False, keep the optimizer.
naive = M()
opt = steps(naive, naive.parameters(), n=1)
naive.liner1.requires_grad_(False)
frozen_at = naive.liner1.weight.detach().clone()
opt.zero_grad(set_to_none=False)
nn.functional.mse_loss(naive(x), y).backward()
opt.step()
moved = (naive.liner1.weight - frozen_at).abs().max().item()
print(f"naive freeze: liner1 still moved by {moved:.4f} (stale grad + momentum + weight decay)")
assert moved > 0

# fxsurgery: Freeze is a rule; the frozen tensor has no grad and no optimizer state.
result = fxs.apply(naive, [fxs.Freeze("liner1")], example_inputs=(x,))
model = result.module
kept = model.liner1.weight.detach().clone()
steps(model, result.trainable_parameters())
assert torch.equal(model.liner1.weight, kept)
assert result.report.frozen == ["liner1.weight", "liner1.bias"]
print("fxsurgery freeze: liner1 bitwise unchanged after 3 steps")
