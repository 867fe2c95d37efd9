"""Small models for the bad-input corpus, referenced as tests/bad_inputs/models.py:Name."""

import torch
from torch import nn


class Small(nn.Module):
    """fc2(relu(fc1(x))): Linear(4, 8), ReLU, Linear(8, 2); input [N, 4]."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(4, 8)
        self.relu = nn.ReLU()
        self.fc2 = nn.Linear(8, 2)

    def forward(self, x):
        return self.fc2(self.relu(self.fc1(x)))


class Residual(nn.Module):
    """A residual add and a concatenation: two multi-input nodes ('add', 'cat'); input [N, 4]."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(4, 4)
        self.fc2 = nn.Linear(4, 4)
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        y = self.fc1(x) + x
        z = torch.cat([y, self.fc2(y)], dim=1)
        return self.head(z)


class Sized(nn.Module):
    """Reads a size (an int, not a tensor) and reshapes with it; input [N, 4]."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 6)

    def forward(self, x):
        n = x.size(0)
        return self.fc(x).view(n, 2, 3)


class NeedsArgs(nn.Module):
    """A model class whose constructor needs an argument."""

    def __init__(self, width):
        super().__init__()
        self.fc = nn.Linear(width, width)

    def forward(self, x):
        return self.fc(x)


def raises_on_build():
    """A factory that fails."""
    raise RuntimeError("no weights for this configuration")


def returns_int():
    """A factory that does not return a model."""
    return 3


CONFIG = {"width": 4}  # neither a model, a class nor a factory

INSTANCE = Small()      # a model instance is a valid reference


class Quoted(nn.Module):
    """A submodule whose name holds a quote: torch.fx would paste it into code unescaped."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(4, 4)
        self.add_module('fc"2', nn.Linear(4, 2))

    def forward(self, x):
        return getattr(self, 'fc"2')(self.fc1(x))


class Branchy(nn.Module):
    """Python control flow on a tensor value: torch.fx cannot trace forward."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(4, 4)
        self.fc2 = nn.Linear(4, 2)

    def forward(self, x):
        h = self.fc1(x)
        if h.sum() > 0:
            h = -h
        return self.fc2(h)
