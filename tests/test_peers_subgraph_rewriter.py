"""torch.fx's subgraph-rewriter cases, run through fxsurgery and through `replace_pattern` on the same module.

Ported from pytorch/pytorch, test/fx/test_subgraph_rewriter.py (class
TestSubgraphRewriter; each case names its test there). For each: the same
module is rewritten by `torch.fx.subgraph_rewriter.replace_pattern` and by a
fxsurgery `Rewrite` of the same pattern and replacement; the outputs are equal
bit for bit and the match counts are equal. Where fxsurgery deliberately
differs, the case says why.
"""

import pytest
import torch
from torch import nn
from torch.fx import subgraph_rewriter, symbolic_trace

import fxsurgery as fxs
from fxsurgery import Rewrite


def rule(pattern, replacement, **options):
    """A fxsurgery rule from torch.fx's (pattern, replacement) pair of functions."""
    body = {"pattern": staticmethod(pattern), "rewrite": lambda self, *matched: replacement,
            "describe": lambda self: getattr(pattern, "__name__", "pattern"), **options}
    return Rewrite(type("Ported", (fxs.Pattern,), body)(), optional=True)


def both(model, pattern, replacement, inputs, **options):
    """(torch.fx's output, its match count, fxsurgery's output, its match count) on copies of one module."""
    reference = symbolic_trace(model)
    matches = subgraph_rewriter.replace_pattern(reference, pattern, replacement)
    result = fxs.apply(model, [rule(pattern, replacement, **options)], example_inputs=inputs)
    with torch.no_grad():
        return reference(*inputs), len(matches), result.module(*inputs), result.plan.matches[0].count


class _Fn(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn


class _Fn1(_Fn):
    def forward(self, x):
        return self.fn(x)


class _Fn2(_Fn):
    def forward(self, x, y):
        return self.fn(x, y)


class _Fn3(_Fn):
    def forward(self, x, y, z):
        return self.fn(x, y, z)


class _Fn5(_Fn):
    def forward(self, a, b, c, d, e):
        return self.fn(a, b, c, d, e)


def Fn(fn):
    """A module whose forward is a function, as torch.fx's cases trace functions (torch.fx cannot trace *args)."""
    n = fn.__code__.co_argcount
    return {1: _Fn1, 2: _Fn2, 3: _Fn3, 5: _Fn5}[n](fn)


def neg_plus_relu(x):
    return torch.neg(x) + torch.relu(x)


def _sigmoids(n):
    def f(x):
        for _ in range(n):
            x = torch.sigmoid(x)
        return x
    return f


X = torch.randn(3, 4)
Y = torch.randn(3, 4)

# (torch.fx test name, forward, pattern, replacement, inputs, matches)
CASES = [
    ("test_subgraph_rewriter_preserves_logic", lambda x: torch.add(neg_plus_relu(x), neg_plus_relu(x)),
     neg_plus_relu, neg_plus_relu, (X,), 2),
    ("test_subgraph_rewriter_with_oneliner_pattern", lambda x: torch.add(torch.neg(x), torch.neg(x)),
     lambda x: torch.neg(x), lambda x: torch.relu(x), (X,), 2),
    ("test_subgraph_rewriter_single_pattern_match", lambda x: (lambda v: torch.add(v, v))(neg_plus_relu(x)),
     neg_plus_relu, lambda x: torch.relu(x), (X,), 1),
    ("test_subgraph_rewriter_multiple_pattern_match",
     lambda x, w1, w2: x + torch.max(torch.cat([w1, w2]).sum()) + torch.max(torch.cat([w1, w2]).sum()),
     lambda w1, w2: torch.cat([w1, w2]).sum(), lambda w1, w2: torch.stack([w1, w2]), (X, Y, torch.randn(3, 4)), 2),
    ("test_subgraph_rewriter_graph_argument_order", lambda x, y: torch.mm(x, y),
     lambda x, y: torch.mm(x, y), lambda x, y: torch.mm(x, y), (X, torch.randn(4, 5)), 1),
    ("test_subgraph_rewriter_correct_output_replacement", lambda x, y: (lambda v: torch.add(v, v))(torch.neg(y) + torch.relu(x)),
     lambda x: torch.relu(x), lambda x: torch.neg(x), (X, Y), 1),
    ("test_subgraph_rewriter_pattern_is_entire_graph", lambda x: (lambda a: torch.add(a, a))(torch.neg(x)),
     lambda x: (lambda a: torch.add(a, a))(torch.neg(x)), lambda x: (lambda a: torch.cat([a, a]))(torch.sigmoid(x)), (X,), 1),
    ("test_subgraph_rewriter_pattern_output_pattern_node_can_have_users_that_are_not_matched",
     lambda x: (lambda y: torch.neg(y) - y)(torch.relu(x)), lambda x: torch.relu(x), lambda x: torch.sigmoid(x), (X,), 1),
    ("test_subgraph_rewriter_replace_consecutive_submodules", _sigmoids(3),
     lambda x: torch.sigmoid(x), lambda x: torch.exp(x), (X,), 3),
    ("test_subgraph_rewriter_with_overlapping_matches", _sigmoids(4),
     _sigmoids(2), lambda x: torch.neg(x), (X,), 2),
    ("test_subgraph_rewriter_replace_with_multiple_outputs", lambda x: torch.sigmoid(x) + torch.relu(x),
     lambda a: (torch.sigmoid(a), torch.relu(a)), lambda x: (torch.exp(x), torch.abs(x)), (X,), 1),
    ("test_subgraph_rewriter_replace_with_duplicated_outputs",
     lambda x1, x2: (lambda x: torch.sigmoid(x) + torch.relu(x))(x1 - x2),
     lambda a1, a2: (lambda a: (torch.sigmoid(a), torch.relu(a), a))(a1 - a2),
     lambda x1, x2: (torch.abs(x2), torch.abs(x2), torch.exp(x1)), (X, Y), 1),
    ("test_subgraph_rewriter_with_unused_args", lambda x, y, z: x + y,
     lambda x, y: x + y, lambda x, y: x - y, (X, Y, torch.randn(3, 4)), 1),
    ("test_subgraph_rewriter_call_method", lambda x: x.dequantize().sigmoid().to(torch.float16),
     lambda x: x.dequantize().sigmoid().to(torch.float16), lambda x: x, (X,), 1),
    # the model's half of the case, without its in-place `x += 3` on the input (fxsurgery never writes to the caller's tensors)
    ("test_subgraph_rewriter_placeholder_matching", lambda x: torch.sigmoid((x + 3).dequantize()).to(torch.float16),
     lambda x: torch.sigmoid(x.dequantize()).to(torch.float16), lambda x: x, (X,), 1),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_same_as_replace_pattern(case):
    _, forward, pattern, replacement, inputs, count = case
    want, fx_count, got, our_count = both(Fn(forward), pattern, replacement, inputs)
    assert fx_count == our_count == count
    assert torch.equal(got, want)


def test_subgraph_rewriter_internal_pattern_nodes_cannot_have_users_that_are_not_matched():
    def forward(x, w1, w2, b1, b2):
        m1 = torch.cat([w1, w2])
        m2 = torch.cat([x, b2])
        t2 = torch.addmm(b1, m1, m2.t())
        return torch.sum(torch.sum(w1, 1)), torch.sum(t2), m1

    def pattern(x, w1, w2, b1, b2):
        return torch.addmm(b1, torch.cat([w1, w2]), torch.cat([x, b2]).t())

    inputs = (torch.randn(2, 3), torch.randn(2, 3), torch.randn(2, 3), torch.randn(4), torch.randn(2, 3))
    want, fx_count, got, our_count = both(Fn(forward), pattern, lambda x, w1, w2, b1, b2: torch.cat([x, w1, w2]), inputs)
    assert fx_count == our_count == 0
    assert all(torch.equal(g, w) for g, w in zip(got, want))


def test_subgraph_rewriter_traced_as_callable():
    class Pattern(nn.Module):
        def forward(self, x):
            return torch.neg(x) + torch.relu(x)

    class Replacement(nn.Module):
        def forward(self, x):
            return torch.sigmoid(x)

    model = Fn(lambda x: (lambda v: torch.add(v, v))(neg_plus_relu(x)))
    reference = symbolic_trace(model)
    assert len(subgraph_rewriter.replace_pattern(reference, symbolic_trace(Pattern()), symbolic_trace(Replacement()))) == 1
    # fxsurgery takes the replacement module itself (traced and inlined) and the pattern as a function of its inputs
    result = fxs.apply(model, [rule(lambda x: Pattern.forward(None, x), Replacement())], example_inputs=(X,))
    assert result.plan.matches[0].count == 1
    assert torch.equal(result.module(X), reference(X))


class SigmoidReLU(nn.Module):
    def __init__(self):
        super().__init__()
        self.sigmoid = nn.Sigmoid()
        self.submod = nn.ReLU()

    def forward(self, x):
        return self.submod(self.sigmoid(x + 1))


def test_subgraph_rewriter_replaces_referenced_submodules():
    class Pattern(nn.Module):
        def __init__(self):
            super().__init__()
            self.sigmoid = nn.Sigmoid()
            self.submod = nn.ReLU()

        def forward(self, x):
            return self.submod(self.sigmoid(x))

    class Replacement(nn.Module):
        def __init__(self):
            super().__init__()
            self.tanh = nn.Tanh()
            self.submod = nn.ReLU()

        def forward(self, x):
            return self.submod(self.tanh(x))

    model = SigmoidReLU()
    reference = symbolic_trace(model)
    assert len(subgraph_rewriter.replace_pattern(reference, Pattern(), Replacement())) == 1
    # Deliberate difference: torch.fx matches a module call by its attribute name (`self.sigmoid` only matches a
    # module the model also calls `sigmoid`, pytorch#139163); fxsurgery matches modules by type, so the pattern is
    # the chain of types.
    chain = fxs.Chain([nn.Sigmoid, nn.ReLU], Replacement())
    result = fxs.apply(model, [Rewrite(chain)], example_inputs=(X,))
    assert result.plan.matches[0].count == 1
    assert torch.equal(result.module(X), reference(X))
    assert torch.equal(result.module(X), torch.relu(torch.tanh(X + 1)))


class Linear128(nn.Module):
    """torch.fx's case builds its weights with torch.empty; here they are random so outputs can be compared."""

    def __init__(self, n):
        super().__init__()
        for i in range(n):
            setattr(self, f"w{i}", nn.Parameter(torch.randn(8, 8) / 4))
            setattr(self, f"b{i}", nn.Parameter(torch.randn(8)))


def gemm_bias_mul(a, b, bias):
    lin_res = torch.nn.functional.linear(a, b, bias=bias)
    return lin_res, lin_res * a


def test_subgraph_rewriter_nodes_with_kwargs():
    class M(Linear128):
        def __init__(self):
            super().__init__(1)

        def forward(self, in0):
            lin_res = torch.nn.functional.linear(in0, self.w0, bias=self.b0)
            return in0 * lin_res + in0

    def pattern(a, b, bias):
        lin_res = torch.nn.functional.linear(a, b, bias=bias)
        return lin_res, a * lin_res

    x = torch.randn(2, 8)
    want, fx_count, got, our_count = both(M(), pattern, gemm_bias_mul, (x,))
    assert fx_count == our_count == 1
    assert torch.equal(got, want)


def test_subgraph_rewriter_local_revert():
    class M(Linear128):
        def __init__(self):
            super().__init__(5)

        def forward(self, in0, in1):
            lin = torch.nn.functional.linear
            lin_res_2 = lin(lin(in1, self.w0, bias=self.b0), self.w1, bias=self.b1)
            sum_res_1 = in1 * lin_res_2 + in1
            lin_res_3 = lin(sum_res_1, self.w2, bias=self.b2)
            mul_res_2 = lin_res_3 * torch.sigmoid(lin_res_3)
            lin_res_5 = lin(lin(in0, self.w3, bias=self.b3), self.w4, bias=self.b4)
            return torch.cat([mul_res_2, in0 * lin_res_5 + in0], dim=1)

    def pattern(a, b, bias, c):
        lin_res = torch.nn.functional.linear(a, b, bias=bias)
        return lin_res, c * lin_res

    def replacement(a, b, bias, c):
        lin_res = torch.nn.functional.linear(a, b, bias=bias)
        return lin_res, lin_res * c

    inputs = (torch.randn(2, 8), torch.randn(2, 8))
    want, fx_count, got, our_count = both(M(), pattern, replacement, inputs)
    assert fx_count == our_count == 2
    assert torch.equal(got, want)


def test_replace_pattern_with_filters():
    # torch.fx's case quantizes between the two halves; here the halves stay float so that the model runs on its
    # example inputs (fxsurgery traces with them), and the filter is the pattern's constant test
    def forward(x):
        x = torch.add(x.dequantize(), 2).relu()
        y = x + 1
        return torch.add(x.dequantize(), y).relu()

    def pattern(x, num):
        return torch.add(x.dequantize(), num).relu()

    def replacement(x, num):
        return torch.mul(x, num)

    want, fx_count, got, our_count = both(Fn(forward), pattern, replacement, (X,))
    assert fx_count == our_count == 2
    assert torch.equal(got, want)
    result = fxs.apply(Fn(forward), [rule(pattern, replacement, constants={"num": lambda v: isinstance(v, (int, float))})],
                       example_inputs=(X,))
    assert result.plan.matches[0].count == 1   # torch.fx's second_input_is_scalar filter gives 1 match too
    x = torch.mul(X, 2)
    assert torch.equal(result.module(X), torch.add(x.dequantize(), x + 1).relu())


def test_replacement_with_attrs():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.tensor([1])
            self.b = torch.tensor([2])

        def forward(self, x):
            return x + self.a - self.b

    class Pattern(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.tensor([1])

        def forward(self, x):
            return x + self.a

    class Replacement(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = torch.tensor([3])

        def forward(self, x):
            return x - self.c

    reference = symbolic_trace(M())
    assert len(subgraph_rewriter.replace_pattern(reference, Pattern(), Replacement())) == 1
    pat = Pattern()
    body = {"t": pat.a, "pattern": lambda self, x: x + self.t, "rewrite": lambda self, *m: Replacement()}
    result = fxs.apply(M(), [Rewrite(type("WithAttr", (fxs.Pattern,), body)())], example_inputs=(torch.tensor([5]),))
    assert result.plan.matches[0].count == 1
    x = torch.tensor([5, 7])
    assert torch.equal(result.module(x), reference(x)) and torch.equal(result.module(x), x - 3 - 2)
