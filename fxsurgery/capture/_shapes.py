"""Shape propagation on fake tensors: every node gets a shape, no weight is touched.

Running the real module to learn shapes would update BatchNorm statistics of
the user's model and cost a full forward pass; fake tensors carry only shapes
and dtypes, so the original stays untouched and large models cost nothing.
Code that needs real values (data-dependent control flow) is run on a real
copy instead.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn
from torch._subclasses.fake_tensor import DataDependentOutputException, DynamicOutputShapeException, FakeTensorMode, UnsupportedOperatorException
from torch.fx.immutable_collections import immutable_dict, immutable_list

from .._util import shape_text
from ..errors import ModelError
from ._copying import clone, root_of
from ._shortcuts import function_output, method_output, module_output

# Fake tensors log every failing op with a traceback; the failure is reported
# once, as a one-line error naming the rule, so the log is silenced meanwhile.
_FAKE_LOGGER = logging.getLogger("torch._subclasses.fake_tensor")


@contextlib.contextmanager
def _quiet(logger: logging.Logger):
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


_NEEDS_REAL = (DataDependentOutputException, DynamicOutputShapeException, UnsupportedOperatorException)


@dataclass(frozen=True)
class Meta:
    """What flows along an edge: a tensor's shape and dtype, or another kind of value."""

    shape: tuple | None
    dtype: torch.dtype | None
    kind: str = "tensor"

    @property
    def is_tensor(self) -> bool:
        return self.kind == "tensor"

    @classmethod
    def of(cls, value: Any) -> "Meta":
        if isinstance(value, torch.Tensor):
            return cls(tuple(int(d) for d in value.shape), value.dtype)
        return cls(None, None, type(value).__name__)

    def __str__(self) -> str:
        return shape_text(self.shape) if self.is_tensor else self.kind


class PropagationError(Exception):
    """A node failed while shapes were propagated (wrapped by the caller)."""

    def __init__(self, node: fx.Node, exc: BaseException, metas: dict | None = None):
        super().__init__(f"{node.name}: {exc}")
        self.node, self.exc, self.metas = node, exc, metas or {}


def _mutable(value):
    if isinstance(value, immutable_list):
        return [_mutable(v) for v in value]
    if isinstance(value, immutable_dict):
        return {k: _mutable(v) for k, v in value.items()}
    if type(value) is tuple:
        return tuple(_mutable(v) for v in value)
    return value


class _Recorder(fx.Interpreter):
    def __init__(self, module, graph, metas, keep: bool = False):
        # `keep`: every node's value stays in `env` (a later pass re-runs only what changed)
        super().__init__(module, garbage_collect_values=not keep, graph=graph)
        self.metas = metas

    def map_nodes_to_values(self, args, n):
        # torch.fx hands functions immutable lists; wrapped functions may mutate theirs
        # (torchvision's swin3d does), as they can when the generated code calls them
        return _mutable(super().map_nodes_to_values(args, n))

    def read_only(self, target: str):
        """The module at `target` for a shortcut, which reads its attributes and never runs it."""
        return self.fetch_attr(target)

    def call_module(self, target, args, kwargs):
        made = module_output(self.read_only(target), args, kwargs)
        return made if made is not None else super().call_module(target, args, kwargs)

    def call_function(self, target, args, kwargs):
        made = function_output(target, args, kwargs)
        return made if made is not None else super().call_function(target, args, kwargs)

    def call_method(self, target, args, kwargs):
        made = method_output(target, args, kwargs)
        return made if made is not None else super().call_method(target, args, kwargs)

    def run_node(self, n):
        try:
            # fx.Interpreter.run_node without its context manager that records the current node for
            # tracing machinery (none runs here): a tenth of a long chain's shape pass
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            value = getattr(self, n.op)(n.target, args, kwargs)
        except PropagationError:
            raise
        except Exception as exc:  # any failure of user code is reported against its node
            raise PropagationError(n, exc, self.metas) from exc
        self.metas[n.name] = Meta.of(value)
        return value


def _structure(root: nn.Module) -> nn.Module:
    """What an interpreter of `root`'s graph reads (its modules and tensors), without the GraphModule:
    copying one deep-copies and recompiles its code, a large part of a long graph's shape pass."""
    if not isinstance(root, fx.GraphModule):
        return root
    shell = nn.Module()
    shell._modules.update(root._modules)
    shell._parameters.update(root._parameters)
    shell._buffers.update(root._buffers)
    for name, value in vars(root).items():  # constants torch.fx attached as plain attributes
        if isinstance(value, torch.Tensor) and name not in vars(shell):
            vars(shell)[name] = value
    return shell


class _OnMeta(_Recorder):
    """A run on meta tensors over the original modules: each module or tensor a node uses is copied
    to meta when first used (`converted`), and not at all where a shortcut makes the node's output
    from its attributes. Copying the whole tree to meta first was a third of a shape pass."""

    def __init__(self, root: nn.Module, graph: fx.Graph, keep: bool):
        super().__init__(root, graph, {}, keep)
        self.converted: dict[int, tuple] = {}  # id(original) -> (original, its meta copy)

    def read_only(self, target: str):
        return super().fetch_attr(target)

    def fetch_attr(self, target: str):
        return converted_copy(super().fetch_attr(target), self.converted)


def converted_copy(obj, converted: dict, make=None):
    """`obj` (a module or tensor) with each tensor made by `make` (default: on meta), made once per
    object and kept in `converted`."""
    hit = converted.get(id(obj))
    if hit is not None and hit[0] is obj:
        return hit[1]
    make = make or to_meta
    if isinstance(obj, nn.Module):
        made = clone(obj, make)
    elif isinstance(obj, torch.Tensor):
        made = make(obj)
        if isinstance(obj, nn.Parameter):
            made = nn.Parameter(made, requires_grad=obj.requires_grad)
    else:
        made = obj
    converted[id(obj)] = (obj, made)
    return made


def _on_meta(root: nn.Module, graph: fx.Graph, inputs: tuple, keep: bool) -> _Recorder | None:
    """Shapes on the meta device: the cheapest run there is, when the code allows it."""
    try:
        recorder = _OnMeta(root, graph, keep)
        with _quiet(_FAKE_LOGGER), torch.no_grad():
            recorder.run(*(x.to("meta") if isinstance(x, torch.Tensor) else x for x in inputs))
        return recorder
    except Exception:  # data-dependent code, or tensors made on another device: fake tensors know better
        return None


def to_meta(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("meta")


@dataclass
class Pass:
    """One full shape pass: a Meta per node name; with `keep`, each node's value and how it was made."""

    metas: dict[str, Meta]
    kind: str                                # "meta", "fake" or "real"
    values: dict[str, Any]                   # node name -> its meta or fake value (`keep` only)
    mode: FakeTensorMode | None = None       # the fake tensors' mode (kind "fake")
    converted: dict | None = None            # id(original) -> (original, its meta copy) (kind "meta")


def faking(mode: FakeTensorMode, inputs: tuple):
    """Tensors to fake ones; a meta tensor (a layer a dry run declared, a model built without weights)
    becomes a fake one on the inputs' device, which a fake run mixes it with."""
    device = next((x.device for x in inputs if isinstance(x, torch.Tensor) and not x.is_meta), torch.device("cpu"))

    def make(t: torch.Tensor) -> torch.Tensor:
        if not t.is_meta:
            return mode.from_tensor(t)
        with mode:
            return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=device, requires_grad=t.requires_grad)
    return make


def full_pass(root: nn.Module, graph: fx.Graph, inputs: tuple, keep: bool = False) -> Pass:
    """Run `graph` over `root` on shape-only copies of `inputs` (meta, else fake, else a real copy)."""
    recorder = _on_meta(root, graph, inputs, keep)
    if recorder is not None:
        return Pass(recorder.metas, "meta", {n.name: v for n, v in recorder.env.items()} if keep else {},
                    converted=recorder.converted)
    metas = {}
    mode = FakeTensorMode(allow_non_fake_inputs=False)
    try:
        fake_root = clone(_structure(root), faking(mode, inputs))
        recorder = _Recorder(fake_root, graph, metas, keep)
        with mode, _quiet(_FAKE_LOGGER):
            fake_inputs = tuple(mode.from_tensor(x) if isinstance(x, torch.Tensor) else x for x in inputs)
            recorder.run(*fake_inputs)
        return Pass(metas, "fake", {n.name: v for n, v in recorder.env.items()} if keep else {}, mode)
    except PropagationError as err:
        if not isinstance(err.exc, _NEEDS_REAL):
            raise
    # Data-dependent code needs real values: run on a real copy, never the original.
    metas.clear()
    real_root = clone(root, lambda t: t.detach().clone())
    with torch.no_grad():
        _Recorder(real_root, graph, metas).run(*inputs)
    return Pass(metas, "real", {})


def propagate(root: nn.Module | dict, graph: fx.Graph, inputs: tuple, state=None) -> dict[str, Meta]:
    """A Meta per node name of `graph` run over `root` (a module, or a {target: module or tensor}
    table) on shape-only copies of `inputs`. With `state` (a ShapeState), the pass it kept is
    reused: only the nodes that changed since, and what their change reaches, run again."""
    if state is not None:
        return state.run(root, graph, inputs)
    return full_pass(root_of(root) if isinstance(root, dict) else root, graph, inputs).metas


def adapt(value: torch.Tensor, shape: tuple) -> torch.Tensor:
    """An example input cut or zero-padded to `shape`; values kept where dims overlap."""
    if not isinstance(value, torch.Tensor) or tuple(value.shape) == tuple(shape):
        return value
    if value.dim() != len(shape):
        return torch.zeros(shape, dtype=value.dtype, device=value.device)
    out = torch.zeros(shape, dtype=value.dtype, device=value.device)
    common = tuple(slice(0, min(a, b)) for a, b in zip(value.shape, shape))
    out[common] = value[common]
    return out


def quiet_fake_tensors():
    """Silence fake-tensor failure logs while a failure is expected and handled."""
    return _quiet(_FAKE_LOGGER)


# layers whose kernels refuse an input of another dtype than their weights (without autocast); a subclass with a
# forward of its own may cast first (a quantised Linear), so only these forwards count
_SAME_DTYPE = (nn.Linear, nn.Bilinear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
               nn.ConvTranspose3d, nn.PReLU, nn.MultiheadAttention, nn.RNN, nn.LSTM, nn.GRU)


def refuse_mixed_dtypes(regions) -> None:
    """An original layer whose example input has another dtype than its floating weights (token ids, `--input
    2x4:int64`, into a float32 Linear): fake tensors propagate it, the model itself refuses it when run."""
    for region in regions:
        for node in region.graph.nodes if region.shapes else ():
            module = region.gm.get_submodule(node.target) if node.op == "call_module" else None
            if not any(isinstance(module, c) and type(module).forward is c.forward for c in _SAME_DTYPE) or not node.all_input_nodes:
                continue
            own = {t.dtype for t in module.parameters() if t.is_floating_point()}
            first = region.shapes.get(node.all_input_nodes[0].name)
            if len(own) == 1 and first is not None and first.is_tensor and first.dtype is not None and first.dtype not in own:
                have, got = (str(d).replace("torch.", "") for d in (*own, first.dtype))
                path = ".".join(p for p in (region.path, node.target) if p)
                raise ModelError(f"the example inputs do not fit the model: '{path}' ({type(module).__name__}) holds {have} weights "
                                 f"and receives {got}, which the model itself refuses; fix: pass {have} inputs "
                                 f"(--input SIZES{'' if have == 'float32' else ':' + have})")
