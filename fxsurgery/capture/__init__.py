"""Capture any model: graphs where torch.fx can trace, opaque Python where it cannot.

The whole model is traced first. Where that fails, the module whose own
code failed is kept as an opaque leaf (with every module of its type, which
fails the same way) and tracing is retried; where the failing code is the
traced module's own forward, that module stays opaque and each of its
children is captured on its own, recursively. Children are traced on the
arguments they were actually called with (recorded once, on fake tensors
where possible), so shape-dependent Python is specialised to that call.
"""

from __future__ import annotations

import inspect
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils import _pytree as pytree

from .._util import first_line, get_path
from ..errors import ModelError, TraceError
from ._call_shim import CallSpec, adapter_call, call_spec, install_adapter, mismatch, normalise, signature_of
from ._calledmethods import read_beyond_forward
from ._containers import INIT as CONTAINERS_INIT
from ._containers import INLINE_KINDS, Containers, InlineSequential, containers_of, keep_containers, renamed_containers, restore
from ._containers import SOURCE as CONTAINERS_SOURCE
from ._copying import assign, clone, refuse_hooked_weights, root_of
from ._dualgraph import ModeGraphModule, current, dual_source, other_graph, recompile, trace_both, trace_modes
from ._dynspec import apply_spec
from ._gradmode import cut_of
from ._guards import GUARD, beyond_size_one, down_to_one, specialised
from ._incremental import held_by
from ._livemodes import keep_mode_reads
from ._methods import hint_methods
from ._modes import track
from ._pickling import deep_copy, picklable
from ._pickling import reduce as pickled
from ._shapes import Meta, PropagationError, adapt, propagate, quiet_fake_tensors, refuse_mixed_dtypes
from ._trace import Captured, module_stack, trace
from ._tracer import FIRST_ARGUMENT_OF, Tracer, qualified_names

__all__ = [
    "FIRST_ARGUMENT_OF", "GUARD", "assign", "InlineSequential", "containers_of", "keep_containers", "restore",
    "CONTAINERS_INIT", "CONTAINERS_SOURCE", "INLINE_KINDS", "Containers", "renamed_containers",
    "ModeGraphModule", "current", "dual_source", "keep_mode_reads", "other_graph", "recompile", "trace_both", "trace_modes", "track",
    "KEPT", "CallSpec", "adapter_call", "Call", "Capture", "Captured", "Meta", "PropagationError", "adapt", "capture", "capture_kept", "clone",
    "cut_of", "deep_copy", "held_by", "hint_methods", "install_adapter", "mismatch", "picklable", "pickled",
    "module_stack", "propagate", "qualified_names", "quiet_fake_tensors", "record_calls", "root_of", "trace",
]


@dataclass
class Call:
    """How a module was called by the example forward (first call), and what it returned."""

    args: tuple
    kwargs: dict
    output: Any = None       # pytree of Meta
    count: int = 1
    varies: bool = False     # later calls passed other non-tensor values
    signature: Any = None

    def first_tensor(self) -> Meta | None:
        for leaf in pytree.tree_leaves((self.args, self.kwargs)):
            if isinstance(leaf, torch.Tensor):
                return Meta.of(leaf)
        return None


@dataclass
class Capture:
    """The model as graphs (traced regions) and opaque modules, with the example calls."""

    model: nn.Module
    example_inputs: tuple | None
    regions: list[Captured]
    opaque: dict[str, str] = field(default_factory=dict)   # module path -> why its forward stays Python
    calls: dict[str, Call] = field(default_factory=dict)
    kept: bool = False       # keep_class: the model's own code runs as written, rules act on its modules
    example_kwargs: dict = field(default_factory=dict)  # the example call's keywords the positions cannot carry

    @property
    def complete(self) -> bool:
        """True when one graph, with the model's own signature, holds the whole model."""
        return (len(self.regions) == 1 and self.regions[0].path == "" and not self.opaque
                and self.regions[0].call is None)

    def specialised(self, ones: bool = True) -> dict[str, dict[int, str]]:
        """{input: {dim: why}}: dims of the model's inputs that a decision of its code, a dynamic_shapes
        spec or dynamic_shapes=None pins to the example's size, and (`ones`) those where a size of 1 alone
        takes another branch; every other dim stays general."""
        root = self.regions[0] if self.regions and self.regions[0].path == "" else None
        if root is None or root.example_inputs is None:
            return {}
        names = root.input_names()
        if root.dynamic is None and root.decisions:
            return {n: {d: "dynamic_shapes=None" for d in range(v.dim())}
                    for n, v in zip(names, root.example_inputs) if isinstance(v, torch.Tensor)}
        out = {name: dict(dims) for name, dims in getattr(root, "static", {}).items()}
        for name, dims in specialised(root.decisions, ones).items():
            for dim, why in dims.items():
                out.setdefault(name, {}).setdefault(dim, why)
        return {name: dict(sorted(dims.items())) for name, dims in out.items()}

    def coverage(self) -> dict:
        """Traced regions, opaque modules with reasons, and the share of parameters in graphs."""
        traced = set()
        for region in self.regions:
            leaves = {n.target for n in region.graph.nodes if n.op in ("call_module", "get_attr")}
            for target in leaves:
                if target in region.opaque:
                    continue
                obj = region.gm.get_submodule(target) if isinstance(get_path(region.gm, target), nn.Module) else get_path(region.gm, target)
                tensors = obj.parameters() if isinstance(obj, nn.Module) else [obj]
                traced.update(id(p) for p in tensors if isinstance(p, nn.Parameter))
        params = {id(p): p.numel() for p in self.model.parameters()}
        total = sum(params.values())
        inside = sum(n for i, n in params.items() if i in traced)
        return {"traced": [r.path for r in self.regions], "opaque": dict(self.opaque),
                "traced_share": inside / total if total else 1.0}



def _skeleton(args, kwargs):
    """The non-tensor part of a call, for telling whether calls differ."""
    leaves, spec = pytree.tree_flatten((args, kwargs))
    return spec, tuple("T" if isinstance(v, torch.Tensor) else repr(v) for v in leaves)


def _hooked_run(model: nn.Module, inputs: tuple, kwargs: dict, convert) -> dict[str, Call]:
    calls: dict[str, Call] = {}
    handles = []

    def pre(path):
        def hook(module, args, kwargs):
            skeleton = _skeleton(args, kwargs)
            if path not in calls:
                calls[path] = Call(pytree.tree_map(convert, args), pytree.tree_map(convert, kwargs), signature=skeleton)
            else:
                calls[path].count += 1
                calls[path].varies |= skeleton != calls[path].signature
        return hook

    def post(path):
        def hook(module, args, kwargs, output):
            if calls[path].output is None:
                calls[path].output = pytree.tree_map(Meta.of, output)
        return hook

    for path, sub in model.named_modules():
        handles.append(sub.register_forward_pre_hook(pre(path), with_kwargs=True))
        handles.append(sub.register_forward_hook(post(path), with_kwargs=True))
    try:
        model(*inputs, **kwargs)
    finally:
        for h in handles:
            h.remove()
    return calls


def _materialise(value):
    """A real tensor standing in for a recorded fake one (same shape, dtype, device)."""
    if not isinstance(value, torch.Tensor):
        return value
    if value.is_floating_point():
        return torch.randn(value.shape, dtype=value.dtype, device=value.device)
    if value.dtype == torch.bool:
        return torch.ones(value.shape, dtype=value.dtype, device=value.device)
    return torch.zeros(value.shape, dtype=value.dtype, device=value.device)


def record_calls(model: nn.Module, inputs: tuple, kwargs: dict | None = None) -> dict[str, Call]:
    """Each module's first call during one forward pass, on a copy: fake tensors, else real ones."""
    # Tensors a forward makes from Python values stay real; the model's own are fake.
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    device = next((t.device for t in pytree.tree_leaves((inputs, kwargs)) if isinstance(t, torch.Tensor)), torch.device("cpu"))

    def faked(t: torch.Tensor) -> torch.Tensor:
        if not t.is_meta:
            return mode.from_tensor(t)
        with mode:  # a model built without weights runs where its inputs are, as it will once filled
            return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=device)

    try:
        fake = clone(model, faked)
        with mode, quiet_fake_tensors(), torch.no_grad():
            fake_inputs, fake_kwargs = pytree.tree_map(lambda x: mode.from_tensor(x) if isinstance(x, torch.Tensor) else x,
                                                       (inputs, dict(kwargs or {})))
            calls = _hooked_run(fake, fake_inputs, fake_kwargs, lambda x: x)
        return {p: Call(pytree.tree_map(_materialise, c.args), pytree.tree_map(_materialise, c.kwargs), c.output,
                        c.count, c.varies) for p, c in calls.items()}
    except Exception as exc:  # data-dependent Python needs real values: run a real copy
        failure = exc
    try:
        if any(t.is_meta for t in model.parameters()):
            raise failure  # built without weights: fake tensors were the only way to run it
        real = clone(model, lambda t: t.detach().clone())
        with torch.no_grad():
            return _hooked_run(real, inputs, dict(kwargs or {}), lambda x: x.detach().clone() if isinstance(x, torch.Tensor) else x)
    except Exception as exc:
        raise _fails(exc) from None


def _fails(exc: Exception) -> ModelError:
    fix = "pass inputs the original model accepts"
    if "more than 1 value per channel when training" in str(exc):  # a BatchNorm after pooling, a batch of one
        fix = "example inputs with a batch of 2 or more (--input 2x...), or the model in eval mode (--eval)"
    return ModelError(f"the original model fails on the example inputs: {type(exc).__name__}: {first_line(exc)}; fix: {fix}")


def _refuse_failing(model: nn.Module, inputs: tuple | None, kwargs: dict) -> None:
    """Raise what the original model raises on the example, run on a copy (a token id beyond GPT-2's positions
    passes fake tensors, which read no values, and fails the first real run)."""
    try:
        real = clone(model, lambda t: t.detach().clone())
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            real(*(inputs or ()), **kwargs)
    except Exception as exc:
        raise _fails(exc) from None


KEPT = "kept as its own class (keep_class=True): its code runs as written, rules act on the modules it calls"


def _example_call(model: nn.Module, example_inputs, example_kwargs) -> tuple[tuple | None, dict]:
    """(positional inputs or None, keyword inputs): the example call as given."""
    inputs = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (
        (example_inputs,) if example_inputs is not None else None)
    if example_kwargs is not None and not isinstance(example_kwargs, dict):
        raise ModelError(f"example_kwargs must be a dict of keyword inputs, got {type(example_kwargs).__name__}; "
                         "fix: pass {'attention_mask': mask}")
    kwargs = dict(example_kwargs or {})
    return (() if inputs is None and kwargs else inputs), kwargs


def capture_kept(model: nn.Module, example_inputs: tuple | None = None, example_kwargs: dict | None = None) -> Capture:
    """The model as it is: no graph; every module it calls is a site, with the call it got.

    Without example inputs every module counts as called, with no shapes known.
    """
    refuse_hooked_weights(model)
    inputs, kwargs = _example_call(model, example_inputs, example_kwargs)
    calls = (record_calls(model, inputs, kwargs) if inputs is not None
             else {path: Call((), {}) for path, _ in model.named_modules() if path})
    return Capture(model, inputs, [], {"": KEPT}, calls, kept=True, example_kwargs=kwargs)


def capture(model: nn.Module, example_inputs: tuple | None = None, example_kwargs: dict | None = None, *,
            leaf_types=(), leaf_paths=(), dynamic_shapes="auto") -> Capture:
    """Graphs for everything torch.fx can trace; opaque modules (with reasons) for the rest.

    `example_kwargs` are keyword inputs of the example call (`attention_mask=`, `labels=`).
    Where Python needs a size, `dynamic_shapes="auto"` guards that decision only (every other
    size stays general), None guards every input's whole example shape, and a torch.export-style
    spec ({input: {dim: name}}) declares which dims must stay dynamic (the rest are static).
    """
    refuse_hooked_weights(model)
    inputs, kwargs = _example_call(model, example_inputs, example_kwargs)
    options = dict(leaf_types=leaf_types, leaf_paths=leaf_paths, dynamic=None if dynamic_shapes is None else "auto")
    result = _capture(model, inputs, kwargs, **options)
    if dynamic_shapes == "auto":  # a size-1 dim the code pins: captured again at 2 where that keeps it general
        try:  # the first run on real values
            result = beyond_size_one(result, inputs, kwargs, lambda i, k: _capture(model, i, k, **options))
            result = down_to_one(result, inputs, kwargs)
        except Exception:
            _refuse_failing(model, inputs, kwargs)
            raise
    refuse_mixed_dtypes(result.regions)
    return _specced(result, dynamic_shapes)


def _capture(model: nn.Module, inputs: tuple | None, kwargs: dict, *, leaf_types, leaf_paths, dynamic) -> Capture:
    try:  # where a graph's own signature cannot read as the forward's, the call form keeps it (_call_shim.py)
        if not _call_form(model, inputs or (), kwargs):
            whole = trace(model, inputs, kwargs, leaf_types=leaf_types, leaf_paths=leaf_paths, values=False, dynamic=dynamic)
            return Capture(model, whole.example_inputs, [whole])
    except TraceError:
        pass
    calls = record_calls(model, inputs, kwargs) if inputs is not None else {}
    result = Capture(model, inputs, [], {}, calls)
    walker = _Walker(result, Tracer(leaf_types, leaf_paths), dynamic)
    walker.walk(model, "", Call(inputs, kwargs) if inputs is not None else None)
    if result.regions and result.regions[0].path == "" and result.regions[0].call is None:
        result.example_inputs = result.regions[0].example_inputs  # one value per forward parameter
    elif kwargs:  # as positions wherever the forward allows, so that `module(*example_inputs)` is the example call
        result.example_inputs, result.example_kwargs = normalise(signature_of(model), inputs, kwargs)
    return result


def _call_form(module: nn.Module, args: tuple, kwargs: dict) -> bool:
    """True where a graph's own signature could not be Python: a tensor given after a parameter left at its
    default (the graph takes it without a default, which Python refuses after one with a default); the
    call form keeps the forward's own signature instead (_call_shim.py)."""
    signature = signature_of(module)
    try:
        given = signature.bind_partial(*args, **kwargs).arguments if signature is not None else {}
    except TypeError:
        return False
    defaulted = False
    for p in signature.parameters.values() if given else ():
        if p.name not in given and p.default is not p.empty:
            defaulted = True
        elif defaulted and isinstance(given.get(p.name), torch.Tensor):
            return True
    return False


def _specced(result: Capture, spec) -> Capture:
    """Check a dynamic_shapes spec against the whole model's graph and make its undeclared dims static."""
    if spec is None or isinstance(spec, str):
        if spec not in (None, "auto"):
            raise ModelError(f"dynamic_shapes={spec!r} is not known; fix: pass 'auto', None or {{input: {{dim: name}}}}")
        return result
    root = result.regions[0] if result.regions and result.regions[0].path == "" else None
    if root is None or result.example_inputs is None:
        raise ModelError("dynamic_shapes names input dims, but no graph takes the model's own inputs (it is opaque or "
                         "captured without example inputs); fix: pass example_inputs, or dynamic_shapes='auto'")
    try:
        params = list(inspect.signature(result.model.forward).parameters)
    except (TypeError, ValueError):
        params = []
    root.static = apply_spec(root.gm, root.decisions, spec, tuple(root.example_inputs), tuple(result.example_inputs),
                             params, root.path)
    return result


class _Walker:
    def __init__(self, capture: Capture, policy: Tracer, dynamic: str | None = "auto"):
        self.capture, self.policy, self.dynamic = capture, policy, dynamic

    def join(self, path: str, name: str) -> str:
        return f"{path}.{name}" if path else name

    def children(self, module: nn.Module, path: str, python: bool = True, read: tuple[str, ...] = ()) -> None:
        """Walk the children of `module`, whose code stays Python (`python`; `read`: other methods of it called)
        or never runs (a container)."""
        beyond = read_beyond_forward(module, read) if python else {}
        for name, child in module.named_children():
            child_path = self.join(path, name)
            # torch.fx counts ModuleList/ModuleDict as leaves; they hold modules but never run
            if isinstance(child, (nn.ModuleList, nn.ModuleDict)) or not self.policy.is_leaf_module(child, child_path):
                if name in beyond:  # a graph of its forward would lack what that code reads (RetinaNet: head.compute_loss)
                    self.capture.opaque[child_path] = (f"the Python code around it reads its {beyond[name][0]!r}, which a "
                                                       "graph of its forward does not hold")
                    self.children(child, child_path, read=beyond[name])
                    continue
                self.walk(child, child_path, self.capture.calls.get(child_path))

    def walk(self, module: nn.Module, path: str, call: Call | None) -> None:
        if path and call is None:
            self.children(module, path, python=False)  # a container that is never called itself
            return
        region = self.region(module, path, call)
        if isinstance(region, str):
            self.capture.opaque[path] = region
            self.children(module, path)
            return
        self.capture.regions.append(region)
        for rel, why in region.opaque.items():
            self.capture.opaque[self.join(path, rel)] = why
            self.children(module.get_submodule(rel), self.join(path, rel))

    def region(self, module: nn.Module, path: str, call: Call | None) -> Captured | str:
        """A graph of `module` with as few opaque leaves as needed, or why there is none."""
        if call is not None and call.varies:
            return "called with different non-tensor arguments at different places"
        opaque: dict[str, str] = {}
        policy = self.policy
        # the model itself is first traced through its signature (its keywords bound to it), unless
        # that signature could not be Python (_call_form)
        as_called = bool(path) or bool(call is not None and _call_form(module, call.args, call.kwargs))
        while True:
            try:
                spec = call_spec(module, call.args, call.kwargs) if call is not None and as_called else None
                example = call.args if call is not None and not as_called else None
                keywords = call.kwargs if call is not None and not as_called else None
                captured = trace(module, example, keywords, call=spec, leaf_types=policy.leaf_types,
                                 leaf_paths=policy.leaf_paths, opaque=opaque, path=path, dynamic=self.dynamic)
                captured.opaque = opaque
                return captured
            except TraceError as err:
                failed_in = err.failed_in
                if not failed_in and not as_called and call is not None:
                    as_called = True  # decorated or **kwargs forwards trace as they are called
                    continue
                if not failed_in or failed_in in opaque:
                    return err.reason or err.message
                kind = type(module.get_submodule(failed_in))
                for rel, sub in module.named_modules():
                    if rel and type(sub) is kind and not any(rel.startswith(o + ".") for o in opaque):
                        opaque[rel] = err.reason  # the same code fails the same way: spare the retries
            except ModelError as err:
                return f"its recorded call cannot be replayed: {err.message}"
