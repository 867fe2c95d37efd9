"""A stop-gradient before the last layer: same outputs, only liner3 trains.

Detach inserts `Tensor.detach()` (never the in-place `detach_()`), so values
are untouched and nothing upstream of the cut receives a gradient.
"""
import torch
from walkthrough import M3

import fxsurgery as fxs

torch.manual_seed(0)
model = M3()
x = torch.randn(4, 3)
new = fxs.apply(model, [fxs.Detach(before="liner3")], example_inputs=(x,)).module
assert torch.equal(new(x), model(x))

new(x).sum().backward()
assert new.liner1.weight.grad is None and new.liner2.weight.grad is None
assert new.liner3.weight.grad is not None
print(new.code)
