"""An inference surgery on a model whose code differs by mode: the rule matches in one mode only."""

import textwrap

import pytest
import torch
from conftest import cli
from safetensors.torch import load_file

import fxsurgery as fxs

SOURCE = textwrap.dedent("""
    import torch
    from torch import nn

    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn, self.fc = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Linear(4, 2)
            with torch.no_grad():
                self.bn.running_mean.uniform_()
                self.bn.running_var.uniform_(0.5, 2)

        def forward(self, x):
            y = self.bn(self.conv(x))
            if self.training:   # other code in train mode: the surgery is made in both modes
                y = y * 2
            return self.fc(y.mean((2, 3)))
""")


@pytest.fixture
def branchy(tmp_path, monkeypatch):
    (tmp_path / "branchy.py").write_text(SOURCE)
    monkeypatch.syspath_prepend(str(tmp_path))
    import branchy
    torch.manual_seed(0)
    return branchy.Branchy().eval()


def test_a_fold_that_matches_in_eval_mode_only_names_the_modes_rightly_and_the_way_to_keep_one(branchy, tmp_path):
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(fxs.ModeError) as err:   # the modes were swapped: "matches 1 in train mode and 0 in eval mode"
        fxs.apply(branchy, fxs.load_rules("fold-bn"), example_inputs=(x,))
    assert err.value.full.endswith(": matches 1 in eval mode and 0 in train mode, where the model runs other code; fix: write "
                                   "the rule for modules both modes run, or keep only the eval mode's code, which the result "
                                   "then runs in both modes (modes=False; --no-modes)")
    result = fxs.apply(branchy, fxs.load_rules("fold-bn"), example_inputs=(x,), modes=False)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in result.module.modules())
    torch.testing.assert_close(result.module(x), branchy(x), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(result.module.train()(x), branchy(x), rtol=1e-5, atol=1e-6)  # eval's code, in both modes
    code, stdout, stderr = cli("apply", f"{tmp_path / 'branchy.py'}:Branchy", "fold-bn", "--input", "2x3x8x8", "--eval",
                               "--no-modes", "-o", tmp_path / "out", "--quiet")
    assert (code, stderr) == (0, ""), stderr
    saved = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert sorted(saved) == ["conv.bias", "conv.weight", "fc.bias", "fc.weight"]
