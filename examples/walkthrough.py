"""The fine-tuning walkthrough's small models, shared by the examples."""
from torch import nn


class M(nn.Module):
    """liner2(liner1(x)): Linear(3, 2) then Linear(2, 1)."""

    def __init__(self):
        super().__init__()
        self.liner1 = nn.Linear(3, 2)
        self.liner2 = nn.Linear(2, 1)

    def forward(self, x):
        return self.liner2(self.liner1(x))


class M3(nn.Module):
    """liner3(liner2(liner1(x))): Linear(3, 2), Linear(2, 2), Linear(2, 1)."""

    def __init__(self):
        super().__init__()
        self.liner1 = nn.Linear(3, 2)
        self.liner2 = nn.Linear(2, 2)
        self.liner3 = nn.Linear(2, 1)

    def forward(self, x):
        return self.liner3(self.liner2(self.liner1(x)))
