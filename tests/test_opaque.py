"""Rules where torch.fx cannot trace: modules in opaque code, graph boundaries, specialised graphs."""

import copy

import pytest
import torch
from corpus import BY_NAME
from torch import nn
from torch.nn import functional as F

import fxsurgery as fxs
from fxsurgery import Delete, Detach, Freeze, Insert, Replace


class Gate(nn.Module):
    """A model whose own forward branches on data: torch.fx cannot trace it."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Linear(4, 8), nn.ReLU())
        self.head = nn.Linear(8, 3)
        self.scale = 2.0

    def forward(self, x):
        h = self.stem(x)
        if h.sum() > 0:  # data-dependent: the root stays Python
            h = F.relu(h) * self.scale
        return self.head(h)


@pytest.fixture
def gate():
    torch.manual_seed(0)
    return Gate()


X = (torch.randn(2, 4),)


def test_capture_keeps_the_root_as_python_and_traces_its_children(gate):
    result = fxs.apply(gate, [], example_inputs=X)
    coverage = result.coverage()
    assert coverage["traced"] == ["stem"]
    assert list(coverage["opaque"]) == [""]
    assert coverage["opaque"][""] == ("TraceError: control flow depends on tensor values (data-dependent), which no graph "
                                      f"can hold (at tests/test_opaque.py:{Gate.forward.__code__.co_firstlineno + 2})")
    assert coverage["traced_share"] == pytest.approx((4 * 8 + 8) / (4 * 8 + 8 + 8 * 3 + 3))
    assert isinstance(result.module, Gate) and isinstance(result.module.stem, torch.fx.GraphModule)
    x = torch.randn(5, 4)
    assert torch.equal(result.module(x), gate(x))
    assert result.report.counts() == {"transferred": 4, "adapted": 0, "new": 0, "dropped": 0, "frozen": 0}


def test_replace_in_opaque_code_infers_shapes_and_transfers_the_rest(gate):
    result = fxs.apply(gate, [Replace("head", fxs.new(nn.Linear, out_features=5))], example_inputs=X)
    assert (result.module.head.in_features, result.module.head.out_features) == (8, 5)
    assert result.module(torch.randn(3, 4)).shape == (3, 5)
    assert result.report.new == ["head.weight", "head.bias"]
    assert torch.equal(result.module.stem.get_submodule("0").weight, gate.stem[0].weight)
    assert result.plan.matches[0].sites[0].region is None


def test_insert_and_detach_around_a_module_in_opaque_code(gate):
    torch.manual_seed(1)
    scale = nn.Linear(8, 8)
    result = fxs.apply(gate, [Insert(scale, before="head"), Detach(before="head")], example_inputs=X)
    m = result.module
    x = torch.randn(3, 4)
    h = gate.stem(x)
    h = F.relu(h) * 2.0 if h.sum() > 0 else h
    assert torch.equal(m(x), gate.head(scale(h)))
    # the wrapped head keeps its tensors under head.module, reported as the originals
    entry = result.report.entry("head.module.weight")
    assert (entry.status, entry.source) == ("transferred", "head.weight")
    assert result.report.new == ["head.before.weight", "head.before.bias"]
    m(x).sum().backward()
    assert m.stem.get_submodule("0").weight.grad is None and m.head.module.weight.grad is not None


def test_delete_in_opaque_code_passes_the_input_on(gate):
    result = fxs.apply(gate, [Delete("head")], example_inputs=X)
    x = torch.randn(3, 4)
    h = gate.stem(x)
    assert torch.equal(result.module(x), F.relu(h) * 2.0 if h.sum() > 0 else h)
    assert result.report.dropped == ["head.weight", "head.bias"]


def test_an_insert_name_is_the_models_path_under_opaque_code(gate):
    """`name="stem.extra"` in the graph of `stem`, whose caller stays Python: the layer is stem.extra (it was
    stem.stem.extra); a name relative to that graph means the same place."""
    torch.manual_seed(1)
    x = torch.randn(3, 4)
    h = torch.tanh(gate.stem[0](x))
    for name in ("stem.extra", "extra"):
        result = fxs.apply(gate, [Insert(nn.Tanh(), after="stem.0", name=name)], example_inputs=X)
        assert [p for p, _ in result.module.named_modules() if "extra" in p] == ["stem.extra"]
        assert torch.equal(result.module.stem(x), torch.relu(h))


def test_freeze_by_type_reaches_graphs_and_opaque_code(gate):
    result = fxs.apply(gate, [Freeze(nn.Linear)], example_inputs=X)
    assert result.report.frozen == ["stem.0.weight", "stem.0.bias", "head.weight", "head.bias"]
    assert all(p.requires_grad for p in gate.parameters())


def test_a_call_hidden_in_opaque_code_is_named_in_the_error(gate):
    rule = Replace(F.relu, F.gelu)
    with pytest.raises(fxs.MatchError) as err:
        fxs.apply(gate, [rule], example_inputs=X)
    message = err.value.full  # as written: the message itself is bounded to 300 characters
    assert message.startswith(f"rule 1 'replace torch.nn.functional.relu with torch.nn.functional.gelu' "
                              f"({rule.origin}) matched nothing: no call of torch.nn.functional.relu (functions called: none); "
                              "opaque code may call it, which rules cannot see ((the model): TraceError: control flow depends on tensor values")
    assert message.endswith("; fix: correct the selector or add 'optional: true'")


def test_breaking_what_opaque_code_expects_names_the_rule(gate):
    rule = Replace("stem", nn.Linear(4, 6))
    with pytest.raises(fxs.ValidateError) as err:
        fxs.apply(gate, [rule], example_inputs=X)
    assert str(err.value).startswith(f"rule 1 'replace stem with Linear(in_features=4, out_features=6, bias=True)' ({rule.origin}): "
                                     "after this rule, 'head' (Linear) fails: RuntimeError:")


def test_a_graph_traced_as_called_refuses_other_arguments():
    case = BY_NAME["hf/vit"]  # its decorated forward only traces as it is called
    model = case.build()
    result = fxs.apply(model, [], example_inputs=case.inputs(), keep_class=False)
    assert isinstance(result.module, torch.fx.GraphModule) and result.coverage()["traced_share"] == 1.0
    pixels = case.inputs()[0]
    assert torch.equal(result.module(pixels).logits, model(pixels).logits)
    assert torch.equal(result.module(pixel_values=pixels).logits, model(pixels).logits)  # the same call, bound
    with pytest.raises(RuntimeError) as err:
        result.module(pixels, interpolate_pos_encoding=True)
    assert str(err.value) == ("the model was captured with interpolate_pos_encoding=None and this call gives "
                              "interpolate_pos_encoding=True; fix: capture with example_kwargs={'interpolate_pos_encoding': True}")
    # a deep copy (as EMA helpers make) still answers as the module did
    assert torch.equal(copy.deepcopy(result.module)(pixels).logits, model(pixels).logits)


def test_a_graph_boundary_takes_inserts_without_renaming_anything():
    case = BY_NAME["hf/vit"]
    model = case.build()
    result = fxs.apply(model, [Insert(fxs.new(nn.LayerNorm), after="vit")], example_inputs=case.inputs(),
                       keep_class=False)
    assert result.report.new == ["vit_layer_norm.weight", "vit_layer_norm.bias"]
    assert not [e for e in result.report.entries if e.status == "transferred" and e.name != e.source]


class Sliced(nn.Module):
    """Branches on the input's length: plain torch.fx cannot trace that."""

    def __init__(self):
        super().__init__()
        self.table = nn.Parameter(torch.randn(16, 4))

    def forward(self, x):
        rows = x.shape[0]
        if rows > 4:  # Python reads the size: the graph holds this branch and guards the decision
            return x + self.table[:rows]
        return x


def test_specialised_graphs_guard_the_decision_not_the_shape():
    torch.manual_seed(0)
    model = Sliced()
    result = fxs.apply(model, [], example_inputs=(torch.randn(8, 4),))
    assert result.coverage()["opaque"] == {}
    for rows in (8, 5, 16):  # the same side of `rows > 4`: the graph runs
        x = torch.randn(rows, 4)
        assert torch.equal(result.module(x), model(x))
    with pytest.raises(AssertionError) as err:
        result.module(torch.randn(3, 4))
    assert str(err.value) == (
        f"'the model' was captured where `x.shape[0] > 4` is True at tests/test_opaque.py:{Sliced.forward.__code__.co_firstlineno + 2} (if rows > 4:  # Python "
        "reads the size: the graph holds this branch and guards the decision); this call gives another value, and the "
        "graph holds only the code for that one; fix: capture again with example inputs like this call's, or make the "
        "module running that line a leaf (leaf_paths=)")
    # dynamic_shapes=None: the whole example shape, as before
    exact = fxs.apply(model, [], example_inputs=(torch.randn(8, 4),), dynamic_shapes=None)
    with pytest.raises(AssertionError, match=r"'the model' was traced on input 'x' of shape \[8, 4\] and its code reads that shape"):
        exact.module(torch.randn(5, 4))


def test_the_original_is_never_written_to_by_tracing():
    case = BY_NAME["tv/fasterrcnn_mobilenet_v3_large_fpn"]
    model = case.build()
    anchors = model.rpn.anchor_generator.cell_anchors  # the forward caches these on itself
    fxs.apply(model, [], example_inputs=case.inputs())
    assert model.rpn.anchor_generator.cell_anchors is anchors
    with torch.no_grad():
        model(*case.inputs())  # still runs: no tracing proxies were left behind


def test_saving_a_model_with_opaque_code_says_why_and_writes_nothing(gate, tmp_path):
    result = fxs.apply(gate, [Freeze("stem")], example_inputs=X)
    with pytest.raises(fxs.SaveError) as err:
        result.save(tmp_path / "o")
    assert err.value.full.startswith("cannot write model.py for Gate: part of its forward stays Python (its graphs: stem): "
                                     "TraceError: symbolically traced variables cannot be used as inputs to control flow")
    assert err.value.full.endswith("; fix: save its weights with safetensors.torch.save_model(module, path) and rebuild "
                                   "the architecture in code, or make the model traceable (leaf_paths=, --leaf on the command line)")
    assert list(tmp_path.iterdir()) == []


def test_a_one_module_pattern_reaches_a_module_that_opaque_code_calls(gate):
    result = fxs.apply(gate, [fxs.Rewrite(fxs.AddLoRA(rank=2, alpha=2), select="head")], example_inputs=X)
    site = result.plan.matches[0].sites[0]
    assert (site.where, site.region) == ("head", None)
    x = torch.randn(3, 4)
    assert torch.equal(result.module(x), gate(x))                       # B = 0
    head = result.module.head
    assert head.base is not gate.head and torch.equal(head.base.weight, gate.head.weight)
    flow = {k: v for k, v in result.gradient_flow.status.items() if k.startswith("head")}
    assert flow == {"head.base.weight": "frozen", "head.base.bias": "frozen",
                    "head.lora_a.weight": "trainable", "head.lora_b.weight": "trainable"}
    assert {(e.name, e.status) for e in result.report.entries if e.name.startswith("head")} == {
        ("head.base.weight", "transferred"), ("head.base.bias", "transferred"),
        ("head.lora_a.weight", "new"), ("head.lora_b.weight", "new")}


class Counting(nn.Module):
    """Counts its calls in a buffer by assignment, which no graph holds (in place, `.add_(1)`, one does)."""

    def __init__(self, in_place: bool = False):
        super().__init__()
        self.body, self.fc = nn.Linear(4, 4), nn.Linear(4, 2)
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))
        self.in_place = in_place

    def forward(self, x):
        if self.in_place:
            self.calls.add_(1)
        else:
            self.calls = self.calls + 1
        return self.fc(self.body(x))


@pytest.mark.parametrize("in_place", [False, True])
def test_a_forward_that_assigns_a_buffer_stays_python_and_keeps_counting(in_place):
    """`self.n = self.n + 1` traced into an add nobody read: the result never counted (and the capture ended
    in an internal KeyError). Its forward now stays Python; the rules reach its children."""
    torch.manual_seed(0)
    model, x = Counting(in_place), torch.randn(2, 4)
    result = fxs.apply(model, [Replace("fc", nn.Linear(4, 3))], example_inputs=(x,))
    assert int(model.calls) == 0   # the user's model is left alone
    result.module(x)
    result.module(x)
    assert int(result.module.calls) == 2 and result.module(x).shape == (2, 3)
    opaque = result.capture.opaque
    if in_place:
        assert opaque == {}
    else:
        assert list(opaque) == [""] and "Counting.forward assigns self.calls a computed value" in opaque[""]


def test_a_branch_on_requires_grad_keeps_its_module_python():
    """densenet's memory_efficient `if any(t.requires_grad ...)`: a guard on it failed every apply's own no_grad check,
    and would have refused torch.no_grad() calls and frozen inputs. The layers reading it stay Python instead."""
    import torchvision
    torch.manual_seed(0)
    model = torchvision.models.DenseNet(growth_rate=8, block_config=(2, 2), num_init_features=16, memory_efficient=True).eval()
    x = torch.randn(2, 3, 32, 32)
    result = fxs.apply(model, [Replace("classifier", fxs.new(nn.Linear, out_features=5)), Freeze("features.conv0")],
                       example_inputs=(x,))
    opaque = result.capture.coverage()["opaque"]
    assert sorted(opaque) == [f"features.denseblock{b}.denselayer{k}" for b in (1, 2) for k in (1, 2)]
    assert all("`.requires_grad`, which differs under torch.no_grad() and after a freeze" in why for why in opaque.values())
    reference = copy.deepcopy(model)
    reference.classifier = copy.deepcopy(result.module.classifier)
    for batch in (x, torch.randn(5, 3, 40, 48)):
        with torch.no_grad():
            assert torch.equal(result.module(batch), reference(batch))
        assert torch.equal(result.module(batch), reference(batch))
    result.module.train(), reference.train()
    out = result.module(x)
    assert torch.equal(out, reference(x))
    out.sum().backward()
    assert result.module.features.conv0.weight.grad is None
    assert result.module.features.denseblock1.denselayer1.conv1.weight.grad.abs().sum() > 0
