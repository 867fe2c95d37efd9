"""nn.LSTM, nn.GRU and nn.RNN take (*args, **kwargs): model.py and graph.json could not say how to build them, and
any model holding one could not be saved ("RNNBase.__init__() missing 2 required positional arguments")."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fxsurgery as fxs


class Recurrent(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(4, 6, num_layers=2, batch_first=True, bidirectional=True, proj_size=3)
        self.gru = nn.GRU(4, 5, bias=False, dropout=0.25, num_layers=2)
        self.rnn = nn.RNN(4, 3, nonlinearity="relu")
        self.head = nn.Linear(6 + 5 + 3, 2)

    def forward(self, x):
        a, _ = self.lstm(x)
        b, _ = self.gru(x.transpose(0, 1))
        c, _ = self.rnn(x.transpose(0, 1))
        return self.head(torch.cat([a[:, -1], b[-1], c[-1]], -1))


@pytest.mark.parametrize("trust_code", [False, True])
def test_recurrent_layers_save_and_load_as_they_were(tmp_path, trust_code):
    torch.manual_seed(0)
    model = Recurrent().eval()
    result = fxs.apply(model, [fxs.Freeze("lstm")], example_inputs=(torch.randn(3, 2, 4),))
    result.save(tmp_path / "o")
    loaded = fxs.load(tmp_path / "o", trust_code=trust_code)
    for name in ("lstm", "gru", "rnn"):
        assert repr(loaded.get_submodule(name)) == repr(model.get_submodule(name))
    assert loaded.rnn.nonlinearity == "relu" and loaded.lstm.proj_size == 3
    x = torch.randn(5, 7, 4)  # another batch and length
    assert torch.equal(loaded(x), model(x))
    assert [n for n, p in loaded.named_parameters() if not p.requires_grad] == [n for n, _ in model.lstm.named_parameters(prefix="lstm")]
