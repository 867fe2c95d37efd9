"""What rules build: `fxs.new` specs whose shape arguments come from the graph,
checked when the rule is written, and the weight policies by name."""

from __future__ import annotations

import contextlib
import contextvars
import inspect
import math
import re
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .._util import BuildBudget, first_line, machine_memory
from ..errors import RuleError
from ._selector import Origin, caller_origin, qualname

# A plan that writes nothing (--dry-run) builds declared modules on meta: 117 bytes of YAML
# declaring a huge layer must not cost its memory just to be shown.
_PLANNING = contextvars.ContextVar("fxsurgery_planning", default=False)


@contextlib.contextmanager
def planning():
    """Modules that rules declare are built on the meta device meanwhile (their shapes, no memory)."""
    token = _PLANNING.set(True)
    try:
        yield
    finally:
        _PLANNING.reset(token)


@dataclass(frozen=True)
class New:
    """A module to build per match, shape arguments inferred from the graph.

    `fxs.new(nn.Linear, out_features=10)` on an input of shape [N, 512]
    builds `nn.Linear(in_features=512, out_features=10)`.
    """

    cls: type
    kwargs: dict = field(default_factory=dict)

    # constructor argument -> how it is read from the incoming shape
    INFERRED = {
        "in_features": lambda shape: shape[-1],
        "in_channels": lambda shape: shape[1],
        "num_features": lambda shape: shape[1],
        "num_channels": lambda shape: shape[1],
        "normalized_shape": lambda shape: shape[-1],
        "embed_dim": lambda shape: shape[-1],
        "d_model": lambda shape: shape[-1],
    }

    def missing(self) -> list[str]:
        """Constructor arguments that will be inferred from the incoming shape."""
        params = inspect.signature(self.cls).parameters
        return [p for p in self.INFERRED if p in params and p not in self.kwargs]

    def build(self, shape: tuple[int, ...] | None, like: tuple = (None, None)) -> nn.Module:
        """`like`: the (dtype, device) of what the module replaces or sits beside (see `like`);
        a bf16 model gets a bf16 module unless the spec names its own dtype."""
        kwargs = dict(self.kwargs)
        needed = self.missing()
        if needed and shape is None:
            raise RuleError(f"cannot infer {', '.join(needed)} of {self.cls.__name__} without example inputs; fix: pass example_inputs (--input "
                            f"1x3x224x224 for an image model, 1x16:int64 for token ids) or give {needed[0]} explicitly")
        for name in needed:
            kwargs[name] = int(self.INFERRED[name](shape))
        if not _PLANNING.get():
            _fits(self.cls, kwargs)
        with torch.device("meta") if _PLANNING.get() else contextlib.nullcontext():
            module = self.cls(**kwargs)
        dtype, device = like
        dtype = None if "dtype" in kwargs else dtype
        device = None if "device" in kwargs or _PLANNING.get() else device
        return module.to(device=device, dtype=dtype) if dtype is not None or device is not None else module

    def __str__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.kwargs.items())
        return f"{self.cls.__name__}({args})"


def _on_meta(kwargs: dict) -> dict:
    """A probe's arguments: an explicit device= would build real tensors past the meta device around it."""
    return {**kwargs, "device": "meta"} if "device" in kwargs else kwargs


def _fits(cls: type, kwargs: dict) -> None:
    """Its tensors measured on the meta device first: a rule file asking for out_features: 10**10 would
    otherwise allocate and initialise them until the machine runs out of memory."""
    with torch.device("meta"):
        probe = cls(**_on_meta(kwargs))
    size = sum(t.numel() * t.element_size() for t in [*probe.parameters(), *probe.buffers()])
    memory = machine_memory()
    if memory and size > memory // 2:
        raise RuleError(f"{qualname(cls)}({', '.join(f'{k}={v!r}' for k, v in kwargs.items())}) would hold {size / 2**30:.1f} GiB of "
                        f"tensors, more than half this machine's memory ({memory / 2**30:.1f} GiB); fix: give sizes that fit")


def like(module: nn.Module | None, dtype_in: torch.dtype | None = None) -> tuple:
    """(dtype, device) for a module built in place of `module`: those of its first floating
    tensor, else the incoming tensor's floating dtype (None: the defaults)."""
    for t in (*module.parameters(), *module.buffers()) if module is not None else ():
        if t.is_floating_point():
            return t.dtype, (None if t.is_meta else t.device)
    return (dtype_in if dtype_in is not None and dtype_in.is_floating_point else None), None


def new(cls: type, **kwargs) -> New:
    """A module spec whose shape arguments are inferred from the traced shapes."""
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise RuleError(f"{caller_origin()}: fxs.new needs a torch.nn.Module class, got {cls!r}; fix: pass a class such as torch.nn.Linear")
    check_kwargs(cls, kwargs, caller_origin())
    return check_new(New(cls, dict(kwargs)), caller_origin())


_PROBE_SIZE = 8  # stands in for an inferred size when a spec is checked
_LAYERS = re.compile(r"num_\w*layers")  # a layer count (RNN num_layers, nn.Transformer num_encoder_layers): the deepest models have ~100
MAX_LAYERS = 1024
_BUILD_LIMIT = 100_000  # modules, parameters and buffers a declared module may make (a 24-layer encoder: about 1,000)


def check_new(spec: New, origin: Origin) -> New:
    """Build the module once with small stand-ins for the inferred sizes: a value the
    class rejects (Dropout(p=2.0)) or an argument it needs (Conv2d's kernel_size) is
    reported when the rule is written, not when it is applied."""
    probe = {name: (_PROBE_SIZE,) if name == "normalized_shape" else _PROBE_SIZE for name in spec.missing()}
    if str(spec.kwargs.get("device", "")).startswith("meta"):
        raise RuleError(f"{origin}: {qualname(spec.cls)}(device='meta') would have no values to run or save; fix: leave device out "
                        "(the module is built where the model's tensors are)")
    deep = next((k for k, v in spec.kwargs.items() if _LAYERS.fullmatch(k) and type(v) is int and v > MAX_LAYERS), None)
    if deep is not None:  # RNN's __init__ is quadratic in its layers: 10**8 would run for days before any budget stops it
        raise RuleError(f"{origin}: {qualname(spec.cls)}({deep}={spec.kwargs[deep]}) declares more than {MAX_LAYERS} layers; "
                        "fix: give sizes that fit")
    try:
        # checked, not used: 117 bytes of YAML must not cost a gigabyte, nor hours of RNN(num_layers=10**8) on meta
        with torch.device("meta"), BuildBudget(_BUILD_LIMIT):
            built = spec.cls(**_on_meta({**spec.kwargs, **probe}))
    except TypeError as exc:
        missing = re.findall(r"missing \d+ required positional arguments?: (.*)", str(exc))
        if not missing:
            raise RuleError(f"{origin}: {qualname(spec.cls)}({', '.join(f'{k}={v!r}' for k, v in spec.kwargs.items())}) is rejected: "
                            f"{first_line(exc)}; fix: change the arguments") from None
        names = re.findall(r"'(\w+)'", missing[0])
        yaml = str(getattr(origin, "file", "") or "").endswith((".yaml", ".yml"))
        shown = ", ".join(f"{n}: ..." if yaml else f"{n}=..." for n in names)
        example = f"{{module: {qualname(spec.cls)}, {shown}}}" if yaml else f"fxs.new({spec.cls.__name__}, {shown})"
        raise RuleError(f"{origin}: {qualname(spec.cls)} needs {missing[0]}; fix: give {'them' if len(names) > 1 else 'it'} "
                        f"in the rule, e.g. {example}") from None
    except Exception as exc:
        first = first_line(exc, type(exc).__name__)
        raise RuleError(f"{origin}: {qualname(spec.cls)}({', '.join(f'{k}={v!r}' for k, v in spec.kwargs.items())}) is rejected: {first}; fix: change "
                        f"the arguments") from None
    _not_empty(built, spec, origin)
    return spec


def _not_empty(built: nn.Module, spec: New, origin: Origin) -> None:
    """A size of 0 (`--set num_classes=0`) builds a layer that torch accepts and that computes nothing: an empty
    weight is a typo, not a model."""
    for name, param in built.named_parameters():
        if not isinstance(param, nn.parameter.UninitializedParameter) and param.numel() == 0:
            given = ", ".join(f"{k}={v!r}" for k, v in spec.kwargs.items())
            raise RuleError(f"{origin}: {qualname(spec.cls)}({given}) builds an empty {name} (a size of 0), which computes "
                            "nothing; fix: give sizes of 1 or more")


def check_kwargs(cls: type, kwargs: dict, origin: Origin) -> None:
    """Reject constructor arguments the class does not take, at load time."""
    try:
        params = inspect.signature(cls).parameters
    except (TypeError, ValueError):
        return
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return
    unknown = [k for k in kwargs if k not in params]
    if unknown:
        takes = ", ".join(p for p in params if p not in ("self", "device", "dtype"))
        raise RuleError(f"{origin}: {qualname(cls)} does not take {', '.join(map(repr, unknown))}; fix: use its arguments ({takes})")


def _not_a_number(value: Any) -> str | None:
    """The name of a NaN among a module's settings or a spec's arguments: nn.Dropout(nan) passes its own check
    and fails at the first call, nn.LeakyReLU(nan) makes every output NaN."""
    if isinstance(value, New):
        found = value.kwargs.items()
    else:
        found = ((f"{path + '.' if path else ''}{k}", v) for path, m in value.named_modules() for k, v in vars(m).items()
                 if not k.startswith("_"))
    return next((k for k, v in found if _nan(v)), None)


def _nan(value: Any) -> bool:
    """A NaN setting: a float, one inside a tuple or list (nn.Upsample's scale_factor), or a one-value tensor."""
    if isinstance(value, float):
        return math.isnan(value)
    if isinstance(value, (tuple, list)):
        return any(_nan(v) for v in value[:64])
    return isinstance(value, torch.Tensor) and value.numel() == 1 and value.is_floating_point() and bool(value.isnan())


def _unusual_tensor(module: nn.Module) -> str | None:
    """Why a given module's tensors cannot join a model: a sparse or quantized layout, which the graph's shape
    pass and the saved safetensors cannot hold."""
    for name, t in [*module.named_parameters(), *module.named_buffers()]:
        if t.layout != torch.strided:
            return f"its tensor {name} is {str(t.layout).removeprefix('torch.')}; fix: give it dense tensors (.to_dense())"
        if t.is_quantized:
            return f"its tensor {name} is quantized ({t.dtype}); fix: give it float tensors (.dequantize())"
    return None


def module_like(value: Any, origin: Origin, what: str) -> Any:
    if isinstance(value, (New, nn.Module)):
        nan = _not_a_number(value)
        kind = qualname(value.cls) if isinstance(value, New) else type(value).__name__
        if nan is not None:
            raise RuleError(f"{origin}: {what} {kind} has {nan}=nan, which is not a number; fix: give {nan} a value")
        unusual = _unusual_tensor(value) if isinstance(value, nn.Module) else None
        if unusual is not None:
            raise RuleError(f"{origin}: {what} {kind} cannot join the model: {unusual}")
        return value
    if isinstance(value, type) and issubclass(value, nn.Module):
        return New(value, {})
    if what == "replacement" and callable(value) and not isinstance(value, type):
        return value
    raise RuleError(f"{origin}: {what} {value!r} is not a module, a module class, fxs.new(...) "
                    f"spec{' or a function' if what == 'replacement' else ''}; fix: pass e.g. nn.Dropout(0.2) or fxs.new(nn.Linear, out_features=10)")


WEIGHT_POLICIES = ("new", "keep", "slice", "pad", "adapt_input_channels")


def check_policy(weights: Any, origin: Origin) -> Any:
    """A weights policy: one of WEIGHT_POLICIES, or {"select": [indices]} (keep those rows)."""
    if isinstance(weights, str) and weights in WEIGHT_POLICIES:
        return weights
    if isinstance(weights, dict) and list(weights) == ["select"]:
        rows = weights["select"]
        if isinstance(rows, (list, tuple)) and rows and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in rows):
            return {"select": tuple(rows)}
        listed = isinstance(rows, (list, tuple))
        bad = next((i for i in rows if not isinstance(i, int) or isinstance(i, bool) or i < 0), None) if listed else rows
        if bad is not None or not rows:
            held = "no row" if not rows else f"{bad!r}, not a row index" if listed else f"{rows!r}, not a list of row indices"
            raise RuleError(f"{origin}: weights select holds {held}; fix: list the rows to keep as indices from 0, e.g. {{select: [0, 2, 5]}}")
    raise RuleError(f"{origin}: unknown weights policy {weights!r}; fix: use one of {', '.join(WEIGHT_POLICIES)}, "
                    "or {select: [row indices]}")


def refuse_valueless(rules: list) -> None:
    """A module given to Insert or Replace with tensors on the meta device (built in fxs.empty_weights()) has no
    values to run or save, whether the model has them or fills them from a checkpoint (which never holds a
    module the surgery adds)."""
    for rule in rules:
        module = getattr(rule, "module", getattr(rule, "replacement", None))
        if isinstance(module, nn.Module) and any(t.is_meta for t in [*module.parameters(), *module.buffers()]):
            raise RuleError(f"{rule.origin}: {rule.action} {type(module).__name__}: its tensors are on the meta device, with no values; "
                            f"fix: build it outside fxs.empty_weights(), or pass fxs.new({qualname(type(module))}, ...)")
