"""Edit one captured graph as a plan says.

The result is a graph plus a table of what each call_module / get_attr target
holds (`Slot`): an original module or tensor (with its path in the original,
for the transfer stage) or a module a rule made (with the rule's number).
Nodes a rule makes or rewires carry `meta["fxs_rule"]`, so later errors name
the rule that caused them.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

from torch import fx, nn

from .._util import get_path, shape_text
from ..capture import FIRST_ARGUMENT_OF, GUARD, Captured, Meta, PropagationError, propagate
from ..errors import RewriteError
from ..match import Match, Plan, Site, join, label
from ..spec import New, describe, like
from ._blame import shape_failure, source_line
from ._edited import Edited, InputChange, Slot
from ._fitting import build, expected_input, fit_call, mode_at, snake


@dataclass
class Rewriter:
    """Applies matches in rule order to a copy of the captured graph."""

    def __init__(self, captured: Captured, plan: Plan):
        self.captured, self.plan = captured, plan
        self.graph = fx.Graph()
        out = self.graph.graph_copy(captured.graph, {})
        self.graph.output(out)
        self.alias: dict[str, str] = {}
        self.by_name = {n.name: n for n in self.graph.nodes}
        gm = captured.gm
        state = captured.shape_state.fork() if captured.shape_state is not None else None
        self.edited = Edited(captured, plan, self.graph, {}, {}, shapes=dict(captured.shapes), shape_state=state)
        for n in self.graph.nodes:
            if n.op == "call_module":
                self.edited.modules[n.target] = Slot(gm.get_submodule(n.target), n.target)
            elif n.op == "get_attr":
                self.edited.tensors[n.target] = Slot(get_path(gm, n.target), n.target)
        self.dirty = False
        self._taken: set[str] | None = None
        self._reads: tuple | None = None  # (the rule, the graph's get_attr nodes) for warn_direct_reads
        self.cut_keys: list[str] | None = None  # Output rules: the keys the graph returns, in order

    # -- lookups ---------------------------------------------------------------
    def node(self, name: str) -> fx.Node:
        while name in self.alias:
            name = self.alias[name]
        return self.by_name[name]

    def added(self, node: fx.Node, m: Match, like: fx.Node) -> fx.Node:
        """Register a node a rule made, inside the modules that hold the node it sits by."""
        stack = dict(like.meta.get("nn_module_stack", {}))
        if like.op == "call_module":  # beside a module call, not inside that module
            stack = {k: v for k, v in stack.items() if like.target.startswith(v[0] + ".")}
        if node.op == "call_module":
            stack = {k: v for k, v in stack.items() if node.target.startswith(v[0] + ".")}
            stack[node.target] = (node.target, type(self.edited.modules[node.target].value))
        node.meta.update(fxs_rule=m.index, nn_module_stack=stack)
        self.by_name[node.name] = node
        return node

    def meta(self, name: str, fresh: bool = True) -> Meta | None:
        """A node's shape; `fresh`: propagate again first if an earlier rule changed what feeds it."""
        while name in self.alias:
            name = self.alias[name]
        if fresh and self.dirty and self._stale(name):
            self.repropagate(need=name)
        return self.edited.shapes.get(name)

    def _stale(self, name: str) -> bool:
        """Whether a rule made, rewired or swapped `name` or anything upstream of it."""
        start = self.by_name.get(name)
        stack, seen = [start] if start is not None else [], set()
        while stack:
            node = stack.pop()
            if node in seen:
                continue
            seen.add(node)
            slot = self.edited.modules.get(node.target) if node.op == "call_module" else None
            if ("fxs_rule" in node.meta or "fxs_rewired" in node.meta or node.name not in self.edited.shapes
                    or (slot is not None and slot.rule is not None)):
                return True
            stack.extend(node.all_input_nodes)
        return start is None

    def like(self, site: Site) -> tuple:
        """The dtype and device a module built at `site` takes (spec.like)."""
        tensors = self.tensor_inputs(site)
        meta = self.meta(tensors[0], fresh=False) if tensors else None
        owner = None
        if site.path:
            with contextlib.suppress(AttributeError):
                owner = self.captured.model.get_submodule(site.path)
        return like(owner, meta.dtype if meta is not None and meta.is_tensor else None)

    def mode(self, site: Site) -> bool:
        """The train/eval mode a module built at `site` takes (_fitting.mode_at)."""
        return mode_at(self.captured.model, site.path or "")

    def shape_in(self, site: Site) -> tuple | None:
        tensors = self.tensor_inputs(site)
        meta = self.meta(tensors[0]) if tensors else None
        return meta.shape if meta and meta.is_tensor else None

    def current_inputs(self, site: Site) -> list[str]:
        """What the site reads now: an earlier rule may have rewired it (a Delete upstream)."""
        nodes = [self.node(n) for n in site.nodes if n in self.by_name or n in self.alias]
        if not nodes:
            return list(site.inputs)
        inside, inputs = set(nodes), []
        for node in nodes:
            for arg in () if node.meta.get(GUARD) else node.all_input_nodes:  # as match reads a site (_sites.py)
                if arg not in inside and arg.name not in inputs:
                    inputs.append(arg.name)
        return inputs

    def tensor_inputs(self, site: Site) -> list[str]:
        inputs = self.current_inputs(site)
        if not self.edited.shapes:
            return inputs
        return [name for name in inputs if (self.meta(name, fresh=False) or Meta(None, None, "?")).is_tensor]

    def repropagate(self, need: str | None = None) -> None:
        """Shapes again after an edit. Asked for the shape of `need`: a node after it that fails (the old
        head, after an earlier rule changed what reaches it) is left to the rules to come, which may replace
        it (`Replace(head, fxs.new(...))` infers its size from `need`); the checks after the last rule
        still refuse it if none does."""
        self.dirty = False
        if self.captured.example_inputs is None:
            return
        try:
            self.edited.shapes = propagate(self.edited.table(), self.graph, self.edited.example_inputs(),
                                           self.edited.shape_state)
        except PropagationError as err:
            if need is None or need not in err.metas:
                raise shape_failure(err, self.edited) from None
            self.edited.shapes, self.dirty = dict(err.metas), True

    def fail(self, m: Match | None, site: Site | None, problem: str, fix: str):
        where = f" at '{site}'" if site else ""
        raise RewriteError(f"{m.label if m is not None else 'a rule'}{where}: {problem}; fix: {fix}")

    def one_input(self, m: Match, site: Site, deleting: bool = False) -> fx.Node:
        inputs = self.tensor_inputs(site)
        if len(inputs) != 1:
            one_call = (f", or make it one call (leaf_paths=['{site.module}']) so that its first argument passes through"
                        if deleting and site.path is not None and not site.leaf else "")
            self.fail(m, site, f"it reads {len(inputs)} tensors ({', '.join(inputs) or 'none'}), so there is no single input to pass on",
                      f"replace it instead, or select a node with one input{one_call}")
        return self.node(inputs[0])

    def residual(self, site: Site) -> fx.Node | None:
        """A deleted block called with several inputs passes its first argument on (the residual stream, as
        `Skip` does in opaque code), where that argument is a tensor of the very shape and dtype it returned."""
        inputs = self.tensor_inputs(site)
        if site.path is None or site.output is None or len(inputs) < 2 or not self.edited.shapes:
            return None
        if site.leaf:
            node = self.node(site.nodes[0])
            first = node.args[0] if node.op == "call_module" and node.args else None
        else:  # traced through: the tracer marked the node the call took first
            firsts = [self.node(n) for n in inputs if site.path in self.node(n).meta.get(FIRST_ARGUMENT_OF, ())]
            first = firsts[0] if len(firsts) == 1 else None
        if not isinstance(first, fx.Node):
            return None
        into, out = self.meta(first.name), self.meta(site.output)
        same = into is not None and out is not None and into.is_tensor and out.is_tensor
        return first if same and (into.shape, into.dtype) == (out.shape, out.dtype) else None

    def one_output(self, m: Match, site: Site) -> fx.Node:
        if site.output is None:
            self.fail(m, site, f"its value leaves through {len(site.outputs)} nodes ({', '.join(site.outputs)})",
                      "select a module or node with a single output")
        return self.node(site.output)

    def erase(self, site: Site) -> None:
        for name in reversed(site.nodes):
            node = self.by_name.get(name)
            if node is not None and not node.users:
                self.graph.erase_node(node)
                del self.by_name[name]

    def taken(self) -> set[str]:
        if self._taken is None:  # every target and every module above one, kept as rules add more
            self._taken = set()
            for target in [*self.edited.modules, *self.edited.tensors]:
                self._claim(target)
        return self._taken

    def fresh_path(self, base: str, named: list[str] | None = None, m: Match | None = None, site: Site | None = None) -> str:
        """A free module path from `base` (`base_1`...); `named`: the paths made so far under a name a rule gave
        (`m`), refused inside a layer the graph calls whole (no suffix frees it) or where the model has a module."""
        parts = base.split(".")
        inside = next((a for a in (".".join(parts[:i]) for i in range(1, len(parts))) if a in self.edited.modules
                       or a in self.edited.tensors), None)
        if inside is not None or (named == [] and base in self.taken()):
            problem = (f"puts the new layer inside '{inside}', a layer the graph calls whole" if inside is not None
                       else f"names a module already there ('{base}')")
            self.fail(m, site, f"insert name {base!r} {problem}", f"name it beside that layer, e.g. {base.replace('.', '_')!r}"
                      if inside is not None else "choose a name no module has")
        path, k = base, 1
        while path in self.taken():
            path, k = f"{base}_{k}", k + 1
        self._claim(path)
        if named is not None:
            named.append(path)
        return path

    def _claim(self, target: str) -> None:
        parts = target.split(".")
        self._taken.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))

    def note_input(self, m: Match, node: fx.Node, wanted: tuple | None, why: str) -> None:
        """Record that an example input must change shape (a placeholder now feeds another layer)."""
        original = self.captured.shapes.get(node.name)
        if node.op != "placeholder" or wanted is None or original is None or tuple(wanted) == original.shape:
            return
        if self.captured.path or self.captured.call is not None:
            self.fail(m, None, f"the input '{node.name}' of the graph at '{self.captured.path}' would change shape "
                      f"from {shape_text(original.shape)} to {shape_text(wanted)}, but opaque code calls it",
                      "keep the shapes at that boundary, or make the calling module traceable")
        self.edited.inputs[node.name] = InputChange(node.name, original.shape, tuple(wanted), m.index, f"{label(m.index, m.rule)} {why}")

    # -- actions ---------------------------------------------------------------
    def delete(self, m: Match, sites: list[Site]) -> None:
        for site in sites:
            source = self.residual(site) or self.one_input(m, site, deleting=True)
            out = self.one_output(m, site)
            # what the consumers expected matters only where they will now read a model input
            expected = self.meta(out.name) if source.op == "placeholder" else None
            users = list(out.users)
            out.replace_all_uses_with(source)
            # the blocks that took `out` first now take `source` first: deleting the next block passes it on
            taken = out.meta.get(FIRST_ARGUMENT_OF, [])
            source.meta[FIRST_ARGUMENT_OF] = [*source.meta.get(FIRST_ARGUMENT_OF, []), *taken]
            for user in users:
                user.meta["fxs_rewired"] = m.index  # read for blame, without claiming the node
            self.erase(site)
            self.note_input(m, source, expected.shape if expected and expected.is_tensor else None,
                            f"deleted {site.path or site.key}, so its consumers read this input")
            self.dirty = True

    def replace(self, m: Match, sites: list[Site]) -> None:
        replacement = m.rule.replacement
        by_path: dict[str | None, list[Site]] = {}
        chosen = set(m.modules)  # a set: one look-up per site, not a walk of the list
        for site in sites:
            by_path.setdefault(site.path if site.module in chosen else None, []).append(site)
        for path, sites in by_path.items():
            if path is not None and not callable_only(replacement):
                self.replace_module(m, path, sites)
            else:
                for site in sites:
                    self.replace_call(m, site)
        self.dirty = True

    def replace_module(self, m: Match, path: str, sites: list[Site]) -> None:
        needs_shape = isinstance(m.rule.replacement, New) and m.rule.replacement.missing()
        shapes = {self.shape_in(s) for s in sites} if needs_shape else {None}
        if len(shapes) > 1:
            self.fail(m, sites[0], f"'{path}' is called with different shapes ({', '.join(shape_text(s) for s in shapes if s)})",
                      "replace each call site separately or give the shape arguments explicitly")
        module = build(m, m.rule.replacement, next(iter(shapes)), sites[0], self.like(sites[0]), self.mode(sites[0]))
        self.edited.modules[path] = Slot(module, path, m.index, weights=m.rule.weights)
        for site in sites:
            inputs = [self.node(n) for n in self.current_inputs(site)]
            if inputs and inputs[0].op == "placeholder":  # the model's input must now fit the new module
                meta = self.meta(inputs[0].name)
                self.note_input(m, inputs[0], expected_input(module, meta.shape) if meta and meta.is_tensor else None,
                                f"replaced {path} with {describe(module)}")
            if site.leaf:
                self.node(site.nodes[0]).meta["fxs_rule"] = m.index
                continue
            out = self.one_output(m, site)
            with self.graph.inserting_after(out):
                new = self.added(self.graph.call_module(path, tuple(self.node(n) for n in self.tensor_inputs(site))), m, out)
            out.replace_all_uses_with(new)
            self.alias[out.name] = new.name
            self.erase(site)
        if not all(s.leaf for s in sites):  # a traced-through module: its parts are gone with it
            for target in [t for t in self.edited.modules if t.startswith(path + ".")]:
                del self.edited.modules[target]
        self.warn_direct_reads(m, path)

    def warn_direct_reads(self, m: Match, path: str) -> None:
        """The forward may read a replaced module's tensors itself (`self.fc.weight`): those reads are not replaced."""
        if self._reads is None or self._reads[0] is not m:  # the graph's reads, once per rule: not a walk per module
            self._reads = (m, [n for n in self.graph.nodes if n.op == "get_attr"])
        for node in self._reads[1]:
            if not node._erased and str(node.target).startswith(path + "."):
                line = source_line(self.captured.model, node, path)
                self.plan.warnings.append(
                    f"{m.label}: the forward also reads {join(self.captured.path, node.target)} directly (node '{node.name}'"
                    f"{', ' + line if line else ''}): that read is not replaced, so {node.target} keeps the replaced module's "
                    "tensor; fix: make the forward call the module instead of reading its tensors, or rewrite that read too")

    def replace_call(self, m: Match, site: Site) -> None:
        out = self.one_output(m, site)
        old = self.node(site.nodes[0]) if site.leaf else None
        args = tuple(old.args) if old is not None else tuple(self.node(n) for n in self.tensor_inputs(site))
        kwargs = dict(old.kwargs) if old is not None else {}
        replacement = m.rule.replacement
        with self.graph.inserting_after(out):
            if callable_only(replacement):
                args, kwargs = fit_call(replacement, args, kwargs)
                new = self.graph.call_function(replacement, args, kwargs)
            else:
                source = self.one_input(m, site)  # a module takes one tensor: `add(a, b)` cannot become one
                if args and args[0] is not source:  # `cat([v, v])` reads one tensor, but inside a list
                    kind = "a list" if isinstance(args[0], (list, tuple)) else f"a {type(args[0]).__name__}"
                    self.fail(m, site, f"it reads '{source.name}' inside {kind}, not as its first argument, "
                              "so a module cannot take its place", "replace it with a function, or select another node")
                module = build(m, replacement, self.shape_in(site), site, self.like(site), self.mode(site))
                path = self.fresh_path(site.key.split("@")[0].replace(".", "_"))
                self.edited.modules[path] = Slot(module, None, m.index)
                args, kwargs = fit_call(module, args, kwargs)
                new = self.graph.call_module(path, args, kwargs)
        self.added(new, m, out)
        out.replace_all_uses_with(new)
        self.alias[out.name] = new.name
        self.erase(site)

    def insert(self, m: Match, sites: list[Site]) -> None:
        rule = m.rule
        made: dict[str, list[str]] = {}  # a module's path: the parametrised layers inserted at its call sites
        named: list[str] = []  # the paths made under the rule's own name
        for site in sites:
            anchor = self.one_output(m, site) if rule.after is not None else self.one_input(m, site)
            meta = self.meta(anchor.name, fresh=isinstance(rule.module, New) and bool(rule.module.missing()))
            module = build(m, rule.module, meta.shape if meta and meta.is_tensor else None, site, self.like(site),
                           self.mode(site))
            where = site.path or site.key or self.captured.path.rpartition(".")[2]
            base = rule.name or f"{where.split('@')[0]}_{snake(type(module).__name__)}"
            if rule.name and self.captured.path and base.startswith(f"{self.captured.path}."):  # the model's path of it
                base = base[len(self.captured.path) + 1:]
            path = self.fresh_path(base, named, m, site) if rule.name else self.fresh_path(base)
            self.edited.modules[path] = Slot(module, None, m.index)
            self.splice(m, site, anchor, lambda value, path=path: self.graph.call_module(path, (value,)))
            if any(True for _ in module.parameters()):
                made.setdefault(site.path, []).append(path)
        shared = {at: paths for at, paths in made.items() if at and len(paths) > 1}  # a hand edit wrapping it would share one
        if shared:
            at, paths = next(iter(shared.items()))
            more = f" (and {len(shared) - 1} more layers called at several places)" if len(shared) > 1 else ""
            self.plan.warnings.append(
                f"{m.label}: the forward calls '{at}' at {len(paths)} places, so each gets its own new layer with its own "
                f"weights ({', '.join(paths[:3])}){more}; to share one, replace '{at}' with nn.Sequential(it, the new layer)")
        self.dirty = True

    def detach(self, m: Match, sites: list[Site]) -> None:
        for site in sites:
            anchors = [self.one_output(m, site)] if m.rule.after is not None else [self.node(n) for n in self.tensor_inputs(site)]
            for anchor in anchors:
                meta = self.meta(anchor.name, fresh=False)  # only whether it is a tensor
                if meta is not None and not meta.is_tensor:
                    self.fail(m, site, f"value '{anchor.name}' has type {meta.kind}, not Tensor; only tensors carry gradients",
                              "detach a node whose value is a tensor")
                new = self.splice(m, site, anchor, lambda value: self.graph.create_node(
                    "call_method", "detach", (value,), name=f"{value.name}_detach"))
                if meta is not None:
                    self.edited.shapes[new.name] = meta

    def splice(self, m: Match, site: Site, anchor: fx.Node, make) -> fx.Node:
        """Put a new node on the anchor's edges: its users (after=) or the site's reads (before=)."""
        inside = {self.node(n) for n in site.nodes if n in self.by_name or n in self.alias}
        after = m.rule.after is not None
        readers = [u for u in anchor.users if (u not in inside) == after]
        point = anchor if after else min(inside, key=_order(self.graph))
        with (self.graph.inserting_after(point) if after else self.graph.inserting_before(point)):
            new = self.added(make(anchor), m, anchor)
        for user in readers:
            if user is not new:
                user.replace_input_with(anchor, new)
        return new


def callable_only(thing: Any) -> bool:
    return callable(thing) and not isinstance(thing, (nn.Module, New, type))


def _order(graph: fx.Graph):
    position = {n: i for i, n in enumerate(graph.nodes)}
    return lambda n: position[n]



