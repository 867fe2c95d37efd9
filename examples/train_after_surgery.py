"""The surgered model trains like any module; the original never moves with it."""
import torch
from torch import nn
from walkthrough import M

import fxsurgery as fxs

torch.manual_seed(0)
model = M()
original = {k: v.clone() for k, v in model.state_dict().items()}
new = fxs.apply(model, [fxs.Delete("liner1")], example_inputs=(torch.randn(1, 3),)).module

optimizer = torch.optim.SGD(new.parameters(), lr=0.001, momentum=0.9)
loss = nn.functional.mse_loss(new(torch.tensor([[2.0, 1.0]])), torch.tensor([[0.5]]))
before = new.liner2.weight.detach().clone()
loss.backward()
optimizer.step()

# First SGD step with momentum: the buffer is the gradient, so w' = w - lr * grad.
assert torch.equal(new.liner2.weight.detach(), before.add(new.liner2.weight.grad, alpha=-0.001))
assert all(torch.equal(model.state_dict()[k], v) for k, v in original.items())
print("liner2 moved by -lr * grad; the original model is unchanged")
