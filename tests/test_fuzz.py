"""Fuzzed invariants: random small model graphs times random rule sequences.

A drawn spec is a list of ops (Conv2d, Linear, BatchNorm2d, activations as
modules, functions and methods, residual adds, channel concatenations), each
reading earlier values; `Net` runs it. A drawn rule list mixes Delete,
Replace, Insert, Detach and Freeze on selectors drawn from the model (paths,
globs, regular expressions, types, functions, methods, node names, names
that match nothing). For every example, either `fxs.apply` raises an FxsError
subclass with a one-line message that has a fix, or:

- the result's graph lints;
- the report covers exactly the result's tensors, each transferred (bit-equal
  to its source), adapted or new and made by a rule; every original tensor is
  a source or dropped;
- the original model's state dict, requires_grad flags and modes are unchanged;
- save -> load gives bit-identical outputs;
- frozen parameters get no gradient after a backward pass.

An empty rule list is the identity (bit-identical outputs).

CI runs a bounded, fixed set of examples. For a deeper run:

    FXSURGERY_FUZZ_EXAMPLES=1000 python -m pytest tests/test_fuzz.py -p no:randomly

runs at least that many examples per property, each run with new random draws.
"""

from __future__ import annotations

import copy
import operator
import os
import tempfile
import warnings
from dataclasses import dataclass
from itertools import chain

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import fx, nn

import fxsurgery as fxs
from fxsurgery import Delete, Detach, Freeze, Insert, Replace

DEEP = int(os.environ.get("FXSURGERY_FUZZ_EXAMPLES", "0"))
SIZE = 4          # spatial size: every value is [2, C, SIZE, SIZE]
MAX_CHANNELS = 12

# examples run per property in this process (read by the figures test)
RUN = {"rules": 0, "identity": 0, "failed_cleanly": 0}


def budget(ci: int) -> settings:
    return settings(max_examples=max(DEEP, ci) if DEEP else ci, deadline=None, database=None,
                    derandomize=not DEEP, print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# -- the model builder ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Op:
    kind: str          # conv | linear | bn | act | fn | method | add | cat
    reads: tuple       # indices of earlier values (0 is the input)
    channels: int      # channels of the result
    name: str = ""     # which activation


ACTS = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid}
FNS = {"relu": torch.relu, "gelu": F.gelu, "tanh": torch.tanh}


class Net(nn.Module):
    """Runs a drawn spec: value i+1 is op i applied to earlier values; returns the last value."""

    def __init__(self, spec: tuple, channels_in: int):
        super().__init__()
        self.spec = spec
        chans = [channels_in]
        for i, op in enumerate(spec):
            c = chans[op.reads[0]]
            if op.kind == "conv":
                self.add_module(f"m{i}", nn.Conv2d(c, op.channels, 3, padding=1))
            elif op.kind == "linear":
                self.add_module(f"m{i}", nn.Linear(SIZE, SIZE))
            elif op.kind == "bn":
                self.add_module(f"m{i}", nn.BatchNorm2d(c))
            elif op.kind == "act":
                self.add_module(f"m{i}", ACTS[op.name]())
            chans.append(op.channels)

    def forward(self, x):
        values = [x]
        for i, op in enumerate(self.spec):
            a = values[op.reads[0]]
            if op.kind == "add":
                v = a + values[op.reads[1]]
            elif op.kind == "cat":
                v = torch.cat([a, values[op.reads[1]]], 1)
            elif op.kind == "fn":
                v = FNS[op.name](a)
            elif op.kind == "method":
                v = a.relu() if op.name == "relu" else a.sigmoid()
            else:
                v = getattr(self, f"m{i}")(a)
            values.append(v)
        return values[-1]


@st.composite
def models(draw):
    """(model, example input): a small random DAG, in train or eval mode."""
    c0 = draw(st.integers(1, 3))
    chans, spec = [c0], []
    for _ in range(draw(st.integers(1, 7))):
        # mostly the newest value, so most of the graph is live
        src = draw(st.one_of(st.just(len(chans) - 1), st.integers(0, len(chans) - 1)))
        c = chans[src]
        kind = draw(st.sampled_from(["conv", "conv", "linear", "bn", "act", "fn", "method", "add", "cat"]))
        if kind == "conv":
            op = Op("conv", (src,), draw(st.integers(1, 4)))
        elif kind == "add":
            other = draw(st.sampled_from([j for j, cj in enumerate(chans) if cj == c]))
            op = Op("add", (src, other), c)
        elif kind == "cat":
            others = [j for j, cj in enumerate(chans) if c + cj <= MAX_CHANNELS]
            if not others:
                op = Op("bn", (src,), c)
            else:
                other = draw(st.sampled_from(others))
                op = Op("cat", (src, other), c + chans[other])
        elif kind in ("act", "fn", "method"):
            names = {"act": ACTS, "fn": FNS, "method": ("relu", "sigmoid")}[kind]
            op = Op(kind, (src,), c, draw(st.sampled_from(sorted(names))))
        else:
            op = Op(kind, (src,), c)
        spec.append(op)
        chans.append(op.channels)
    torch.manual_seed(draw(st.integers(0, 2**16)))
    model = Net(tuple(spec), c0)
    with torch.no_grad():  # non-trivial statistics, so transferred buffers are checked too
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
    model.train(draw(st.booleans()))
    return model, torch.randn(2, c0, SIZE, SIZE)


# -- the rule builder ----------------------------------------------------------------------------

def selectors(model: Net):
    names = [n for n, _ in model.named_children()]
    paths = st.sampled_from(names) if names else st.just("m0")
    node_names = st.sampled_from(["add", "add_1", "cat", "cat_1", "relu", "gelu", "tanh", "sigmoid", "x"])
    return st.one_of(
        paths,
        st.sampled_from(["*", "m*", "m1*", "re:m[0-3]", "re:m\\d+", "m99", "method:relu", "method:sigmoid"]),
        node_names,
        st.sampled_from([nn.Conv2d, nn.Linear, nn.BatchNorm2d, nn.ReLU, nn.GELU, nn.Tanh, nn.Sigmoid]),
        st.sampled_from([torch.relu, torch.tanh, F.gelu, torch.cat, operator.add]),
    )


def replacements():
    return st.sampled_from([
        lambda: fxs.new(nn.Identity),
        lambda: nn.ReLU(),
        lambda: nn.Tanh,
        lambda: torch.tanh,
        lambda: fxs.new(nn.BatchNorm2d),
        lambda: fxs.new(nn.Conv2d, kernel_size=1, out_channels=2),
        lambda: fxs.new(nn.Conv2d, kernel_size=3, padding=1, out_channels=3),
        lambda: fxs.new(nn.Linear, out_features=SIZE),
    ]).map(lambda make: make())


def inserts():
    return st.sampled_from([
        lambda: nn.ReLU(),
        lambda: nn.Identity(),
        lambda: fxs.new(nn.BatchNorm2d),
        lambda: fxs.new(nn.Conv2d, kernel_size=1, out_channels=2),
        lambda: nn.Dropout(0.0),
    ]).map(lambda make: make())


@st.composite
def rule_lists(draw, model):
    sel = selectors(model)
    rules = []
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["delete", "replace", "insert", "detach", "freeze", "freeze"]))
        optional = draw(st.booleans())
        where = draw(st.sampled_from(["after", "before"]))
        if kind == "delete":
            rules.append(Delete(draw(sel), optional=optional))
        elif kind == "replace":
            rules.append(Replace(draw(sel), draw(replacements()), optional=optional,
                                 weights=draw(st.sampled_from(["new", "new", "keep"]))))
        elif kind == "insert":
            rules.append(Insert(draw(inserts()), **{where: draw(sel)}, optional=optional))
        elif kind == "detach":
            rules.append(Detach(**{where: draw(sel)}, optional=optional))
        else:
            # Freeze selects modules: a function or method selector is refused when the rule is built
            modules = sel.filter(lambda s: isinstance(s, (str, type)) and not str(s).startswith("method:"))
            exclude = draw(st.lists(modules, max_size=2))
            rules.append(Freeze(draw(modules), exclude=exclude, optional=optional))
    return rules


# -- invariants ------------------------------------------------------------------------------------

def tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    return dict(chain(module.named_parameters(remove_duplicate=False), module.named_buffers(remove_duplicate=False)))


def snapshot(model: nn.Module):
    return ({k: v.detach().clone() for k, v in tensors(model).items()},
            {k: p.requires_grad for k, p in model.named_parameters()},
            {k: m.training for k, m in model.named_modules()})


def assert_unchanged(model: nn.Module, before) -> None:
    state, grads, modes = snapshot(model)
    assert state.keys() == before[0].keys()
    for k, v in before[0].items():
        assert torch.equal(state[k], v) and state[k].dtype == v.dtype, f"the original's {k} changed"
    assert grads == before[1] and modes == before[2]


def eval_copy(module: nn.Module) -> nn.Module:
    return copy.deepcopy(module).eval()


def same(a, b) -> bool:
    """Bit-identical values, through lists and tuples."""
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, (list, tuple)) and type(a) is type(b):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


def assert_returns_a_tensor(result) -> None:
    """Every op of Net and every drawn replacement maps tensors to a tensor, so the result returns one."""
    with torch.no_grad():
        out = eval_copy(result.module)(*result.example_inputs)
    assert isinstance(out, torch.Tensor), f"the result returns a {type(out).__name__}, not a tensor"


def assert_report_covers(result, original: dict[str, torch.Tensor]) -> None:
    module, report = result.module, result.report
    own = tensors(module)
    live = [e for e in report.entries if e.status != "dropped"]
    assert sorted(e.name for e in live) == sorted(own), "report entries != the result's tensors"
    sources = set()
    for e in live:
        t = own[e.name]
        assert e.status in ("transferred", "adapted", "new"), e
        assert tuple(t.shape) == tuple(e.shape) and str(t.dtype) == f"torch.{e.dtype}", e
        if e.status == "new":
            assert e.rule is not None, f"{e.name} is new and no rule made it"
        elif e.op.startswith("constant"):
            continue
        else:
            assert e.source in original, e
            sources.add(e.source)
            if e.status == "transferred":
                assert torch.equal(t, original[e.source]), f"{e.name} is not a bit-exact copy of {e.source}"
    dropped = {e.name for e in report.entries if e.status == "dropped"}
    assert not (dropped & sources), dropped & sources
    assert dropped | sources == set(original), set(original) - (dropped | sources)
    frozen = {n for n, p in module.named_parameters(remove_duplicate=False) if not p.requires_grad}
    assert set(report.frozen) == frozen


def assert_frozen_get_no_gradient(result) -> None:
    module = copy.deepcopy(result.module).train()
    out = module(*result.example_inputs)
    if isinstance(out, torch.Tensor) and out.requires_grad:
        out.float().sum().backward()
    frozen = set(result.report.frozen)
    for name, p in module.named_parameters(remove_duplicate=False):
        if name in frozen:
            assert not p.requires_grad and p.grad is None, f"frozen {name} got a gradient"
    trainable = {id(p) for p in result.trainable_parameters()}
    assert not any(id(p) in trainable for n, p in result.module.named_parameters(remove_duplicate=False) if n in frozen)


def assert_save_load_exact(result) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "o")
        result.save(out)
        loaded = fxs.load(out).eval()
        inputs = result.example_inputs
        with torch.no_grad():
            assert same(loaded(*inputs), eval_copy(result.module)(*inputs)), "save -> load changed the outputs"
        a, b = tensors(result.module), tensors(loaded)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def assert_clean_failure(exc: fxs.FxsError) -> None:
    message = str(exc)
    assert "\n" not in message, message
    assert "; fix: " in message, message


@budget(ci=100)
@given(st.data())
def test_rules_keep_the_invariants(data):
    model, x = data.draw(models(), label="model")
    rules = data.draw(rule_lists(model), label="rules")
    before = snapshot(model)
    RUN["rules"] += 1
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", fxs.SurgeryWarning)
            result = fxs.apply(model, rules, example_inputs=(x,))
    except fxs.FxsError as exc:
        RUN["failed_cleanly"] += 1
        assert_clean_failure(exc)
        assert_unchanged(model, before)
        return
    assert_unchanged(model, before)
    if isinstance(result.module, fx.GraphModule):
        result.module.graph.lint()
    assert_report_covers(result, before[0])
    assert_returns_a_tensor(result)
    try:
        assert_save_load_exact(result)
    except fxs.FxsError as exc:  # save may refuse what it cannot write, with a reason
        RUN["failed_cleanly"] += 1
        assert_clean_failure(exc)
    assert_frozen_get_no_gradient(result)
    assert_unchanged(model, before)


@budget(ci=50)
@given(models())
def test_no_rules_is_the_identity(drawn):
    model, x = drawn
    before = snapshot(model)
    RUN["identity"] += 1
    result = fxs.apply(model, [], example_inputs=(x,))
    assert_unchanged(model, before)
    with torch.no_grad():
        assert same(eval_copy(result.module)(x), eval_copy(model)(x))
    assert result.report.new == [] and result.report.adapted == []
    assert_report_covers(result, before[0])
    assert_unchanged(model, before)


def test_found_by_fuzzing_a_glob_replacing_a_concatenation():
    """Replace('*', Identity) also selects the node 'cat', a call of two tensors: the one-input
    module must not receive the list (the result would return it in place of a tensor)."""
    torch.manual_seed(0)
    model = Net((Op("conv", (0,), 1), Op("cat", (1, 0), 2)), 1).eval()
    x = torch.randn(2, 1, SIZE, SIZE)
    try:
        result = fxs.apply(model, [Replace("*", fxs.new(nn.Identity))], example_inputs=(x,))
    except fxs.FxsError as exc:
        assert_clean_failure(exc)
        return
    assert_returns_a_tensor(result)


def test_found_by_fuzzing_a_module_replacing_a_concatenation_of_one_value():
    """cat([v, v]) reads one tensor, but inside a list: a module in its place would get the list."""
    torch.manual_seed(0)
    model = Net((Op("conv", (0,), 1), Op("cat", (1, 1), 2)), 1).eval()
    rule = Replace(torch.cat, nn.Identity())
    with pytest.raises(fxs.RewriteError) as err:
        fxs.apply(model, [rule], example_inputs=(torch.randn(2, 1, SIZE, SIZE),))
    assert str(err.value) == (f"rule 1 'replace torch.cat with Identity()' ({rule.origin}) at 'cat': it reads 'm0' inside "
                              "a list, not as its first argument, so a module cannot take its place; fix: replace it with "
                              "a function, or select another node")


def test_found_by_fuzzing_delete_then_replace_its_consumer():
    """Delete('m1') then Replace('m2') where m2 reads m1: the replacement reads what m1 read."""
    torch.manual_seed(0)
    model = Net((Op("method", (0,), 1, "relu"), Op("conv", (1,), 1), Op("linear", (2,), 1)), 1).eval()
    x = torch.randn(2, 1, SIZE, SIZE)
    result = fxs.apply(model, [Delete("m1"), Replace("m2", nn.Identity())], example_inputs=(x,))
    with torch.no_grad():
        assert torch.equal(result.module(x), torch.relu(x))


def test_delete_then_replace_its_consumer_in_resnet18(resnet18):
    """The same on a real model: after deleting layer4, avgpool reads layer3 (and fc then does not fit)."""
    with pytest.raises(fxs.ValidateError) as err:
        fxs.apply(resnet18, [Delete("layer4"), Replace("avgpool", nn.AdaptiveMaxPool2d(1))],
                  example_inputs=(torch.randn(1, 3, 64, 64),))
    assert "at node 'fc'" in str(err.value) and "[1, 256]" in str(err.value)


def test_delete_then_replace_with_an_inferred_shape(resnet18):
    """After Delete('maxpool'), layer1.0.conv1 reads relu's output, whose shape is known: in_channels is inferred."""
    result = fxs.apply(resnet18, [Delete("maxpool"), Replace("layer1.0.conv1", fxs.new(nn.Conv2d, out_channels=64,
                                                                                          kernel_size=3, padding=1))],
                       example_inputs=(torch.randn(1, 3, 64, 64),))
    assert result.module.get_submodule("layer1.0.conv1").in_channels == 64
    assert result.module(torch.randn(2, 3, 64, 64)).shape == (2, 1000)
