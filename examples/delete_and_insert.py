"""Delete the first layer and add a new one after the last."""
import torch
from torch import nn
from walkthrough import M

import fxsurgery as fxs

torch.manual_seed(0)
model = M()
head = nn.Linear(1, 1)
result = fxs.apply(model, [fxs.Delete("liner1"), fxs.Insert(head, after="liner2")],
                   example_inputs=(torch.randn(1, 3),))
x = torch.randn(3, 2)
assert torch.equal(result.module(x), head(model.liner2(x)))
assert result.report.transferred == ["liner2.weight", "liner2.bias"]
assert result.report.new == ["liner2_linear.weight", "liner2_linear.bias"]
print(result.module.code)
