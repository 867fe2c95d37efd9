"""A model file whose import fails: it needs a package that is not installed."""

import fxsurgery_no_such_dependency  # noqa: F401
from torch import nn


class Net(nn.Module):
    def forward(self, x):
        return x
