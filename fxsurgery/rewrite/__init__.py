"""Apply a plan: the only stage that edits structure.

Sites in captured graphs are edited graph by graph (_editor.py). Modules
that opaque Python calls are swapped, skipped or wrapped instead (ModuleEdit);
the transfer stage installs them when it assembles the new module.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn
from torch.utils import _pytree as pytree

from .._util import first_line
from ..capture import Capture, Captured, Meta
from ..errors import RewriteError
from ..match import Match, Plan
from ..spec import Delete, Detach, Freeze, Insert, Layers, New, Output, Prune, Replace, Rewrite, like
from ._blame import shape_failure
from ._derivation import Derivation, WroteSource
from ._edited import Edited, InputChange
from ._editor import Rewriter, callable_only
from ._fitting import build, mode_at
from ._heads import opaque as opaque_heads
from ._heads import prune_rule
from ._pattern_edits import cut_output, rewrite_chains
from ._wrappers import STAY_EVAL_SOURCE, Around, Call, Skip, StayEval, hold_by_path, is_stay_eval, stay_eval, stays_eval

__all__ = [
    "Around", "Edited", "InputChange", "ModuleEdit", "Rewritten", "StayEval", "module_edits", "rewrite",
    "mode_at", "shape_failure", "hold_by_path", "stays_eval", "stay_eval", "is_stay_eval", "STAY_EVAL_SOURCE",
]


@dataclass
class ModuleEdit:
    """A change to a module that opaque code calls: replaced, skipped, wrapped, or a layer list rearranged."""

    path: str
    rule: int
    kind: str                           # replace | delete | wrap | layers
    module: nn.Module | None = None     # replace: the new module
    before: nn.Module | None = None     # wrap: applied to the first argument
    after: nn.Module | None = None      # wrap: applied to the output
    cut_in: bool = False                # wrap: detach what goes in
    cut_out: bool = False               # wrap: detach what comes out
    weights: Any = "new"                # replace: how the old module's tensors fill the new one
    sources: tuple = ()                 # replace by a pattern: the modules its tensors were computed from
    computed: frozenset | None = None   # of its tensors, those computed from them (None: all)
    freeze: tuple = ()                  # replace by a pattern: paths (below the new module) that start frozen
    order: tuple = ()                   # layers: new layer i is old layer order[i]
    inserted: int | None = None         # layers: the position that holds `module` (an Insert into the list)


@dataclass
class Rewritten:
    """Every edited graph and every module edit, with the plan that made them."""

    capture: Capture
    plan: Plan
    graphs: dict[str, Edited]
    edits: list[ModuleEdit] = field(default_factory=list)

    @property
    def root(self) -> Edited | None:
        """The graph of the whole model, when there is one."""
        regions = self.capture.regions
        own = regions and regions[0].path == "" and regions[0].call is None  # called as the model is
        return self.graphs.get("") if own else None

    def example_inputs(self) -> tuple | None:
        root = self.root
        return root.example_inputs() if root is not None else self.capture.example_inputs

    def input_changes(self) -> list[InputChange]:
        return list(self.root.inputs.values()) if self.root is not None else []

    def rule_of(self, index: int) -> Match:
        return self.plan.matches[index - 1]


def _first_tensor(tree) -> tuple | None:
    """The shape of the first tensor in a recorded output (a pytree of Meta)."""
    for leaf in pytree.tree_leaves(tree):
        if isinstance(leaf, Meta) and leaf.is_tensor:
            return leaf.shape
    return None


def module_edits(capture: Capture, plan: Plan) -> list[ModuleEdit]:
    """Edits for the sites that sit in opaque code (modules with no graph around them)."""
    edits = []
    for m in plan.matches:
        for site in (s for s in m.sites if s.region is None):
            path, call = site.path, capture.calls.get(site.path)
            shape_in = call.first_tensor().shape if call is not None and call.first_tensor() else None
            shape_out = _first_tensor(call.output) if call is not None else None
            rule = m.rule
            if isinstance(rule, Prune) and rule.channels is None and rule.neurons is None:
                made = opaque_heads(m, capture.model.get_submodule(path), path)  # heads stay inside their module
                if made is not None and any(e.path == path for e in edits):
                    raise RewriteError(f"{m.label}: '{path}' was already swapped by an earlier rule, whose head numbers this one "
                                       "would not see; fix: prune its heads in one rule")
                if made is not None:
                    edits.append(ModuleEdit(path, m.index, "replace", module=made[0], weights=made[1]))
                    continue
            if isinstance(rule, Prune):  # channels are followed through a graph, and opaque code has none
                raise RewriteError(f"{m.label}: '{path}' is called by opaque code ({'kept class' if capture.kept else 'not traced'}), "
                                   "so the layers its channels reach are not known; fix: pass keep_class=False (--no-keep-class), or make that code traceable")
            if isinstance(rule, Layers):
                edits.append(ModuleEdit(path, m.index, "layers", order=rule.order))
            elif isinstance(rule, Delete):
                edits.append(ModuleEdit(path, m.index, "delete", module=Skip()))
            elif isinstance(rule, Replace):
                owner, mode = like(capture.model.get_submodule(path)), mode_at(capture.model, path)
                module = Call(rule.replacement) if callable_only(rule.replacement) else build(m, rule.replacement, shape_in, path, owner, mode)
                edits.append(ModuleEdit(path, m.index, "replace", module=module, weights=rule.weights))
            elif isinstance(rule, Insert):
                after = rule.after is not None
                module = build(m, rule.module, shape_out if after else shape_in, path, like(capture.model.get_submodule(path)),
                               mode_at(capture.model, path))
                edits.append(_into_list(capture, path, m.index, module, after)
                             or (ModuleEdit(path, m.index, "wrap", after=module) if after
                                 else ModuleEdit(path, m.index, "wrap", before=module)))
            elif isinstance(rule, Detach):
                edits.append(ModuleEdit(path, m.index, "wrap", cut_out=rule.after is not None, cut_in=rule.before is not None))
            elif isinstance(rule, Rewrite):
                edits.append(_pattern_edit(m, capture.model.get_submodule(path), path, shape_in))
    return edits


def _into_list(capture: Capture, path: str, rule: int, module: nn.Module, after: bool) -> ModuleEdit | None:
    """A layer inserted beside a layer of its own class in a module list (a copy of a decoder layer)
    joins the list, as Layers would place it: the model's code then runs it like any other layer
    (with its own KV-cache slot), and the configuration counts it."""
    parent, _, index = path.rpartition(".")
    if not parent or not index.isdigit():
        return None
    stack = capture.model.get_submodule(parent)
    if not isinstance(stack, nn.ModuleList) or type(module) is not type(stack[int(index)]):
        return None
    i = int(index)
    at = i + 1 if after else i
    order = (*range(at), i, *range(at, len(stack)))  # the new layer counts as one like layer i
    return ModuleEdit(parent, rule, "layers", module=module, order=order, inserted=at)


def _pattern_edit(m: Match, module: nn.Module, path: str, shape_in: tuple | None) -> ModuleEdit:
    """A one-module pattern on a module that opaque code calls: the module itself is swapped."""
    pattern = m.rule.pattern
    following = Derivation([module])
    try:
        with following:
            made = pattern.rewrite(module)
    except ValueError as err:  # a pattern refusing this match (LoRA's rank above a layer's size)
        raise RewriteError(f"{m.label} at '{path}': {pattern.describe()}: {first_line(err)}; "
                           "fix: change the rule's params, or select other layers") from None
    except WroteSource as wrote:
        raise RewriteError(f"{m.label} at '{path}': {pattern.describe()}.rewrite writes into the matched {wrote.name}, which "
                           "the original model holds; fix: compute a new tensor from it (new.weight.copy_(linear.weight * 2))") from None
    if made is None:
        return ModuleEdit(path, m.index, "delete", module=Skip())
    if isinstance(made, New):
        made = build(m, made, shape_in, path, like(module), module.training)
    if not isinstance(made, nn.Module):
        made = Call(made)
    inside = [p for p, sub in made.named_modules() if sub is module] if pattern.freeze_matched else []
    computed = following.derived(made)
    return ModuleEdit(path, m.index, "replace", module=made, freeze=tuple(inside), computed=computed,
                      sources=(path,) if pattern.weights == "derived" and computed != frozenset() else ())


def rewrite(capture: Capture, plan: Plan) -> Rewritten:
    """Edit every captured graph, and plan the module edits in opaque code."""
    graphs = {region.path: _edit_graph(region, plan) for region in capture.regions}
    return Rewritten(capture, plan, graphs, module_edits(capture, plan))


# What each rule kind does to a graph; freezing acts on the assembled module, in the transfer stage.
ACTIONS = {Delete: Rewriter.delete, Replace: Rewriter.replace, Insert: Rewriter.insert, Detach: Rewriter.detach,
           Rewrite: rewrite_chains, Output: cut_output, Prune: prune_rule}


def _edit_graph(region: Captured, plan: Plan) -> Edited:
    """Apply every match that has sites in this graph, in rule order."""
    editor = Rewriter(region, plan)
    for m in plan.matches:
        sites = [s for s in m.sites if s.region == region.path]
        if sites and not isinstance(m.rule, Freeze):
            ACTIONS[type(m.rule)](editor, m, sites)
    return editor.edited
