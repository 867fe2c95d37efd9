"""On a GPU the result behaves like the original: it moves to cuda with its dtype, runs under
torch.compile at parity, and its modes stay live there. Skipped where torch sees no CUDA device
(CI has none); run on a machine with one: `pytest tests/test_gpu.py`."""

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import fxsurgery as fxs
from fxsurgery import Freeze, Replace

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def _head_swap(model, x):
    return fxs.apply(model, [Replace("fc", fxs.new(nn.Linear, out_features=10)), Freeze("*", exclude=["fc"])],
                     example_inputs=(x,))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_result_moves_to_cuda_with_its_dtype_and_matches_the_original(dtype):
    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()
    x = torch.randn(2, 3, 64, 64)
    result = _head_swap(model, x[:1])
    # the same new head on the original, by hand, as the reference
    reference = torchvision.models.resnet18().eval()
    reference.load_state_dict(model.state_dict())
    reference.fc = nn.Linear(512, 10)
    reference.fc.load_state_dict(result.module.fc.state_dict())
    module = result.module.to("cuda", dtype)
    reference = reference.to("cuda", dtype)
    assert {p.device.type for p in module.parameters()} == {"cuda"} and {p.dtype for p in module.parameters()} == {dtype}
    with torch.no_grad():
        got, want = module(x.to("cuda", dtype)), reference(x.to("cuda", dtype))
    assert got.dtype == dtype and got.device.type == "cuda"
    tolerance = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float(), want.float(), atol=tolerance, rtol=tolerance)


def test_compiled_result_matches_eager():
    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()
    x = torch.randn(4, 3, 64, 64, device="cuda")
    module = _head_swap(model, x[:1].cpu()).module.cuda()
    compiled = torch.compile(module)
    with torch.no_grad():
        eager, fast = module(x), compiled(x)
    torch.testing.assert_close(fast, eager, atol=1e-3, rtol=1e-3)


class Dropping(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 16)

    def forward(self, x):
        return F.dropout(self.fc(x), 0.5, self.training)


def test_modes_stay_live_on_cuda():
    torch.manual_seed(0)
    model = Dropping().train()
    result = fxs.apply(model, [Freeze("fc")], example_inputs=(torch.randn(2, 16),))
    module, model = result.module.cuda(), model.cuda()
    x = torch.randn(8, 16, device="cuda")
    with torch.no_grad():
        assert torch.equal(module.eval()(x), model.eval()(x))
        torch.manual_seed(3)
        dropped = module.train()(x)
        torch.manual_seed(3)
        assert torch.equal(dropped, model.train()(x))


def test_transformers_result_on_cuda_matches_the_original():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37, vocab_size=100)
    model = transformers.BertForSequenceClassification(config).eval()
    ids = torch.randint(0, 100, (1, 8))  # a graph captured on [1, 8] is specialised to that shape (symbolic sizes: not yet)
    for keep_class in (True, False):
        result = fxs.apply(model, [Freeze("bert.embeddings.*")], example_inputs=(ids,), keep_class=keep_class)
        module = result.module.cuda().eval()
        with torch.no_grad():
            got = module(ids.cuda())
            want = model.cuda()(ids.cuda())
        got = got.logits if hasattr(got, "logits") else got[0] if isinstance(got, (tuple, list)) else got
        torch.testing.assert_close(got, want.logits, atol=1e-5, rtol=1e-5)
        model.cpu()
