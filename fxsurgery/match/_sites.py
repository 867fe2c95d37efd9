"""Where rules act: sites in the captured graphs, or modules inside opaque code.

A site is one invocation of a module (a leaf call, or the nodes traced
through a non-leaf module's forward), one function or method call, the
boundary of a whole graph, or a module that opaque Python calls. Selectors
see the whole model: a module path or type selects wherever the module sits.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, replace

from torch import fx, nn

from ..capture import GUARD, Capture, Captured, module_stack, qualified_names
from ..spec import Selector


@dataclass(frozen=True)
class Site:
    """One place a rule acts on."""

    key: str                  # invocation key ('layer1.0.relu@1') or node name, relative to its graph
    path: str | None          # module path relative to its graph; None for function/method calls
    leaf: bool                # a single node (or a module in opaque code)
    nodes: tuple[str, ...]    # node names, in graph order
    inputs: tuple[str, ...]   # nodes outside the site that it reads
    outputs: tuple[str, ...]  # site nodes read outside the site
    region: str | None = ""   # the graph's module path ('' = the model's); None = a module in opaque code
    name: str = ""            # a single call's qualified name ('layer2.0.add', 'layer1.0.relu_1'), relative to its graph

    @property
    def output(self) -> str | None:
        return self.outputs[0] if len(self.outputs) == 1 else None

    @property
    def module(self) -> str | None:
        """The module's path in the model, or None for a function or method call."""
        if self.path is None:
            return None
        return join(self.region or "", self.path)

    @property
    def where(self) -> str:
        return self.key if not self.region else join(self.region, self.key)

    @property
    def shown(self) -> str:
        """How the user names it: a call by its qualified name, a module invocation by its key."""
        return join(self.region or "", self.name) if self.name else self.where

    def __str__(self) -> str:
        return self.where


def join(path: str, name: str) -> str:
    return f"{path}.{name}" if path and name else (path or name)


def relative(path: str, root: str) -> str | None:
    """`path` seen from `root`, or None when it is not below it."""
    if not root:
        return path
    if path == root:
        return ""
    return path[len(root) + 1:] if path.startswith(root + ".") else None


class GraphIndex:
    """Nodes by name, module invocations by path, calls by target: built once per graph."""

    def __init__(self, captured: Captured):
        self.captured = captured
        self.region = captured.path
        self.nodes = {n.name: n for n in captured.graph.nodes}
        self.qualified = qualified_names(captured.graph)   # node name -> 'layer2.0.add' (relative to the graph)
        self.keys: dict[str, list[str]] = defaultdict(list)       # path -> invocation keys
        self.members: dict[str, list[str]] = defaultdict(list)    # key -> node names
        for n in captured.graph.nodes:
            for key, path in module_stack(n):
                if key not in self.members:
                    self.keys[path].append(key)
                self.members[key].append(n.name)

    def module_sites(self, path: str) -> list[Site]:
        return [self.invocation(key, path) for key in self.keys.get(path, [])]

    def _site(self, key, path, names, leaf) -> Site:
        inside = set(names)
        inputs: list[str] = []
        outputs: list[str] = []
        for name in names:
            node = self.nodes[name]
            # a guard's test may read an input's size (size 1 let through): bookkeeping, not what the module reads
            for arg in () if node.meta.get(GUARD) else node.all_input_nodes:
                if arg.name not in inside and arg.name not in inputs:
                    inputs.append(arg.name)
            if any(u.name not in inside for u in node.users):
                outputs.append(name)
        name = self.qualified[names[0]] if len(names) == 1 and names[0] in self.qualified else ""
        return Site(key, path, leaf, tuple(names), tuple(inputs), tuple(outputs), self.region, name)

    def invocation(self, key: str, path: str | None) -> Site:
        names = self.members[key]
        return self._site(key, path, names, len(names) == 1 and self.nodes[names[0]].op == "call_module")

    def boundary(self) -> Site:
        """The whole graph as one site: its inputs and what it returns."""
        names = [n.name for n in self.captured.graph.nodes if n.op not in ("placeholder", "output")]
        site = self._site("", "", names, False)
        placeholders = tuple(n.name for n in self.captured.graph.nodes if n.op == "placeholder")
        returned = [n for n in self.captured.graph.nodes if n.op == "output"][0].all_input_nodes
        return replace(site, inputs=placeholders, outputs=tuple(n.name for n in returned))

    def call_site(self, node: fx.Node) -> Site:
        inputs = tuple(dict.fromkeys(a.name for a in node.all_input_nodes))
        return Site(node.name, None, True, (node.name,), inputs, (node.name,), self.region, self.qualified[node.name])

    def calls(self) -> list[str]:
        return [n.name for n in self.nodes.values() if n.op.startswith("call")]

    def node_site(self, node: fx.Node) -> Site:
        """The site of one call node: its module invocation, or the call itself."""
        if node.op == "call_module":
            return next(s for s in self.module_sites(node.target) if node.name in s.nodes)
        return self.call_site(node)

    def called(self, name: str) -> str:
        """A node's qualified name as the model sees it (the graph's own path in front)."""
        return join(self.region, self.qualified.get(name, name))


class Ambiguous(Exception):
    """A name that names several nodes (a qualified name here, a flat name there)."""


def outermost(paths: list[str]) -> list[str]:
    """The paths with no other chosen path above them (linear: each path checks its own ancestors)."""
    chosen = set(paths)
    def covered(p: str) -> bool:
        parts = p.split(".")
        return any(".".join(parts[:i]) in chosen for i in range(1, len(parts)))
    return [p for p in paths if not covered(p)]


def select_modules(sel: Selector, modules: dict[str, nn.Module]) -> list[str]:
    """Module paths selected by a glob, regex or type selector, or by any of several."""
    if sel.kind == "any":
        return list(dict.fromkeys(p for member in sel.value for p in select_modules(member, modules)))
    if sel.kind == "type":
        return [p for p, m in modules.items() if isinstance(m, sel.value)]
    if sel.kind in ("glob", "regex"):
        return [p for p in modules if p and sel.matches_name(p)]
    return []


class Locator:
    """Selectors resolved over every graph of a capture and its opaque code."""

    def __init__(self, capture: Capture):
        self.capture = capture
        self.modules = dict(capture.model.named_modules())
        # deepest first: a module inside a nested graph belongs to that graph
        self.indexes = [GraphIndex(r) for r in sorted(capture.regions, key=lambda r: -r.path.count(".") - bool(r.path))]

    def module_sites(self, path: str, boundary: bool) -> list[Site]:
        for index in self.indexes:
            rel = relative(path, index.region)
            if rel and index.keys.get(rel):
                return index.module_sites(rel)
        for index in self.indexes:
            if index.region == path and path:
                return [index.boundary()] if boundary else [Site(path, path, True, (), (), (), None)]
        if path in self.capture.calls:
            return [Site(path, path, True, (), (), (), None)]
        return []

    def select(self, sel: Selector, boundary: bool) -> tuple[list[Site], list[str]]:
        """Sites and module paths a selector picks; `boundary`: a whole graph is one site."""
        if sel.kind in ("function", "method"):
            op = "call_function" if sel.kind == "function" else "call_method"
            hit = (lambda n: n.target is sel.value) if sel.kind == "function" else (lambda n: n.target == sel.value)
            return [ix.call_site(n) for ix in self.indexes for n in ix.nodes.values() if n.op == op and hit(n)], []
        sites, paths = [], []
        for path in outermost(select_modules(sel, self.modules)):
            found = self.module_sites(path, boundary)
            if found:
                sites += found
                paths.append(path)
        if sel.kind in ("glob", "regex"):
            if exact(sel):  # a path's module, not also a call torch.fx happened to name the same (swin_t's `permute`)
                return (sites, paths) if sites else (self.named(sel.value), [])
            covered = {(s.region, name) for s in sites for name in s.nodes}
            for ix in self.indexes:
                for n in ix.nodes.values():
                    if (n.op.startswith("call") and (ix.region, n.name) not in covered
                            and (sel.matches_name(n.name) or sel.matches_name(ix.called(n.name)))):
                        site = ix.node_site(n)
                        sites.append(site)
                        covered.update((ix.region, name) for name in site.nodes)
        return sites, paths

    def named(self, name: str) -> list[Site]:
        """The one call a name names: a qualified name (`layer2.0.add`) or a torch.fx node name (`add_2`).

        Raises Ambiguous when the name is one node's qualified name and
        another's node name (a module's own `add` and its child's, which
        torch.fx named `add`).
        """
        flat = name not in self.modules  # a torch.fx node name never shadows a module path
        hits = [(ix, n) for ix in self.indexes for n in ix.nodes.values()
                if n.op.startswith("call") and (name == ix.called(n.name) or flat and name == n.name)]
        if len(hits) > 1:
            shown = ", ".join(f"{ix.called(n.name)} (node '{n.name}')" for ix, n in hits)
            # a node's qualified name, unless that is the ambiguous name itself: then its node name (unique)
            handles = [ix.called(n.name) if ix.called(n.name) != name else n.name for ix, n in hits]
            raise Ambiguous(f"{name!r} names {len(hits)} nodes: {shown}; fix: write {' or '.join(handles)}")
        return [ix.node_site(n) for ix, n in hits]

    def qualified(self) -> list[str]:
        """Every call's qualified name, in graph order."""
        return [ix.called(n.name) for ix in self.indexes for n in ix.nodes.values() if n.op.startswith("call")]

    def names(self) -> list[str]:
        """Every module path, qualified name and call-node name, for 'did you mean'."""
        return list(dict.fromkeys([p for p in self.modules if p] + self.qualified() + [c for ix in self.indexes for c in ix.calls()]))


def exact(sel: Selector) -> bool:
    return sel.kind == "glob" and not any(c in sel.value for c in "*?[")
