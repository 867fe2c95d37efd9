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
from ._copying import clone

# Fake tensors log every failing op with a traceback; the failure is reported
# once, as a one-line error naming the rule, so the log is silenced meanwhile.
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
    def __init__(self, module, graph, metas):
        super().__init__(module, graph=graph)
        self.metas = metas

    def map_nodes_to_values(self, args, n):
        # torch.fx hands functions immutable lists; wrapped functions may mutate theirs
        # (torchvision's swin3d does), as they can when the generated code calls them
        return _mutable(super().map_nodes_to_values(args, n))

    def run_node(self, n):
        try:
            value = super().run_node(n)
        except PropagationError:
            raise
        except Exception as exc:  # any failure of user code is reported against its node
            raise PropagationError(n, exc, self.metas) from exc
        self.metas[n.name] = Meta.of(value)
        return value


def _on_meta(root: nn.Module, graph: fx.Graph, inputs: tuple) -> dict[str, Meta] | None:
    """Shapes on the meta device: the cheapest run there is, when the code allows it."""
    metas: dict[str, Meta] = {}
    try:
        meta_root = clone(root, lambda t: t.detach().to("meta"))
        with _quiet(_FAKE_LOGGER), torch.no_grad():
            _Recorder(meta_root, graph, metas).run(*(x.to("meta") if isinstance(x, torch.Tensor) else x for x in inputs))
        return metas
    except Exception:  # data-dependent code, or tensors made on another device: fake tensors know better
        return None


def propagate(root: nn.Module, graph: fx.Graph, inputs: tuple) -> dict[str, Meta]:
    """Run `graph` over `root` on shape-only copies of `inputs` (meta, else fake, else a real copy);
    a Meta per node name."""
    metas = _on_meta(root, graph, inputs)
    if metas is not None:
        return metas
    metas = {}
    mode = FakeTensorMode(allow_non_fake_inputs=False)
    try:
        fake_root = clone(root, mode.from_tensor)
        with mode, _quiet(_FAKE_LOGGER):
            fake_inputs = tuple(mode.from_tensor(x) if isinstance(x, torch.Tensor) else x for x in inputs)
            _Recorder(fake_root, graph, metas).run(*fake_inputs)
        return metas
    except PropagationError as err:
        if not isinstance(err.exc, _NEEDS_REAL):
            raise
    # Data-dependent code needs real values: run on a real copy, never the original.
    metas.clear()
    real_root = clone(root, lambda t: t.detach().clone())
    with torch.no_grad():
        _Recorder(real_root, graph, metas).run(*inputs)
    return metas


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


