"""Write a GraphModule as readable, standalone PyTorch source (model.py).

`__init__` rebuilds each leaf module from its constructor arguments (read
back from the module's attributes and checked by rebuilding it), `forward` is
torch.fx's code for the graph. Module paths that are not plain names are
renamed to safe identifiers, so no name reaches the source unescaped.
"""

from __future__ import annotations

import builtins
import inspect
import keyword
import re
import sys
from typing import Any

import torch
from torch import fx, nn
from torch.fx.graph import _custom_builtins

from .._util import get_path
from ..capture import CONTAINERS_INIT, CONTAINERS_SOURCE, adapter_call, renamed_containers
from ..errors import SaveError
from ..rewrite import STAY_EVAL_SOURCE
from ._callform import adapter_source
from ._composites import composite_arguments, instance, is_nested, settings
from ._names import check_structure, docstring_text, dotted, literal, method_name, render, without_wraps

_SAFE_SEGMENT = re.compile(r"[A-Za-z0-9_]+")


def public_name(obj: Any) -> str:
    """`torch.nn.Conv2d` rather than `torch.nn.modules.conv.Conv2d`, where it is the same object."""
    module, name = obj.__module__, obj.__qualname__
    parts = module.split(".")
    for i in range(1, len(parts) + 1):
        candidate = ".".join(parts[:i])
        if getattr(sys.modules.get(candidate), name, None) is obj:
            return f"{candidate}.{name}"
    return f"{module}.{name}"


def constructor(module: nn.Module, path: str) -> str:
    """Source that rebuilds `module` (without its tensor values), verified by rebuilding."""
    return _render_spec(constructor_spec(module, path), path)


def _render_spec(spec: dict, path: str) -> str:
    if "items" in spec:
        return f"torch.nn.Sequential({', '.join(_render_spec(s, f'{path}.{i}') for i, s in enumerate(spec['items']))})"
    args = ", ".join(f"{dotted(k, f'module {path!r} argument')}={_render_spec(v['module'], f'{path}.{k}') if is_nested(v) else render(v)}"
                     for k, v in spec["kwargs"].items())
    return f"{dotted(spec['class'], f'the class of module {path!r}')}({args})"


def constructor_spec(module: nn.Module, path: str) -> dict:
    """{"class": dotted name, "kwargs": literals} that rebuild `module` (or {"class", "items"} for a Sequential)."""
    cls = type(module)
    if isinstance(module, nn.Sequential) and cls.forward is nn.Sequential.forward and \
            list(module._modules) == [str(i) for i in range(len(module))]:
        # a Sequential by another name (torchvision.ops.MLP) runs as one: rebuild it from its parts
        return {"class": "torch.nn.Sequential", "items": [constructor_spec(child, f"{path}.{i}") for i, child in enumerate(module)]}
    try:
        params = list(inspect.signature(cls.__init__).parameters.values())[1:]
    except (TypeError, ValueError):
        params = []
    if isinstance(module, nn.RNNBase) and all(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params):
        # nn.LSTM, nn.GRU, nn.RNN pass (*args, **kwargs) on to RNNBase, with a mode of their own (and RNN's nonlinearity)
        params = [p for p in list(inspect.signature(nn.RNNBase.__init__).parameters.values())[1:] if p.name != "mode"]
        params += [inspect.Parameter("nonlinearity", inspect.Parameter.KEYWORD_ONLY, default="tanh")] if isinstance(module, nn.RNN) else []
    kwargs = {}
    kept = composite_arguments(module)  # nn.TransformerEncoder(Layer) keep theirs in their children
    for p in params:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) or p.name in ("device", "dtype") or p.name.startswith("_"):
            continue
        if p.name in kept:
            value = kept[p.name]
            if isinstance(value, nn.Module):  # a layer given as an argument: its own constructor
                kwargs[p.name] = {"module": constructor_spec(value, f"{path}.{p.name}")}
                continue
        elif hasattr(module, p.name):
            value = getattr(module, p.name)
            if isinstance(value, torch.Tensor) or (value is None and p.name in ("bias", "weight") and p.default is True):
                value = value is not None  # `bias=True` is stored as a tensor (or None)
        elif p.default is not p.empty:
            continue
        else:
            raise SaveError(f"cannot write model.py: module '{path}' ({public_name(cls)}) does not keep its constructor argument "
                            f"'{p.name}'; fix: {_unbuildable(cls)}")
        if not literal(value):
            raise SaveError(f"cannot write model.py: module '{path}' ({public_name(cls)}) argument '{p.name}' is a {type(value).__name__}, not a "
                            f"literal; fix: use a module whose arguments are plain values")
        if p.default is p.empty or value != p.default:
            kwargs[p.name] = value
    try:
        with torch.device("meta"):  # only its structure is compared: no memory, no random init (most of a save's time)
            rebuilt = instance({"class": public_name(cls), "kwargs": kwargs}) if kept else cls(**kwargs)
    except Exception as exc:
        raise SaveError(f"cannot write model.py: module '{path}' ({public_name(cls)}) cannot be rebuilt from its attributes: {exc}; "
                        f"fix: {_unbuildable(cls)}") from None
    if repr(rebuilt) != repr(module) or _layout(rebuilt) != _layout(module) or (kept and settings(rebuilt) != settings(module)):
        raise SaveError(f"cannot write model.py: module '{path}' ({public_name(cls)}) rebuilt from its attributes differs from the original; "
                        f"fix: {_unbuildable(cls)}")
    return {"class": public_name(cls), "kwargs": kwargs}


def check_constructors(module: nn.Module) -> None:
    """What model.py would refuse to rebuild, refused now (a dry run promises what the save will do): each
    module a graph of `module` calls, as `generate` writes its constructor."""
    for prefix, gm in module.named_modules():
        if isinstance(gm, fx.GraphModule):
            for node in gm.graph.find_nodes(op="call_module"):
                constructor_spec(gm.get_submodule(node.target), f"{prefix}.{node.target}" if prefix else node.target)


def _unbuildable(cls: type) -> str:
    """The way out where model.py cannot rebuild a module: a torch.nn module of that kind (nn.TransformerEncoder
    is one already: its layer is an argument, not an attribute) or a pickle, which keeps any module."""
    pickled = "in Python, torch.save(result.module) keeps it as it is (loading that needs fxsurgery)"
    if public_name(cls).startswith("torch.nn."):
        return f"{pickled}, or Replace it with layers model.py can rebuild (Linear, LayerNorm, MultiheadAttention)"
    return f"use a torch.nn module there, or {pickled}"


def module_dtype(module: nn.Module, path: str) -> torch.dtype | None:
    """The dtype of a module's floating tensors where it is not the default one."""
    dtypes = {t.dtype for t in module.state_dict().values() if t.is_floating_point()}
    if not dtypes or dtypes == {torch.get_default_dtype()}:
        return None
    if len(dtypes) > 1:
        raise SaveError(f"cannot write model.py: module '{path}' mixes dtypes {sorted(map(str, dtypes))}; fix: cast it to one dtype first")
    return dtypes.pop()


def _dtype_suffix(module: nn.Module, path: str) -> str:
    """`.to(dtype)` where a module's floating tensors are not in the default dtype."""
    dtype = module_dtype(module, path)
    return "" if dtype is None else f".to({dtype})"


def _layout(module: nn.Module) -> list:
    state = module.state_dict(keep_vars=True)
    return sorted((k, tuple(v.shape)) for k, v in state.items())


# Names the generated Model class defines itself: a submodule may not take them.
_RESERVED = {"load", "forward"}


def _safe(part: str) -> bool:
    mangled = part.startswith("__") and not part.endswith("__")  # `self.__x` in a class body reads `self._Model__x`
    return bool(_SAFE_SEGMENT.fullmatch(part)) and not keyword.iskeyword(part) and not hasattr(nn.Module, part) and not mangled


def safe_targets(gm: fx.GraphModule) -> dict[str, str]:
    """target -> a path of plain ASCII names, unique (unchanged where already safe)."""
    targets = list(dict.fromkeys(n.target for n in gm.graph.nodes if n.op in ("call_module", "get_attr")))
    def keeps(t):
        parts = t.split(".")
        return all(_safe(p) for p in parts) and parts[0] not in _RESERVED
    renames = {t: t for t in targets if keeps(t)}
    taken = set(renames.values())
    for target in targets:
        if target in renames:
            continue
        parts = [p if _safe(p) else (re.sub(r"[^A-Za-z0-9_]+", "_", p).strip("_") or "m") for p in target.split(".")]
        parts = [f"m_{p}" if p[0].isdigit() and not p.isdigit() or keyword.iskeyword(p) else p for p in parts]
        if parts[0] in _RESERVED:
            parts[0] = f"{parts[0]}_"
        parts = [f"{p}_" if hasattr(nn.Module, p) else p for p in parts]  # `__init__`, `to`: attributes of every module
        parts = [f"m{p}" if p.startswith("__") and not p.endswith("__") else p for p in parts]
        base = path = ".".join(parts)
        k = 1
        while path in taken:
            path, k = f"{base}_{k}", k + 1
        renames[target] = path
        taken.add(path)
    return renames


def _imports(global_names: dict[str, Any]) -> list[str]:
    lines = []
    for name, obj in sorted(global_names.items()):
        if name in _custom_builtins:
            lines.append(_custom_builtins[name].import_str)
        elif getattr(builtins, name, None) is obj:
            continue
        elif inspect.ismodule(obj):
            lines.append(f"import {obj.__name__} as {name}" if obj.__name__ != name else f"import {name}")
        else:
            module, qual = getattr(obj, "__module__", None), getattr(obj, "__qualname__", None)
            if not module or not qual or "<" in qual:
                raise SaveError(f"cannot write model.py: the forward calls {obj!r}, which has no importable name; fix: use a named function")
            if module == "__main__":  # model.py is imported by another program, whose __main__ is not this script
                raise SaveError(f"cannot write model.py: the forward uses {qual}, defined in the script being run, which model.py "
                                "cannot import; fix: define it at the top level of an importable module")
            dotted(module, "the forward calls from module")
            dotted(qual, f"the forward calls from {module}")
            lines.append(f"from {module} import {qual.split('.')[0]} as {name}" if "." not in qual else f"import {module}\n{name} = {module}.{qual}")
    return sorted(set(lines))


def renamed_graph(gm: fx.GraphModule, renames: dict[str, str]) -> fx.Graph:
    """A copy of `gm`'s graph calling its modules and attributes by their renamed paths."""
    out = next(n for n in gm.graph.nodes if n.op == "output")
    graph = fx.Graph()
    graph.output(graph.graph_copy(gm.graph, {}), type_expr=out.type)
    for node in graph.nodes:
        if node.op in ("call_module", "get_attr"):
            node.target = renames[node.target]
    return graph


def generate(gm: fx.GraphModule, *, class_name: str, frozen: list[str], ties: dict[str, str],
             non_persistent: list[str], modes: dict[str, bool], stay_eval=(), containers=None,
             entries: list | None = None) -> tuple[str, dict[str, str]]:
    """model.py source for `gm`, and the renames applied to unsafe paths.

    `entries`, when given, receives each attribute as data: (path, module or tensor, persistent);
    `containers`: the original's containers among the graph's parents (capture/_containers.py).
    """
    renames = safe_targets(gm)
    for node in gm.graph.nodes:
        if node.op == "call_method":
            method_name(node.name, node.target)
    graph = renamed_graph(gm, renames)
    code = graph.python_code(root_module="self", verbose=False)
    body = []
    done, packages = set(), set()
    for old, new in renames.items():
        if new in done:
            continue
        done.add(new)
        value = gm.get_submodule(old) if _is_module(gm, old) else get_path(gm, old)
        if isinstance(value, bool) and new.rpartition(".")[2] == "training":
            continue  # the mode, read at run time (capture/_modes.py): every module has it
        if entries is not None:
            entries.append((new, old, value, old not in non_persistent))
        if isinstance(value, nn.Module):
            body.append(f"        _put(self, {new!r}, {constructor(value, old)}{_dtype_suffix(value, old)})")
            packages.add(dotted(public_name(type(value)), f"the class of module {old!r}").rpartition(".")[0])
        elif isinstance(value, torch.Tensor):
            empty = f"torch.empty({tuple(value.shape)!r}, dtype={value.dtype})"
            if isinstance(value, nn.Parameter):
                body.append(f"        _put(self, {new!r}, nn.Parameter({empty}, requires_grad={value.requires_grad}))")
            else:
                persistent = old not in non_persistent
                body.append(f"        _put(self, {new!r}, {empty}, persistent={persistent})")
        else:
            raise SaveError(f"cannot write model.py: attribute '{old}' is a {type(value).__name__}; fix: keep only modules and tensors as graph attributes")
    eval_paths = sorted(rename_path(p, renames) for p, t in modes.items() if not t)
    held = renamed_containers(containers or {}, renames)
    train_mode = "all" if not eval_paths else ("none" if len(eval_paths) == len(modes) else "some")
    call = adapter_call(gm)
    graph_src = without_wraps(code.src).strip("\n")
    if call is not None:  # the graph takes the call's tensors flattened: model.py restores the call form
        graph_src = graph_src.replace("def forward(", "def _graph(", 1)
    forward = "\n".join("    " + line if line else line for line in graph_src.splitlines())
    used = {name: obj for name, obj in code.globals.items() if re.search(rf"\b{re.escape(name)}\b", code.src)}
    imports = _imports(used) + [f"import {p}" for p in packages if p not in ("torch", "torch.nn")]
    if call is not None:
        prelude, method, modules = adapter_source(call, class_name)
        imports += ["import inspect", "from torch.utils import _pytree as pytree"] + [f"import {m}" for m in modules]
        forward = method + "\n\n" + forward
    src = _TEMPLATE.format(
        header=f"{docstring_text(class_name)} after surgery, written by fxsurgery. Load: Model.load(directory).",
        class_name=class_name,
        live=("\n    _fxsurgery_live_modes = True  # forward reads self.training at run time"
              if any(n.op == "get_attr" and n.target == "training" for n in gm.graph.nodes) else "")
             + (_STAY.format(paths=_tuple([rename_path(p, renames) for p in stay_eval]).replace("\n", "\n    "))
                if stay_eval else ""),
        imports="\n".join(line for line in imports if line not in ("import torch",)),
        frozen=_tuple([rename_path(n, renames) for n in frozen]),
        ties=repr({rename_path(a, renames): rename_path(c, renames) for a, c in ties.items()}),
        non_persistent=_tuple([rename_path(n, renames) for n in non_persistent]),
        eval_paths=_tuple(eval_paths) if train_mode == "some" else "()",
        body="\n".join(body) or "        pass",
        train=("self.train(True)" if train_mode == "all" else "self.train(False)" if train_mode == "none"
               else "for path, module in self.named_modules():\n            module.training = path not in EVAL")
              + (_STAY_INIT if stay_eval else ""),
        forward=forward,
        containers=CONTAINERS_INIT if held else "",
    )
    if call is not None:
        src = src.replace("\n\ndef _put(", "\n\n" + prelude + "\n\ndef _put(", 1)
    if stay_eval:
        src = src.replace("\n\ndef _put(", "\n\n" + STAY_EVAL_SOURCE + "\n\ndef _put(", 1)
    if held:
        table = "".join(f"    {path!r}: {value!r},\n" for path, value in held.items())
        at = src.index("\ndef _put(")
        src = (src[:at].rstrip("\n") + f"\n\n\nCONTAINERS = {{  # the original's containers: path -> kind, modules\n{table}}}\n\n\n"
               + CONTAINERS_SOURCE + "\n\n" + src[at:])
    check_structure(src)
    return src, renames


def _tuple(items: list[str]) -> str:
    return "(\n" + "".join(f"    {i!r},\n" for i in items) + ")" if items else "()"


def rename_path(name: str, renames: dict[str, str]) -> str:
    """A tensor or module path with its module prefix renamed."""
    for old in sorted(renames, key=len, reverse=True):
        if name == old or name.startswith(old + "."):
            return renames[old] + name[len(old):]
    return name


def _is_module(gm: nn.Module, target: str) -> bool:
    return isinstance(get_path(gm, target), nn.Module)


# Modules frozen with Freeze(..., bn="eval"): in eval mode whatever .train() says.
_STAY = '''
    STAY_EVAL = {paths}

    def train(self, mode=True):
        """As nn.Module.train, except STAY_EVAL (BatchNorm frozen on its statistics) stays in eval mode."""
        super().train(mode)
        for path in self.STAY_EVAL:
            self.get_submodule(path).training = False
        return self'''
_STAY_INIT = ("\n        for path in self.STAY_EVAL:  # the hook holds them in eval mode when a block holding them is trained"
              "\n            self.get_submodule(path).training = False"
              "\n            self.get_submodule(path).register_forward_pre_hook(stay_eval)")


_TEMPLATE = '''\
"""{header}"""
import json
import os
import pathlib

import torch
from torch import nn
{imports}

# Parameters that do not train, tensors shared between paths (alias: owner),
# buffers kept out of the state dict, and modules in eval mode.
FROZEN = {frozen}
TIES = {ties}
NON_PERSISTENT = {non_persistent}
EVAL = {eval_paths}


def _put(root, path, value, persistent=True):
    *parents, name = path.split(".")
    for part in parents:
        if part not in root._modules:
            root.add_module(part, nn.Module())
        root = root._modules[part]
    if isinstance(value, nn.Module):
        root.add_module(name, value)
    elif isinstance(value, nn.Parameter):
        root.register_parameter(name, value)
    else:
        root.register_buffer(name, value, persistent=persistent)


class Model(nn.Module):
    _fxsurgery_class = {class_name!r}{live}

    def __init__(self):
        super().__init__()
{body}
        for alias, owner in TIES.items():
            _put(self, alias, self.get_parameter(owner)){containers}
        for name in FROZEN:
            self.get_parameter(name).requires_grad_(False)
        {train}

    @classmethod
    def load(cls, directory, device="cpu"):
        """The model with the weights of model.safetensors (or its shards) in `directory`."""
        from safetensors.torch import load_file
        index, tensors = os.path.join(directory, "model.safetensors.index.json"), {{}}
        shards = json.loads(pathlib.Path(index).read_text())["weight_map"] if os.path.exists(index) else {{}}
        for file in sorted(set(shards.values())) or ["model.safetensors"]:
            tensors.update(load_file(os.path.join(directory, file)))
        model = cls().to(device)
        state = {{k: v for k, v in tensors.items() if k not in NON_PERSISTENT}}
        # into the model's own (aligned) tensors, not the file's buffers: kernels may sum in another order on odd alignments
        model.load_state_dict({{**state, **{{a: state[o] for a, o in TIES.items()}}}}, strict=True)
        for name in NON_PERSISTENT:
            _put(model, name, tensors[name].to(device, copy=True), persistent=False)
        return model

{forward}
'''
