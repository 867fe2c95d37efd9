"""Replace the first layer by a wider one: the rest keeps its weights exactly."""
import torch
from torch import nn
from walkthrough import M

import fxsurgery as fxs

torch.manual_seed(0)
model = M()
result = fxs.apply(model, [fxs.Replace("liner1", nn.Linear(4, 2))], example_inputs=(torch.randn(1, 3),))
print(result.summary())
assert torch.equal(result.module.liner2.weight, model.liner2.weight)
assert result.report.new == ["liner1.weight", "liner1.bias"]
assert result.module(torch.randn(5, 4)).shape == (5, 1)
