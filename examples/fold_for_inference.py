"""Fold BatchNorm into the convolutions of a ResNet for inference, and check it.

The fold computes W' = W·γ/σ and b' = (b − μ)·γ/σ + β per output channel;
in eval mode the folded model computes the same function with 53 fewer layers.
"""
import torch
import torchvision

import fxsurgery as fxs

torch.manual_seed(0)
model = torchvision.models.resnet50(weights=None).eval()
for bn in (m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)):
    bn.running_mean.uniform_(-0.5, 0.5)   # statistics a trained model would have, not the identity
    bn.running_var.uniform_(0.5, 2.0)
x = torch.randn(2, 3, 64, 64)
result = fxs.apply(model, [fxs.Rewrite(fxs.FoldBatchNorm())], example_inputs=(x,))
folded = result.module.eval()

assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
with torch.no_grad():
    assert (folded(x) - model(x)).abs().max() < 1e-4
print(result.plan.table())
print(result.report.counts())   # 106 adapted (53 weights, 53 biases), the fc's 2 transferred
