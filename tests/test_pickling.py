"""A result pickles as the model it came from: `torch.save(model)`, then `torch.load`, gives a model that
takes the same calls, follows `.train()` / `.eval()`, and computes the same bits."""

import copy
import inspect
import io
import pickle

import pytest
import timm
import torch
import transformers
from torch import nn

import fxsurgery as fxs
from fxsurgery import Freeze
from fxsurgery.capture import ModeGraphModule


def _round_trip(module: nn.Module) -> nn.Module:
    buffer = io.BytesIO()
    torch.save(module, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


def _in_train(module: nn.Module, *inputs, seed: int = 1):
    module.train()
    torch.manual_seed(seed)
    return module(*inputs)


class _Dict(nn.Module):
    """Takes and returns a dict: the result is called through an adapter."""

    def __init__(self, width: int = 4):
        super().__init__()
        self.lin = nn.Linear(width, 2)

    def forward(self, batch, scale: float = 1.0):
        return {"out": self.lin(batch["x"]) * scale}


class _Inner(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x, *, gain=None):
        return self.fc(x) * (gain if gain is not None else 1)


class _Opaque(nn.Module):
    """A root torch.fx cannot trace, whose child is called with a keyword: the child gets an adapter."""

    def __init__(self):
        super().__init__()
        self.inner = _Inner()

    def forward(self, x):
        if x.sum() > 0:
            x = x + 1
        return self.inner(x, gain=torch.full((4,), 3.0))


def test_a_model_of_two_graphs_pickles_with_both_and_follows_the_mode():
    torch.manual_seed(0)
    original = timm.create_model("resnet10t", drop_rate=0.5, drop_path_rate=0.2, num_classes=10)
    x = torch.randn(2, 3, 64, 64)
    result = fxs.apply(original, [Freeze("conv1")], example_inputs=(x,))
    assert isinstance(result.module, ModeGraphModule)
    again = _round_trip(result.module)
    twice = _round_trip(again)
    for loaded in (again, twice):
        model = copy.deepcopy(original)  # running in train mode moves batch norm's statistics
        assert isinstance(loaded, ModeGraphModule)
        assert [(n, p.requires_grad) for n, p in loaded.named_parameters()] == [
            (n, p.requires_grad) for n, p in result.module.named_parameters()]
        assert all(torch.equal(p, q) for p, q in zip(loaded.state_dict().values(), result.module.state_dict().values()))
        assert torch.equal(_in_train(loaded, x), _in_train(model, x))  # dropout and drop path, same draws
        assert torch.equal(loaded.eval()(x[:1]), model.eval()(x[:1]))   # their eval graph, another batch size


def test_a_model_called_with_a_dict_pickles_with_its_call_form(tmp_path):
    torch.manual_seed(0)
    model = _Dict().eval()
    result = fxs.apply(model, [], example_inputs=({"x": torch.randn(3, 4)},))
    result.save(tmp_path / "o")
    batch = {"x": torch.randn(5, 4)}
    for source in (result.module, fxs.load(tmp_path / "o")):
        again = _round_trip(source)
        assert torch.equal(again(batch)["out"], model(batch)["out"])
        assert torch.equal(again(batch=batch)["out"], model(batch=batch)["out"])   # by keyword
        assert torch.equal(again(batch, 1.0)["out"], model(batch)["out"])          # the default given
        with pytest.raises(RuntimeError) as theirs:
            source(batch, 2.0)
        with pytest.raises(RuntimeError) as ours:
            again(batch, 2.0)
        assert str(ours.value) == str(theirs.value) == (
            "the model was captured with scale=1.0 and this call gives scale=2.0; fix: capture with "
            "example_kwargs={'scale': 2.0}")
        assert inspect.signature(again.forward) == inspect.signature(source.forward)
    assert str(inspect.signature(_round_trip(result.module).forward)) == "(batch, scale: float = 1.0)"


def test_a_pickled_adapter_leaves_the_example_inputs_out():
    torch.manual_seed(0)
    model = _Dict(width=1024).eval()  # 8 KiB of weights, captured on a 1 MiB example batch
    result = fxs.apply(model, [], example_inputs=({"x": torch.randn(256, 1024)},))
    size = len(pickle.dumps(result.module))
    assert size < 64 * 1024, size


def test_a_model_with_an_adapted_child_in_opaque_code_pickles():
    torch.manual_seed(0)
    model = _Opaque().eval()
    x = torch.ones(3, 4)
    result = fxs.apply(model, [], example_inputs=(x,))
    assert result.coverage()["traced"] == ["inner"]
    again = _round_trip(result.module)
    assert type(again) is _Opaque and isinstance(again.inner, torch.fx.GraphModule)
    assert torch.equal(again(x), model(x)) and torch.equal(again(-x[:1]), model(-x[:1]))
    with pytest.raises(RuntimeError) as err:
        again.inner(x)
    assert str(err.value) == ("'inner' was captured with gain=a tensor and this call gives gain=None; fix: capture "
                              "with example inputs that make the model call it this way")


def test_a_transformers_model_with_dropout_pickles_and_follows_the_mode():
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=37, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1,
                                     attn_implementation="sdpa")
    model = transformers.BertForSequenceClassification(config).eval()
    ids = torch.randint(0, 100, (2, 8))
    result = fxs.apply(model, [Freeze("bert.embeddings")], example_inputs=(ids,))
    again = _round_trip(result.module)
    longer = torch.randint(0, 100, (3, 11))
    assert torch.equal(again.eval()(longer).logits, model.eval()(longer).logits)
    assert torch.equal(_in_train(again, ids).logits, _in_train(model, ids).logits)
    assert [n for n, p in again.named_parameters() if not p.requires_grad] == [
        n for n, p in model.named_parameters() if n.startswith("bert.embeddings.")]


def _swin(drop_path_rate: float) -> nn.Module:
    """timm's Swin keeps relative_position_index out of its state_dict (a non-persistent buffer the graph reads)."""
    torch.manual_seed(0)
    return timm.create_model("swin_tiny_patch4_window7_224", img_size=56, embed_dim=16, depths=(1, 1), num_heads=(1, 2),
                             window_size=7, drop_path_rate=drop_path_rate, num_classes=3).eval()


@pytest.mark.parametrize("drop_path_rate", [0.0, 0.1], ids=["one graph", "two graphs"])
def test_buffers_kept_out_of_the_state_dict_stay_out_pickled_or_not(drop_path_rate, tmp_path):
    model = _swin(drop_path_rate)
    x = torch.randn(2, 3, 56, 56)
    result = fxs.apply(model, [Freeze("patch_embed")], example_inputs=(x,))
    assert isinstance(result.module, ModeGraphModule) == (drop_path_rate > 0)
    result.save(tmp_path / "o")
    for module in (result.module, _round_trip(result.module), _round_trip(fxs.load(tmp_path / "o"))):
        assert sorted(module.state_dict()) == sorted(model.state_dict())
        module.load_state_dict(model.state_dict())  # strict: the original's state_dict fits
        assert torch.equal(module.eval()(x), model(x))
        assert torch.equal(_in_train(module, x), _in_train(model, x))
        model.eval()


def test_a_graph_with_guards_and_size_reads_pickles_as_captured():
    # traced again from its code, as torch.fx unpickles a GraphModule, this graph failed: its guards were decided
    # on the tracer's proxies and its size reads became proxies where slices need numbers
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", img_size=64, num_classes=10).eval()
    result = fxs.apply(model, [fxs.Replace("head", fxs.new(nn.Linear, out_features=4))],
                       example_inputs=(torch.randn(2, 3, 64, 64),))
    again = _round_trip(result.module)
    x = torch.randn(3, 3, 64, 64)
    assert torch.equal(again(x), result.module(x))
    assert [n.format_node() for n in again.graph.nodes] == [n.format_node() for n in result.module.graph.nodes]
    assert type(again).__name__ == type(result.module).__name__ == "VisionTransformer"


def test_a_transformers_graph_pickles_with_its_keyword_guards():
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=37, max_position_embeddings=64)
    model = transformers.BertForSequenceClassification(config).eval()
    result = fxs.apply(model, [Freeze("bert.embeddings")], example_inputs=(torch.randint(0, 100, (2, 8)),), keep_class=False)
    again = _round_trip(result.module)
    ids = torch.randint(0, 100, (3, 11))
    assert torch.equal(again(ids).logits, model(ids).logits)
    assert torch.equal(again(input_ids=ids).logits, model(input_ids=ids).logits)


def test_a_long_graph_pickles_without_deep_recursion():
    chain = nn.Sequential(*[nn.ReLU() if i % 2 else nn.Identity() for i in range(3000)])
    result = fxs.apply(chain, [], example_inputs=(torch.randn(2, 3),))
    assert len(result.module.graph.nodes) > 1500
    x = torch.randn(4, 3)
    assert torch.equal(_round_trip(result.module)(x), chain(x))


def _doubled(module, args, output):
    return output * 2


def test_hooks_on_the_result_itself_pickle_with_it():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)).eval()
    result = fxs.apply(model, [], example_inputs=(torch.randn(2, 4),))
    result.module.register_forward_hook(_doubled)
    x = torch.randn(3, 4)
    assert torch.equal(_round_trip(result.module)(x), model(x) * 2)
