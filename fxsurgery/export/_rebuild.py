"""A saved directory back to a GraphModule from graph.json and model.safetensors, importing nothing it holds.

Modules and tensors are built on the meta device first, their shapes and
dtypes checked against the weights file, and only then allocated: a graph.json
that declares huge layers fails before it allocates anything.
"""

from __future__ import annotations

import math
import threading
import weakref
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn
from torch.utils._device import DeviceContext

from .._util import read_json
from ..capture import INLINE_KINDS, Containers, ModeGraphModule, assign, deep_copy, install_adapter, pickled
from ..errors import SaveError
from ..rewrite import hold_by_path, stay_eval, stays_eval
from ._callread import call_form
from ._graphdata import GRAPH, VERSION
from ._graphload import FIX, OPS, Bad, attribute, build_module, checked_call, decode, entry_error, function, method, output_type_home, path
from ._graphload import BuildBudget as budget  # what building graph.json's entries may cost
from ._graphload import identifier as plain  # a name the generated code can hold
from ._shards import read as read_weights

# the initialisers a module's constructor runs on its fresh parameters and buffers: on the meta device they compute
# nothing (every value is replaced by the weights file's, whose names and shapes are checked against the module's),
# yet cost more than the rest of construction (meta uniform_ is Python): Linear(4096, 4096) x 16, 2.8 ms, 1.3 without
_INITIALISERS = frozenset({*(getattr(nn.init, n) for n in ("uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_",
                                                          "eye_", "dirac_", "xavier_uniform_", "xavier_normal_", "kaiming_uniform_",
                                                          "kaiming_normal_", "orthogonal_", "sparse_")),
                           *(getattr(torch.Tensor, n) for n in ("uniform_", "normal_", "zero_", "fill_"))})


class _MetaBuild(DeviceContext):
    """torch.device("meta") that returns an initialiser's meta tensor untouched (a mode is per thread, as torch.device's)."""

    def __init__(self) -> None:
        super().__init__("meta")

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in _INITIALISERS:
            tensor = args[0] if args else (kwargs or {}).get("tensor")
            if isinstance(tensor, torch.Tensor) and tensor.is_meta:
                return tensor
        return super().__torch_function__(func, types, args, kwargs)


def _tensor(spec: Any, keys: set[str]) -> tuple[list[int], torch.dtype]:
    if not isinstance(spec, dict) or set(spec) != keys:
        raise Bad(f"tensor entry is not {{{', '.join(sorted(keys))}}}")
    shape, dtype = spec["shape"], decode({"dtype": spec["dtype"]}, {})
    if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
        raise Bad("shape is not a list of sizes")
    if any(d >= 1 << 62 for d in shape) or math.prod(d for d in shape if d) * dtype.itemsize >= 1 << 62:  # torch overflows
        raise Bad(f"shape {shape} declares more bytes than any file holds")
    return shape, dtype


def _attribute(root: nn.Module, entry: Any, allow: tuple[str, ...]) -> None:
    if not isinstance(entry, dict) or len(set(entry) & {"module", "parameter", "buffer"}) != 1:
        raise Bad("is not one module, parameter or buffer")
    target = path(entry.get("path"))
    if "module" in entry:
        module = build_module(entry["module"], allow)
        if entry.get("dtype") is not None:
            dtype = decode({"dtype": entry["dtype"]}, {})
            if not (dtype.is_floating_point or dtype.is_complex):  # what Module.to takes; a saved module has one of these
                raise Bad(f"dtype {entry['dtype']!r} is not a floating-point or complex dtype, which a module takes")
            module = module.to(dtype)
        assign(root, target, module)
    elif "parameter" in entry:
        shape, dtype = _tensor(entry["parameter"], {"shape", "dtype", "requires_grad"})
        assign(root, target, nn.Parameter(torch.empty(shape, dtype=dtype), requires_grad=entry["parameter"]["requires_grad"] is True))
    else:
        shape, dtype = _tensor(entry["buffer"], {"shape", "dtype", "persistent"})
        assign(root, target, torch.empty(shape, dtype=dtype), persistent=entry["buffer"]["persistent"] is not False)


def _resolves(root: nn.Module, target: str, kind: type) -> bool:
    value: Any = root
    for part in target.split("."):
        value = value._modules.get(part) if part in value._modules else getattr(value, part, None) if isinstance(value, nn.Module) else None
        if value is None:
            return False
    return isinstance(value, kind)


def _node(graph: fx.Graph, root: nn.Module, entry: Any, env: dict[str, fx.Node], allow: tuple[str, ...] = ()) -> fx.Node:
    if not isinstance(entry, dict) or set(entry) != {"op", "name", "target", "args", "kwargs", "type"}:
        raise Bad("is not {op, name, target, args, kwargs, type}")
    if entry["type"] not in (None, "torch.Tensor"):
        raise Bad(f"type {entry['type']!r} is not torch.Tensor or null")
    op, name, target = entry["op"], entry["name"], entry["target"]
    if op not in OPS:
        raise Bad(f"unknown op {op!r}")
    if not plain(name) or name == "self" or name in env:  # each becomes a variable of the generated forward
        raise Bad(f"name {name!r} is not a new plain name")
    args, kwargs = decode(entry["args"], env), decode(entry["kwargs"], env)
    if not isinstance(args, tuple) or not isinstance(kwargs, dict) or not all(plain(k) for k in kwargs):
        raise Bad("args are not a tuple or kwargs not a mapping of names")
    if op == "call_function":
        target = function(target, allow)
        if target is getattr:
            attribute(args, kwargs)
        checked_call(target, args, kwargs)
    elif op == "call_method":
        target = method(target)
    elif op == "get_attr" and target == "training":
        pass  # the module's own train/eval mode, read at run time (capture/_modes.py)
    elif op in ("call_module", "get_attr"):
        if not _resolves(root, path(target), nn.Module if op == "call_module" else (nn.Module, torch.Tensor)):
            raise Bad(f"target {target!r} is no {'module' if op == 'call_module' else 'attribute'} graph.json declares")
    elif op == "placeholder" and not (isinstance(target, str) and plain(bare := target[2:] if target.startswith("**") else target.removeprefix("*"))
                                      and bare != "self"):  # a parameter of the generated forward, beside its self
        raise Bad(f"placeholder target {target!r} is not a plain name")
    elif op == "output" and target != "output":
        raise Bad(f"output target {target!r} is not 'output'")
    return graph.create_node(op, target, args, kwargs, name=name, type_expr=torch.Tensor if entry["type"] else None)


def _graph(directory: Path, doc: dict, root: nn.Module, key: str = "nodes", allow: tuple[str, ...] = ()) -> fx.Graph:
    graph, env = fx.Graph(), {}
    nodes = doc.get("nodes")
    if not isinstance(nodes, list) or not nodes:
        raise entry_error(directory, key, Bad("is not a list of nodes"))
    for i, entry in enumerate(nodes):
        try:
            node = _node(graph, root, entry, env, allow)
        except Bad as exc:
            raise entry_error(directory, f"{key}[{i}] {entry.get('name') if isinstance(entry, dict) else None!r}", exc) from None
        if node.name != entry["name"]:
            raise entry_error(directory, f"{key}[{i}] {entry['name']!r}", Bad(f"name is taken (torch.fx named it {node.name!r})"))
        env[node.name] = node
    if [n.op for n in graph.nodes].count("output") != 1 or nodes[-1]["op"] != "output":
        raise entry_error(directory, key, Bad("do not end in exactly one output"))
    return graph


# what GraphModule.recompile generates: the forward on the class, the code on the instance
_GENERATED = ("forward", "_code", "_lineno_map", "_prologue_start")


class _Pending:
    """Stands in for a generated attribute until it is first read: reading it generates them all."""

    def __init__(self, module: fx.GraphModule, name: str) -> None:
        self.module, self.name = weakref.ref(module), name  # weak: the class (one per instance) holds this

    def __get__(self, instance, owner=None):
        module = instance if instance is not None else self.module()
        if module is None:
            raise AttributeError(self.name)
        _generate(module)
        return getattr(owner if instance is None else instance, self.name)


_GENERATING = threading.RLock()  # two threads' first calls: each generates, neither removes what the other did


def _generate(module: fx.GraphModule):
    cls = type(module)
    with _GENERATING:
        code = fx.GraphModule.recompile(module)
        for name in _GENERATED:
            if isinstance(vars(cls).get(name), _Pending):
                delattr(cls, name)
    return code


class _Loaded(fx.GraphModule):
    """A GraphModule whose Python code is generated when first used (called, traced, scripted, its code or
    forward read), not when built: a load that only reads or saves the weights does not pay for it (about a
    millisecond for 16 layers, more than all of graph.json's checks). torch.fx makes a class per instance."""

    def recompile(self):
        cls = type(self)
        if "forward" in vars(cls):  # generated, or pending: generate now, as GraphModule does (an edited graph)
            return _generate(self)
        for name in _GENERATED:  # the first, from __init__
            setattr(cls, name, _Pending(self, name))
        return None

    def _ready(self) -> None:
        if isinstance(vars(type(self)).get("forward"), _Pending):
            _generate(self)

    __deepcopy__ = deep_copy  # keeps hooks registered on it after the load, as the result's copies do

    def __reduce__(self):
        return pickled(self)  # its graph, not its code (capture/_pickling.py): nothing to generate

    def __reduce_package__(self, exporter):
        self._ready()
        return super().__reduce_package__(exporter)


def _module(directory: Path, doc: dict, root: nn.Module, allow: tuple[str, ...] = ()) -> fx.GraphModule:
    """The GraphModule of graph.json's nodes, with its `other` nodes run in their mode where the
    model's code differs by mode (capture/_dualgraph.py)."""
    graph = _graph(directory, doc, root, allow=allow)
    other = doc.get("other")
    if other is not None and not (isinstance(other, dict) and set(other) == {"training", "nodes"} and isinstance(other["training"], bool)):
        raise entry_error(directory, "other", Bad("is not {training: true or false, nodes}"))
    second = _graph(directory, other, root, "other.nodes", allow) if other is not None else None
    try:
        graph.lint()
        if second is None:
            return _Loaded(root, graph, class_name="Model")
        second.lint()
        return ModeGraphModule(root, graph, "Model", other=second, other_mode=other["training"])
    except Exception as exc:
        raise entry_error(directory, "nodes", exc) from None


def _strings(doc: dict, key: str, kind: type) -> Any:
    value = doc.get(key)
    items = value.items() if isinstance(value, dict) else value
    if not isinstance(value, kind) or not all(isinstance(x, str) for x in (sum(items, ()) if kind is dict else items)):
        raise Bad(f"is not a {kind.__name__} of names")
    return value


def rebuild(directory: Path, allow: tuple[str, ...], device: str | torch.device, owned: bool = False) -> fx.GraphModule:
    """The module graph.json describes, with the weights of model.safetensors (`owned`: copied out of the file's mapping)."""
    try:
        doc = read_json(directory / GRAPH)  # a regular file of a bounded size: a FIFO or a sparse 3 GB file is refused
    except OSError as exc:
        raise SaveError(f"{directory / GRAPH}: cannot read: {exc.strerror or exc}; {FIX}") from None
    except ValueError as exc:
        raise SaveError(f"{directory / GRAPH}: not valid JSON ({exc}); {FIX}") from None
    if not isinstance(doc, dict) or doc.get("fxsurgery_graph") != VERSION:
        raise SaveError(f"{directory / GRAPH}: not a graph description of version {VERSION}; {FIX}")
    if "unsupported" in doc:
        raise SaveError(f"{directory}: graph.json cannot describe this model ({doc['unsupported']}), so loading it means importing model.py; "
                        "fix: read model.py and load with trust_code=True (--trust-code) if you trust it")
    root = nn.Module()
    attributes = doc.get("attributes") if isinstance(doc.get("attributes"), list) else None
    if attributes is None:
        raise entry_error(directory, "attributes", Bad("is not a list"))
    try:
        ties, frozen, evals = _strings(doc, "ties", dict), _strings(doc, "frozen", list), _strings(doc, "eval", list)
        stay = _strings(doc, "stay_eval", list) if "stay_eval" in doc else []
        for alias in ties:
            path(alias)
    except Bad as exc:
        raise entry_error(directory, "ties, frozen, eval or stay_eval", exc) from None
    with _MetaBuild(), budget(10_000 + 1_000 * len(attributes)):  # a layer's worth per entry, and room
        for i, entry in enumerate(attributes):
            try:  # KeyError: a path an attribute holds already (`training`, a Linear's `weight` declared again as a buffer)
                _attribute(root, entry, allow)
            except (Bad, KeyError) as exc:
                raise entry_error(directory, f"attributes[{i}] {entry.get('path') if isinstance(entry, dict) else None!r}", exc) from None
        for alias, owner in ties.items():
            try:
                _tie_slot(root, alias)
                assign(root, alias, root.get_parameter(owner))
            except (AttributeError, KeyError, TypeError, Bad) as exc:
                raise entry_error(directory, f"ties {alias!r}", exc) from None
    gm = _module(directory, doc, root, allow)
    non_persistent = {f"{p}.{n}" if p else n for p, m in root.named_modules() for n in m._non_persistent_buffers_set}
    if "call" in doc:  # before the weights: a malformed call form fails before anything is allocated
        imported: set[str] = set()
        while True:
            try:
                spec = call_form(doc["call"])
                break
            except Bad as exc:
                raise entry_error(directory, "call", exc) from None
            except NotImplementedError as exc:  # a type torch knows by name once its library registered it
                if not str(exc).startswith("Deserializing "):
                    raise entry_error(directory, "call", Bad(f"holds a tree structure torch does not read ({exc})")) from None
                name = str(exc).removeprefix("Deserializing ").split(" ")[0]
                try:
                    imported.add(output_type_home(name, allow, imported))
                except Bad as why:
                    raise SaveError(f"{directory / GRAPH}: call: output type {name} {why}") from None
    gm = _with_weights(directory, gm, doc, ties, frozen, evals, non_persistent, device, owned)
    for where in stay:  # Freeze(..., bn="eval"): in eval mode whatever .train() says, as in memory
        try:
            module = gm.get_submodule(where)
        except AttributeError:
            raise entry_error(directory, "stay_eval", Bad(f"names no module ({where!r})")) from None
        if not stays_eval(module):
            module.register_forward_pre_hook(stay_eval)
    hold_by_path(gm)
    if "containers" in doc:  # the original's nn.Sequential, nn.ModuleList, nn.ModuleDict: result.features[0] as there
        hook = Containers(_containers(directory, doc["containers"], gm))
        hook(gm)
        gm._deepcopy_hooks.append(hook)
    if "call" in doc:
        install_adapter(gm, spec, "")
    return gm


def _containers(directory: Path, data: Any, gm: fx.GraphModule) -> dict[str, list]:
    """graph.json's `containers`: path -> [kind, module names], each path a parent of the graph's modules."""
    if not isinstance(data, dict):
        raise entry_error(directory, "containers", Bad("is not a dict of paths"))
    for where, value in data.items():
        if not (isinstance(value, list) and len(value) == 2 and value[0] in INLINE_KINDS and isinstance(value[1], list)
                and all(isinstance(n, str) for n in value[1])):
            raise entry_error(directory, f"containers {where!r}", Bad(f"is not [one of {', '.join(INLINE_KINDS)}, module names]"))
        try:
            bare = gm.get_submodule(where) if where else gm
        except AttributeError:
            bare = None
        if type(bare) is not nn.Module:
            raise entry_error(directory, f"containers {where!r}", Bad("names no parent of the graph's modules"))
    return data


def _aligned(t: torch.Tensor) -> torch.Tensor:
    return t if t.device.type != "cpu" or t.data_ptr() % 64 == 0 else t.clone()


def _assigned(gm: fx.GraphModule, state: dict[str, torch.Tensor]) -> bool:
    """Install each tensor as load_state_dict(assign=True) does, where no module has loading code of
    its own (a class's _load_from_state_dict or set_extra_state, a load hook) and torch swaps no tensors;
    False, having changed nothing, elsewhere. load_state_dict filters its parent's keys for each child
    (quadratic in a wide module's size): 0.8 ms for Linear x 16 against 0.2 ms here."""
    modules = dict(gm.named_modules(remove_duplicate=False))
    if torch.__future__.get_swap_module_params_on_conversion() or any(
            type(m)._load_from_state_dict is not nn.Module._load_from_state_dict or type(m).set_extra_state is not nn.Module.set_extra_state
            or m._load_state_dict_pre_hooks or m._load_state_dict_post_hooks for m in modules.values()):
        return False
    with torch.no_grad():
        for key, tensor in state.items():
            prefix, _, name = key.rpartition(".")
            owner = modules[prefix]
            old = owner._parameters.get(name)
            if isinstance(old, nn.Parameter):  # a Parameter again, with the module's requires_grad (frozen ones stay frozen)
                tensor = nn.Parameter(tensor, requires_grad=old.requires_grad)
            setattr(owner, name, tensor)
    return True


def _tie_slot(root: nn.Module, alias: str) -> None:
    """A tie names a parameter its layer has (an output head's weight), or one a bare container holds:
    a ReLU given a weight by a tampered file would carry a tensor no code of it reads."""
    parent, _, name = alias.rpartition(".")
    try:
        owner = root.get_submodule(parent)
    except AttributeError:
        return  # a container assign() makes
    if type(owner) is not nn.Module and name not in owner._parameters:
        raise Bad(f"{type(owner).__name__} at {parent!r} has no parameter {name!r}")


def _with_weights(directory: Path, gm: fx.GraphModule, doc: dict, ties: dict, frozen: list, evals: list, non_persistent: set,
                  device, owned: bool) -> fx.GraphModule:
    try:
        for alias, owner in ties.items():
            assign(gm, alias, gm.get_parameter(owner))
    except AttributeError as exc:  # a tie to a parameter no node reads, which the graph module therefore lacks
        raise entry_error(directory, "ties", exc) from None
    expected = {k: v for k, v in gm.state_dict(keep_vars=True).items() if k not in ties}
    expected.update({k: gm.get_buffer(k) for k in non_persistent})
    tensors = read_weights(directory)
    differ = sorted(set(tensors) ^ set(expected)) or [k for k in expected if (tensors[k].shape, tensors[k].dtype) != (expected[k].shape, expected[k].dtype)]
    if differ:
        raise SaveError(f"{directory}: model.safetensors does not hold the tensors graph.json declares (first: {differ[0]!r}); {FIX}")
    try:
        for name in frozen:
            gm.get_parameter(name).requires_grad_(False)
    except AttributeError as exc:
        raise entry_error(directory, "frozen", exc) from None
    # the tensors read are the module's own (as load_state_dict(assign=True) makes them): no second copy, unless
    # `owned` (a checked load: a file changed in place later would change the mapped tensors under the checked
    # module, or, truncated, kill the process) or mapped off torch's 64-byte alignment (CPU kernels pick their
    # vector path by alignment, and the loaded module must compute the saved one's bits)
    state = {k: _aligned(v.to(device, copy=owned)) for k, v in tensors.items() if k not in non_persistent}
    if not _assigned(gm, state):
        gm.load_state_dict({**state, **{a: state[o] for a, o in ties.items()}}, strict=True, assign=True)
    for alias, owner in ties.items():  # assigning gives each path its own Parameter: one object again
        assign(gm, alias, gm.get_parameter(owner))
    for name in non_persistent:  # GraphModule copied them as persistent buffers
        assign(gm, name, tensors[name].to(device, copy=True), persistent=False)
    modes = doc.get("modes")
    gm.train(not evals)
    if evals and len(evals) != modes:
        for p, module in gm.named_modules():
            module.training = p not in evals
    gm._fxsurgery_class = doc.get("class") if isinstance(doc.get("class"), str) else "Model"
    return gm
