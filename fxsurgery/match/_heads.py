"""Attention heads: which rows and columns of which tensors each head owns.

A head is removed by slicing its query, key and value rows and its columns of
the output projection; the module's output keeps its width, so nothing outside
the attention module follows. With grouped-query attention (fewer key/value
heads than query heads) the unit is a key/value head: its group of query
heads goes with it, so the query heads per group stay as they were.

Removing head h is exact when the result equals the original with h's value
rows (and bias) zeroed: h then writes zeros into the output projection
(`zero_heads`, the reference the tests check against).

Layouts known: torch.nn.MultiheadAttention with packed `in_proj_weight`;
modules holding `q_proj`, `k_proj`, `v_proj`, `o_proj` Linears and
`head_dim` (Llama, Qwen2, Mistral); BERT's attention (`self.query/key/value`
with `attention_head_size`, `output.dense`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ._groupdata import Unprunable

# (query, key, value, output, where head_dim is read) for attention made of Linear layers
_LINEAR_LAYOUTS = (("q_proj", "k_proj", "v_proj", "o_proj", "head_dim"),
                   ("self.query", "self.key", "self.value", "output.dense", "self.attention_head_size"))
# attributes some attention modules keep about their head counts: (attribute, what it counts)
_COUNTS = {"num_heads": "q", "num_attention_heads": "q", "num_key_value_heads": "kv", "all_head_size": "q_width"}


def _rows(start: int, size: int, count: int) -> tuple:
    """Per unit i, the positions start + i*size ... start + (i+1)*size - 1."""
    return tuple(tuple(range(start + i * size, start + (i + 1) * size)) for i in range(count))


@dataclass
class Heads:
    """The heads of one attention module and every tensor axis each one owns (paths relative to the module)."""

    kind: str                  # 'packed' (torch.nn.MultiheadAttention) | 'linear'
    heads: int                 # key/value heads: what heads= counts
    group: int                 # query heads per key/value head
    head_dim: int
    slices: dict = field(default_factory=dict)   # (module path, tensor, axis) -> per head: its positions
    value: dict = field(default_factory=dict)    # the same, for the value rows alone (zeroing them silences a head)
    counts: dict = field(default_factory=dict)   # (module path, attribute) -> new value per heads kept: fn(kept)

    def removed(self, heads) -> dict[tuple, set]:
        return {key: {p for h in heads for p in index[h]} for key, index in self.slices.items()}

    def scores(self, module: nn.Module, importance) -> torch.Tensor:
        """One score per head: the l1 or l2 norm of every weight it owns, or importance(module)."""
        if callable(importance):
            return torch.as_tensor(importance(module)).detach().flatten()
        total = torch.zeros(self.heads, dtype=torch.float64)
        for (path, name, axis), index in self.slices.items():
            t = _tensor(module, path, name).detach().double()
            for h, positions in enumerate(index):
                part = t.index_select(axis, torch.tensor(positions))
                total[h] += part.abs().sum() if importance == "l1" else part.pow(2).sum()
        return total if importance == "l1" else total.sqrt()


def _tensor(module: nn.Module, path: str, name: str) -> torch.Tensor:
    return getattr(module.get_submodule(path) if path else module, name)


def heads_of(module: nn.Module, where: str) -> Heads | None:
    """The heads of `module` if it is an attention module of a known layout; None if it is no attention
    module at all; Unprunable (naming `where`) for an attention module this cannot prune exactly."""
    if isinstance(module, nn.MultiheadAttention):
        return _packed(module, where)
    for q, k, v, o, dim in _LINEAR_LAYOUTS:
        try:
            parts = [module.get_submodule(p) for p in (q, k, v, o)]
        except AttributeError:
            continue
        owner, _, attr = dim.rpartition(".")
        head_dim = getattr(module.get_submodule(owner) if owner else module, attr, None)
        return _linear(module, where, (q, k, v, o), parts, head_dim)
    if all(hasattr(module, n) for n in ("query", "key", "value")) and hasattr(module, "attention_head_size"):
        raise Unprunable(where, f"{type(module).__name__} holds the query, key and value but not the output projection")
    return None


def _packed(m: nn.MultiheadAttention, where: str) -> Heads:
    reason = ("its query, key and value weights are separate (kdim or vdim differs from embed_dim)" if not m._qkv_same_embed_dim
              else "it adds learned key/value biases (add_bias_kv)" if m.bias_k is not None
              else "it adds a zero key/value (add_zero_attn)" if m.add_zero_attn else None)
    if reason:
        raise Unprunable(where, f"MultiheadAttention heads are not followed when {reason}")
    e, h, d = m.embed_dim, m.num_heads, m.head_dim
    qkv = tuple(q + k + v for q, k, v in zip(_rows(0, d, h), _rows(e, d, h), _rows(2 * e, d, h)))
    out = Heads("packed", h, 1, d)
    out.slices[("", "in_proj_weight", 0)] = qkv
    out.value[("", "in_proj_weight", 0)] = _rows(2 * e, d, h)
    if m.in_proj_bias is not None:
        out.slices[("", "in_proj_bias", 0)] = qkv
        out.value[("", "in_proj_bias", 0)] = _rows(2 * e, d, h)
    out.slices[("out_proj", "weight", 1)] = _rows(0, d, h)
    return out


def _linear(module: nn.Module, where: str, paths: tuple, parts: list, head_dim) -> Heads:
    if not all(isinstance(p, nn.Linear) for p in parts):
        kinds = ", ".join(f"{p} is a {type(m).__name__}" for p, m in zip(paths, parts) if not isinstance(m, nn.Linear))
        raise Unprunable(where, f"its projections are not all Linear layers ({kinds})")
    if not isinstance(head_dim, int) or head_dim <= 0:
        raise Unprunable(where, f"{type(module).__name__} does not say its head size (head_dim)")
    q, k, v, o = parts
    if k.out_features != v.out_features or q.out_features % head_dim or k.out_features % head_dim \
            or o.in_features != q.out_features:
        raise Unprunable(where, f"its projections ({q.out_features}, {k.out_features}, {v.out_features} -> {o.in_features}) "
                         f"are not whole heads of {head_dim}")
    n_q, n_kv = q.out_features // head_dim, k.out_features // head_dim
    if n_q % n_kv:
        raise Unprunable(where, f"{n_q} query heads do not split into groups for {n_kv} key/value heads")
    group = n_q // n_kv
    out = Heads("linear", n_kv, group, head_dim)
    for path, mod, size in ((paths[0], q, group * head_dim), (paths[1], k, head_dim), (paths[2], v, head_dim)):
        for name in ("weight", "bias"):
            if getattr(mod, name) is not None:
                out.slices[(path, name, 0)] = _rows(0, size, n_kv)
                if mod is v:
                    out.value[(path, name, 0)] = _rows(0, size, n_kv)
    out.slices[(paths[3], "weight", 1)] = _rows(0, group * head_dim, n_kv)
    for path in dict.fromkeys(("", *(p.rpartition(".")[0] for p in paths))):
        sub = module.get_submodule(path) if path else module
        for attr, what in _COUNTS.items():
            if isinstance(getattr(sub, attr, None), int) and not isinstance(getattr(sub, attr), bool):
                out.counts[(path, attr)] = what
    return out


def count_after(what: str, heads: Heads, kept: int) -> int:
    """The new value of a head-count attribute when `kept` key/value heads stay."""
    return {"q": kept * heads.group, "kv": kept, "q_width": kept * heads.group * heads.head_dim}[what]


def zero_heads(model: nn.Module, path: str, heads) -> nn.Module:
    """The exactness reference: `model` with the value rows (and bias) of `heads` of attention module `path`
    zeroed (in place), so that those heads add nothing to the output projection."""
    attention = model.get_submodule(path)
    layout = heads_of(attention, path)
    with torch.no_grad():
        for (sub, name, axis), index in layout.value.items():
            t = _tensor(attention, sub, name)
            t.index_fill_(axis, torch.tensor(sorted(p for h in heads for p in index[h])), 0.0)
    return model
