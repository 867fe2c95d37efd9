"""Delete the first layer: the second layer reads the model's input directly.

The input shape changes with it ([1, 3] -> [1, 2]); the result says so and
carries example inputs that fit.
"""
import torch
from walkthrough import M

import fxsurgery as fxs

torch.manual_seed(0)
model = M()
result = fxs.apply(model, [fxs.Delete("liner1")], example_inputs=(torch.randn(1, 3),))
print(result.summary())

x = torch.tensor([[2.0, 1.0]])
w, b = model.liner2.weight, model.liner2.bias
assert torch.equal(result.module(x), x @ w.T + b)
assert result.report.dropped == ["liner1.weight", "liner1.bias"] and result.report.new == []
