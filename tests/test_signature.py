"""The regenerated module keeps the original's call signature and output type.

Positions and keywords, defaults, optional inputs left None, keyword example
inputs (`example_kwargs`) and the loss they compute; an argument the captured
call does not cover is refused by name, with how to capture it. The same holds
for the saved model.py.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import NamedTuple

import pytest
import torch
from torch import nn

import fxsurgery as fxs

transformers = pytest.importorskip("transformers")


def bert():
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=32, num_labels=3)
    return transformers.BertForSequenceClassification(config).eval()


def gpt2():
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=100, bos_token_id=98, eos_token_id=99,
                                     use_cache=False)
    return transformers.GPT2LMHeadModel(config).eval()


IDS = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(1))
MASK = torch.tensor([[1] * 8, [1] * 5 + [0] * 3])
LABELS = torch.tensor([1, 2])


def test_bert_takes_its_own_parameters_by_position_and_keyword():
    model = bert()
    gm = fxs.apply(model, [], example_inputs=(IDS,), keep_class=False).module
    assert isinstance(gm, torch.fx.GraphModule)
    assert list(inspect.signature(gm.forward).parameters) == list(inspect.signature(model.forward).parameters)
    reference = model(IDS)
    for out in (gm(IDS), gm(input_ids=IDS), gm(IDS, attention_mask=None), gm(IDS, None, None, None, None, None)):
        assert type(out) is transformers.modeling_outputs.SequenceClassifierOutput
        assert torch.equal(out.logits, reference.logits) and out.loss is None


@pytest.mark.parametrize("given, message", [
    ({"attention_mask": MASK}, "the model was captured with attention_mask=None and this call gives attention_mask=a tensor; "
     "fix: capture with attention_mask given, e.g. example_kwargs={'attention_mask': ...} (--input attention_mask=SHAPE:DTYPE)"),
    ({"labels": LABELS}, "the model was captured with labels=None and this call gives labels=a tensor; "
     "fix: capture with labels given, e.g. example_kwargs={'labels': ...} (--input labels=SHAPE:DTYPE)"),
    ({"token_type_ids": torch.zeros_like(IDS)}, "the model was captured with token_type_ids=None and this call gives "
     "token_type_ids=a tensor; fix: capture with token_type_ids given, e.g. example_kwargs={'token_type_ids': ...} "
     "(--input token_type_ids=SHAPE:DTYPE)"),
    ({"return_dict": False}, "the model was captured with return_dict=nothing and this call gives return_dict=False; "
     "fix: capture with example_kwargs={'return_dict': False}"),
])
def test_bert_refuses_what_its_capture_did_not_cover_by_name(given, message):
    gm = fxs.apply(bert(), [], example_inputs=(IDS,), keep_class=False).module
    with pytest.raises(RuntimeError) as err:
        gm(IDS, **given)
    assert str(err.value) == message


@pytest.fixture(scope="module")
def bert_with_labels():
    model = bert()
    return model, fxs.apply(model, [], example_inputs=(IDS,), example_kwargs={"attention_mask": MASK, "labels": LABELS},
                            keep_class=False)


def test_bert_captured_with_keywords_gives_the_originals_loss(bert_with_labels):
    model, result = bert_with_labels
    assert result.coverage() == {"traced": [""], "opaque": {}, "traced_share": 1.0}
    reference = model(IDS, attention_mask=MASK, labels=LABELS)
    for out in (result.module(IDS, attention_mask=MASK, labels=LABELS),
                result.module(labels=LABELS, attention_mask=MASK, input_ids=IDS),
                result.module(IDS, MASK, None, None, None, LABELS)):
        assert type(out) is transformers.modeling_outputs.SequenceClassifierOutput
        assert torch.equal(out.loss, reference.loss) and torch.equal(out.logits, reference.logits)
    assert result.example_inputs[:2] == (IDS, MASK) and result.example_inputs[5] is LABELS
    with pytest.raises(RuntimeError) as err:
        result.module(IDS, attention_mask=MASK)
    assert str(err.value) == ("the model was captured with labels=a tensor and this call gives labels=None; "
                              "fix: give labels as at capture, or capture without it")


def test_saved_bert_keeps_the_signature_and_the_loss(bert_with_labels, tmp_path):
    model, result = bert_with_labels
    result.save(tmp_path / "out")
    loaded = fxs.load(tmp_path / "out", trust_code=True)
    assert parameters(loaded) == parameters(model)  # model.py's call adapter shows the forward's own parameters
    reference = model(IDS, attention_mask=MASK, labels=LABELS)
    out = loaded(labels=LABELS, input_ids=IDS, attention_mask=MASK)
    assert type(out) is transformers.modeling_outputs.SequenceClassifierOutput
    assert torch.equal(out.loss, reference.loss) and torch.equal(out.logits, reference.logits)
    with pytest.raises(RuntimeError) as err:
        loaded(IDS, attention_mask=MASK, labels=LABELS, token_type_ids=torch.zeros_like(IDS))
    assert str(err.value) == ("the model was captured with token_type_ids=None and this call gives token_type_ids=a tensor; "
                              "fix: capture with token_type_ids given, e.g. example_kwargs={'token_type_ids': ...} "
                              "(--input token_type_ids=SHAPE:DTYPE)")


def test_gpt2_captured_with_labels_gives_the_originals_loss_after_surgery():
    model = gpt2()
    ids = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(2))
    mask = torch.tensor([[0, 0] + [1] * 5, [1] * 7])
    result = fxs.apply(model, [fxs.Freeze("transformer.h.0")], example_kwargs={"input_ids": ids, "attention_mask": mask,
                                                                                "labels": ids}, keep_class=False)
    assert isinstance(result.module, torch.fx.GraphModule)
    reference = model(ids, attention_mask=mask, labels=ids)
    out = result.module(input_ids=ids, attention_mask=mask, labels=ids)
    assert type(out) is transformers.modeling_outputs.CausalLMOutputWithCrossAttentions
    torch.testing.assert_close(out.loss, reference.loss, atol=1e-6, rtol=0)
    torch.testing.assert_close(out.logits, reference.logits, atol=1e-6, rtol=0)
    out.loss.backward()  # the loss trains what is not frozen
    assert result.module.get_submodule("transformer.h.0.attn.c_attn").weight.grad is None
    assert result.module.get_submodule("transformer.h.1.attn.c_attn").weight.grad.abs().sum() > 0


def test_a_torchvision_model_takes_its_input_by_keyword(tmp_path):
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=5).eval()
    x = torch.randn(2, 3, 64, 64)
    result = fxs.apply(model, [fxs.Replace("fc", nn.Linear(512, 5))], example_kwargs={"x": x})
    reference = result.module(x)
    assert reference.shape == (2, 5) and torch.equal(result.module(x=x), reference)
    result.save(tmp_path / "out")
    loaded = fxs.load(tmp_path / "out", trust_code=True)
    assert torch.equal(loaded(x=x), reference) and torch.equal(loaded(x), reference)


class Pair(NamedTuple):
    y: torch.Tensor
    total: torch.Tensor


@dataclasses.dataclass
class Scored:
    y: torch.Tensor
    total: torch.Tensor | None = None


class Toy(nn.Module):
    """Defaults, a keyword-only flag, an optional mask, and a NamedTuple or dataclass output."""

    def __init__(self, as_dataclass: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.linear = nn.Linear(4, 4)
        self.as_dataclass = as_dataclass

    def forward(self, x, mask=None, scale: float = 2.0, *, shift: bool = True):
        y = self.linear(x) * scale
        if mask is not None:
            y = y * mask
        if shift:
            y = y + 1
        return (Scored if self.as_dataclass else Pair)(y, y.sum(-1))


X = torch.randn(3, 4, generator=torch.Generator().manual_seed(3))
M = (torch.arange(12).reshape(3, 4) % 2).float()


def same(a, b) -> bool:
    return type(a) is type(b) and torch.equal(a.y, b.y) and torch.equal(a.total, b.total)


@pytest.mark.parametrize("as_dataclass", [False, True], ids=["namedtuple", "dataclass"])
def test_a_toy_keeps_defaults_keywords_and_its_output_type(as_dataclass, tmp_path):
    model = Toy(as_dataclass).eval()
    result = fxs.apply(model, [], example_inputs=(X,))
    reference = model(X)
    for module in (result.module, _saved(result, tmp_path)):
        for out in (module(X), module(x=X), module(X, None, 2.0), module(X, mask=None, scale=2.0, shift=True)):
            assert same(out, reference)
        with pytest.raises(AssertionError) as err:
            module(X, mask=M)
        assert str(err.value) == ("the model was captured with mask=None and this call gives another mask; fix: capture with "
                                  "mask given, e.g. example_kwargs={'mask': ...} (--input mask=SHAPE:DTYPE)")
        with pytest.raises(AssertionError) as err:
            module(X, shift=False)
        assert str(err.value) == ("the model was captured with shift=True and this call gives another shift; fix: capture with "
                                  "shift set as you will call it, e.g. example_kwargs={'shift': ...}")


def test_a_toy_captured_with_keywords_takes_them():
    model = Toy().eval()
    result = fxs.apply(model, [], example_inputs=(X,), example_kwargs={"mask": M, "shift": False})
    assert same(result.module(X, mask=M, shift=False), model(X, mask=M, shift=False))
    assert same(result.module(X, M, 2.0, shift=False), model(X, M, shift=False))
    assert result.example_inputs == (X, M, 2.0, False)


def test_example_kwargs_that_do_not_fit_the_forward_are_refused():
    with pytest.raises(fxs.ModelError) as err:
        fxs.apply(Toy(), [], example_inputs=(X,), example_kwargs={"masks": M})
    assert str(err.value) == ("example inputs do not fit Toy.forward(x, mask, scale, shift): got an unexpected keyword "
                              "argument 'masks'; fix: pass one input per argument")


def parameters(module) -> list:
    """What inspect shows of a module's forward: names, kinds (keyword-only or not) and defaults."""
    return [(p.name, p.kind, p.default) for p in inspect.signature(module.forward).parameters.values()]


class Shifted(nn.Module):
    """A tensor given after a parameter left at its default, and keyword-only parameters."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.linear = nn.Linear(4, 4)

    def forward(self, x, mask=None, bias=None, *, scale: float = 2.0, shift=None):
        y = self.linear(x) * scale + (0 if bias is None else bias)
        return y if shift is None else y + shift


@pytest.mark.parametrize("given", [{"bias": M}, {"shift": M}], ids=["bias", "shift"])
def test_a_keyword_only_forward_keeps_its_signature_in_the_result_and_model_py(given, tmp_path):
    model = Shifted().eval()
    result = fxs.apply(model, [], example_inputs=(X,), example_kwargs=given)
    assert parameters(result.module) == parameters(model)
    assert [(name, kind.name) for name, kind, _ in parameters(model)][-2:] == [("scale", "KEYWORD_ONLY"),
                                                                               ("shift", "KEYWORD_ONLY")]
    loaded = _saved(result, tmp_path)
    assert parameters(loaded) == parameters(model)
    for module in (result.module, loaded):
        assert torch.equal(module(X, **given), model(X, **given))
        with pytest.raises(TypeError):
            module(X, None, None, 2.0, None)  # keyword-only, as in the original


def _saved(result, tmp_path):
    directory = tmp_path / type(result.module).__name__
    result.save(directory)
    return fxs.load(directory, trust_code=True)


def test_the_cli_takes_keyword_inputs(tmp_path):
    from conftest import RULES, cli
    factory = tmp_path / "factory.py"
    factory.write_text("import torch\nfrom torch import nn\n\n\nclass Masked(nn.Module):\n    def __init__(self):\n"
                       "        super().__init__()\n        torch.manual_seed(0)\n        self.body = nn.Linear(4, 4)\n"
                       "        self.fc = nn.Linear(4, 2)\n\n    def forward(self, x, mask=None):\n"
                       "        y = self.body(x)\n        return self.fc(y if mask is None else y * mask)\n")
    out = tmp_path / "out"
    code, _, stderr = cli("apply", f"{factory}:Masked", f"{RULES}/freeze-backbone.yaml", "--input", "3x4", "--input", "mask=3x4",
                          "-o", out)
    assert (code, stderr) == (0, "")
    loaded = fxs.load(out, trust_code=True)
    namespace = {}
    exec(compile(factory.read_text(), str(factory), "exec"), namespace)
    assert torch.equal(loaded(X, mask=M), namespace["Masked"]()(X, mask=M))
    with pytest.raises(TypeError) as err:
        loaded(X)  # captured with a mask: the graph needs one
    assert str(err.value) == "Model.forward() missing 1 required positional argument: 'mask'"
    code, _, stderr = cli("apply", f"{factory}:Masked", f"{RULES}/freeze-backbone.yaml", "--input", "mask-2=2x8")
    assert code != 0 and stderr == ("fxsurgery: error: --input 'mask-2=2x8': 'mask-2' is not a parameter name; "
                                    "fix: write NAME=SIZES, e.g. attention_mask=1x16:int64\n")
    code, _, stderr = cli("apply", f"{factory}:Masked", f"{RULES}/freeze-backbone.yaml", "--input", "3x4", "--input", " =3x4")
    assert code == 2 and stderr == ("fxsurgery: error: --input ' =3x4': no name before '='; fix: write NAME=SIZES, e.g. "
                                    "attention_mask=1x16:int64, or the sizes alone for a positional input\n")
