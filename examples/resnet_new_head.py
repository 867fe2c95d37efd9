"""A torchvision ResNet-50 with a 10-class head, everything but layer4 frozen.

in_features (2048) is read from the traced shapes; every tensor outside the
head is the original's, bit for bit. Saved as model.py + model.safetensors.
"""
import tempfile

import torch
import torchvision
from torch import nn

import fxsurgery as fxs
from fxsurgery import Freeze, Replace

torch.manual_seed(0)
model = torchvision.models.resnet50(weights=None).eval()
result = fxs.apply(model, [Replace("fc", fxs.new(nn.Linear, out_features=10)),
                           Freeze("*", exclude=["layer4.*", "fc"])],
                   example_inputs=(torch.randn(1, 3, 224, 224),))
new = result.module.eval()
assert new.fc.in_features == 2048 and new(torch.randn(2, 3, 224, 224)).shape == (2, 10)
original = model.state_dict()
assert all(torch.equal(t, original[k]) for k, t in new.state_dict().items() if not k.startswith("fc."))
trainable = {n.split(".")[0] for n, p in new.named_parameters() if p.requires_grad}
assert trainable == {"layer4", "fc"}

with tempfile.TemporaryDirectory() as tmp:
    result.save(f"{tmp}/out")
    x = torch.randn(1, 3, 224, 224)
    assert torch.equal(fxs.load(f"{tmp}/out").eval()(x), new(x))
print(result.report.table())
