"""Prune heads of an attention module: its q/k/v rows and output columns go; its output keeps its width.

Attention made of Linear layers computes its head count from their widths
(`view(..., -1, head_dim)`), so a copy with narrower layers is the pruned
module: as one call in a graph or in opaque code (kept class) the module is
swapped for that copy; traced through, each of its Linear layers is.

torch.nn.MultiheadAttention cannot hold fewer heads than embed_dim / head_dim
(its inner width is embed_dim), so its call becomes the same computation in
torch functions over the sliced tensors, which stay at the module's path
(`in_proj_weight`, `out_proj.weight`): the graph stays plain torch, for
model.py and graph.json alike, and each tensor's report says what it kept.
"""

from __future__ import annotations

import copy
import inspect
import operator

import torch.nn.functional as F
from torch import fx, nn

from ..errors import RewriteError, RuleError
from ..match import Heads, Match, Site, Unprunable, count_after, heads_of
from ..spec import Kept
from ._edited import Slot
from ._prune import _compose, _shrink_modules, prune, shrink


def prune_rule(editor, m: Match, sites: list[Site]) -> None:
    """A Prune rule on one graph: heads of the attention modules it selects, channels of the rest."""
    rest = [site for site in sites if not _heads(editor, m, site)]
    if rest:
        prune(editor, m, rest)
    editor.dirty = True


def _heads(editor, m: Match, site: Site) -> bool:
    """An attention module's unit is a head: True when the site is one (its heads pruned, or left alone)."""
    rule = m.rule
    node = editor.node(site.nodes[0])
    slot = editor.edited.modules.get(node.target) if site.leaf and node.op == "call_module" else None
    module = slot.value if slot is not None else None
    if module is None and site.path is not None and not site.leaf:
        module = editor.captured.model.get_submodule(site.path)
    try:
        layout = heads_of(module, site.path) if module is not None else None
    except Unprunable as err:
        if rule.optional:
            m.skipped.append(f"{site.where}: {err} (left alone)")
            return True
        editor.fail(m, site, f"the heads of '{site.path}' cannot be removed: {err}",
                    "select another attention module (one that holds its output projection too)")
    if layout is None:
        if rule.heads is not None:
            kind = type(module).__name__ if module is not None else "call"
            editor.fail(m, site, f"heads= removes heads of an attention module, and '{site.path or site.shown}' is a {kind}",
                        "select a torch.nn.MultiheadAttention or a transformers attention module")
        return False
    if rule.heads is None and rule.amount is None:
        editor.fail(m, site, f"'{site.path}' is an attention module ({type(module).__name__}), whose unit is a head",
                    "use heads=[...] or amount=")
    in_graph(editor, m, site, module, layout)
    return True


def choose(m: Match, module: nn.Module, layout: Heads, where: str) -> list[int]:
    rule = m.rule
    scores = layout.scores(module, rule.importance) if rule.indices is None else None
    if scores is not None and scores.numel() != layout.heads:
        raise RewriteError(f"{m.label} at '{where}': importance gave {scores.numel()} scores for {layout.heads} heads; "
                           "fix: return one score per (key/value) head")
    try:
        return rule.choose(module, layout.heads, where, unit="head", scores=scores)
    except RuleError as err:
        raise RewriteError(f"{m.label} at '{where}': {err.full.split(': ', 1)[1]}") from None


def shrunk(module: nn.Module, layout: Heads, heads) -> tuple[nn.Module, Kept]:
    """A copy of `module` without `heads` (blank tensors the transfer fills, keeping the listed indices)."""
    by_sub: dict[str, dict] = {}
    for (sub, name, axis), positions in layout.removed(heads).items():
        by_sub.setdefault(sub, {}).setdefault(name, {})[axis] = positions
    new, own = shrink(module, by_sub.pop("", {}))
    axes = dict(own)
    for sub, params in by_sub.items():
        made, kept = shrink(module.get_submodule(sub), params)
        _put(new, sub, made)
        axes.update({f"{sub}.{name}": a for name, a in kept.items()})
    left = layout.heads - len(heads)
    for (sub, attr), what in layout.counts.items():
        setattr(_own(new, sub), attr, count_after(what, layout, left))
    return new, Kept(axes)


def _own(root: nn.Module, path: str) -> nn.Module:
    """The module at `path` in `root`, copied on the way down (the original's modules stay as they are)."""
    at = root
    for part in [p for p in path.split(".") if p]:
        child = copy.copy(at._modules[part])
        child._modules = dict(child._modules)
        at._modules[part] = child
        at = child
    return at


def _put(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    _own(root, parent)._modules[leaf] = module


def opaque(m: Match, module: nn.Module, path: str) -> tuple[nn.Module, Kept]:
    """Prune heads of an attention module that opaque code calls (the module is swapped)."""
    try:
        layout = heads_of(module, path)
    except Unprunable as err:
        raise RewriteError(f"{m.label} at '{path}': the heads of '{path}' cannot be removed: {err}; "
                           "fix: select another attention module (one that holds its output projection too)") from None
    if layout is not None and layout.kind == "packed":
        raise RewriteError(f"{m.label}: '{path}' is a MultiheadAttention called by opaque code, and its pruned form is a graph; "
                           "fix: pass keep_class=False (--no-keep-class), or make that code traceable")
    if layout is None:
        return None
    return shrunk(module, layout, choose(m, module, layout, path))


def in_graph(editor, m: Match, site: Site, module: nn.Module, layout: Heads) -> None:
    """Prune heads of an attention module in a graph: swap it (one call), its Linear layers (traced
    through), or spell out a MultiheadAttention call over its sliced tensors."""
    heads = choose(m, module, layout, site.path)
    if not site.leaf:
        if layout.kind == "packed":
            editor.fail(m, site, f"'{site.path}' is traced through, so its heads are not one call", "capture it as a leaf module")
        cuts = {(f"{site.path}.{sub}" if sub else site.path, name, axis): pos for (sub, name, axis), pos in layout.removed(heads).items()}
        _shrink_modules(editor, m, cuts)
        return
    node = editor.node(site.nodes[0])
    calls = sum(1 for n in editor.graph.nodes if n.op == "call_module" and n.target == node.target)
    if calls > 1:
        editor.fail(m, site, f"'{site.path}' is called {calls} times, so its weights serve other calls too",
                    "prune heads of an attention module called once")
    new, kept = shrunk(module, layout, heads)
    before = editor.edited.modules[node.target].weights
    if isinstance(before, Kept):  # pruned before: positions count in the original
        kept = Kept(_compose(before.axes, kept.axes))
    editor.edited.modules[node.target] = Slot(new, node.target, m.index, weights=kept)
    if layout.kind == "packed":
        _spell_out(editor, m, site, node, module, layout.heads - len(heads))
    node.meta["fxs_rule"] = m.index


_MHA = inspect.signature(nn.MultiheadAttention.forward)


def _spell_out(editor, m: Match, site: Site, node: fx.Node, mha: nn.MultiheadAttention, heads: int) -> None:
    """Replace the call of `mha` by the same attention over `heads` heads, in torch functions."""
    args = _MHA.bind(None, *node.args, **node.kwargs)
    args.apply_defaults()
    a = args.arguments
    masks = [k for k in ("key_padding_mask", "attn_mask") if a[k] is not None] + (["is_causal"] if a["is_causal"] else [])
    if masks:
        editor.fail(m, site, f"'{site.path}' is called with {', '.join(masks)}, which its pruned form does not take",
                    "prune heads of attention called without masks")
    item = {}
    for user in node.users:
        if user.target is not operator.getitem or user.args[1] not in (0, 1):
            editor.fail(m, site, f"node '{user.name}' reads its result other than as (output, weights)",
                        "prune heads of attention whose output is taken by item")
        item[user.args[1]] = user
    if 1 in item and item[1].users:
        editor.fail(m, site, f"node '{item[1].name}' reads its attention weights, which average over every head",
                    "prune heads of attention whose weights are not read")
    g, p, d = editor.graph, node.target, mha.head_dim
    meta = editor.meta(a["query"].name, fresh=False)
    seq_first = not mha.batch_first and meta is not None and meta.shape is not None and len(meta.shape) == 3

    def made(op, target, *args):
        return editor.added(g.create_node(op, target, args), m, node)

    with g.inserting_before(node):
        weights = made("call_method", "chunk", made("get_attr", f"{p}.in_proj_weight"), 3)
        biases = made("call_method", "chunk", made("get_attr", f"{p}.in_proj_bias"), 3) if mha.in_proj_bias is not None else None

        def heads_of(x, i):
            y = made("call_function", F.linear, x, made("call_function", operator.getitem, weights, i),
                     made("call_function", operator.getitem, biases, i) if biases is not None else None)
            y = made("call_method", "transpose", y, 0, 1) if seq_first else y
            return made("call_method", "transpose", made("call_method", "unflatten", y, -1, (heads, d)), -3, -2)

        q, k, v = (heads_of(a[key], i) for i, key in enumerate(("query", "key", "value")))
        if mha.dropout:  # the weights' dropout, which a module switches off in eval
            path = editor.fresh_path(f"{p.replace('.', '_')}_dropout")
            editor.edited.modules[path] = Slot(nn.Dropout(mha.dropout).train(mha.training), None, m.index)
            scores = made("call_function", operator.mul, made("call_function", operator.matmul, q,
                                                               made("call_method", "transpose", k, -2, -1)), d ** -0.5)
            drop = made("call_module", path, made("call_method", "softmax", scores, -1))
            out = made("call_function", operator.matmul, drop, v)
        else:
            out = made("call_function", F.scaled_dot_product_attention, q, k, v)
        out = made("call_method", "flatten", made("call_method", "transpose", out, -3, -2), -2)
        out = made("call_method", "transpose", out, 0, 1) if seq_first else out
        bias = made("get_attr", f"{p}.out_proj.bias") if mha.out_proj.bias is not None else None
        out = made("call_function", F.linear, out, made("get_attr", f"{p}.out_proj.weight"), bias)
    if 0 in item:
        item[0].replace_all_uses_with(out)
        editor.alias[item[0].name] = out.name
    for user in item.values():
        g.erase_node(user)
        editor.by_name.pop(user.name, None)
    g.erase_node(node)
    editor.by_name.pop(node.name, None)
    editor.alias[node.name] = out.name
