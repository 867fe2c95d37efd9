"""Write a result as model.py + model.safetensors + surgery.json, atomically.

Nothing here unpickles: weights are safetensors, the record is JSON, and the
module is rebuilt by the generated source. Writes are atomic: everything goes
into a temporary directory beside the target, which takes its place only
when complete, crash-safely (_atomic.py); surgery.json lists the files written.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from torch import fx, nn

from .._progress import bar
from .._util import shown
from ..capture import ModeGraphModule, adapter_call, containers_of, current, dual_source, keep_mode_reads, renamed_containers, trace, trace_both, trace_modes
from ..errors import SaveError, TraceError
from ..rewrite import stays_eval
from ..transfer import user_hooks
from ..version import __version__
from ._atomic import MARKER, meet, replacing
from ._codegen import check_constructors, generate, rename_path, renamed_graph
from ._filehash import file_hashes
from ._formats import export_as
from ._graphdata import GRAPH, describe
from ._pretrained import refuse_unloadable, write_pretrained
from ._ranks import Ranks
from ._record import FORMAT, digest, import_source
from ._shards import DEFAULT_MAX, lazy_names, parse_size
from ._shards import write as write_weights
from ._writer import is_lazy_copy


def ties_of(module: nn.Module) -> dict[str, str]:
    """alias -> owner for every parameter reachable at more than one path."""
    first: dict[int, str] = {}
    ties = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        if id(p) in first:
            ties[name] = first[id(p)]
        else:
            first[id(p)] = name
    return ties


def _tensors(module: nn.Module, ties: dict[str, str]) -> tuple[dict[str, torch.Tensor], list[str]]:
    out, non_persistent, seen = {}, [], set()
    for name, p in module.named_parameters(remove_duplicate=False):
        if name not in ties:
            out[name] = p
    for path, sub in module.named_modules():
        for name, b in sub._buffers.items():
            if b is None:
                continue
            full = f"{path}.{name}" if path else name
            out[full] = b
            if name in sub._non_persistent_buffers_set:
                non_persistent.append(full)
    tensors = {}
    for name, t in out.items():
        t = t.detach().contiguous()
        key = (_storage_key(t), t.storage_offset()) if t.numel() else None
        tensors[name] = t.clone() if key in seen else t  # safetensors refuses shared memory
        if key is not None:
            seen.add(key)
    return tensors, non_persistent




def _storage_key(t: torch.Tensor) -> tuple:
    """What identifies a tensor's memory: its address, or for a lazy copy its storage (data_ptr() would make it copy)."""
    storage = t.untyped_storage()
    return ("storage", storage._cdata) if is_lazy_copy(t) else ("memory", storage.data_ptr())


def leaf_paths(module: nn.Module) -> list[str]:
    """Paths of the modules a GraphModule or model.py calls whole. In a model.py class (a saved result, loaded or
    rebuilt to be traced again): every one that is not a bare container, as that model.py builds them. In a kept
    class of the user's: those that hold only torch's and torchvision's modules; another library's (timm's Block)
    is traced through, as a capture traces it, since model.py could not rebuild it."""
    if hasattr(type(module), "_fxsurgery_class"):
        return [p for p, m in module.named_modules() if p and type(m) is not nn.Module]
    foreign = {p for p, m in module.named_modules() if type(m).__module__.split(".")[0] not in ("torch", "torchvision")}
    above = {".".join(p.split(".")[:i]) for p in foreign for i in range(1, p.count(".") + 1)}
    return [p for p, m in module.named_modules() if p and type(m) is not nn.Module and p not in foreign and p not in above]


def _as_graph_module(module: nn.Module, opaque: dict | None = None, both: bool = True) -> fx.GraphModule:
    """The module as one graph; `opaque` (path -> why, from the capture) names what stayed Python if it is none.
    `both`: traced in each mode (a kept class may branch on self.training); model.py's own code does not."""
    if isinstance(module, fx.GraphModule):
        return module
    try:
        with keep_mode_reads():  # code fxsurgery wrote reads self.training: the graph does too
            if getattr(type(module), "_fxsurgery_modes", None):  # a loaded model.py with a forward per mode
                return trace_modes(module, lambda view: trace(view, leaf_paths=leaf_paths(view)).gm)
            if not both:
                return trace(module, leaf_paths=leaf_paths(module)).gm
            return trace_both(module, lambda view: trace(view, leaf_paths=leaf_paths(view)).gm)
    except TraceError as err:
        kind = shown(type(module).__name__)
        cached = [(path, why) for path, why in (opaque or {}).items() if "Cache" in str(why)]
        if cached:  # a transformers model given a cache object stays Python: the capture says so, the re-trace does not
            path, why = cached[0]
            raise SaveError(f"cannot write model.py for {kind}: '{path or kind}' stays Python ({str(why).partition('; fix:')[0]}); "
                            "fix: build the model with config.use_cache=False (a graph takes no cache object) and apply again") from None
        graphs = [p for p, m in module.named_modules() if isinstance(m, fx.GraphModule)]
        inside = f" (its graphs: {', '.join(graphs[:3])})" if graphs else ""
        why = err.reason or err.problem
        if "fix: rename that submodule" in str(err):  # a name no generated code can hold: renaming is the fix
            raise SaveError(f"cannot write model.py for {kind}: {why.partition('; fix:')[0]}; fix: rename that submodule "
                            "to a plain Python name and apply again") from None
        raise SaveError(f"cannot write model.py for {kind}: part of its forward stays Python{inside}: "
                        f"{why}; fix: save its weights with "
                        "safetensors.torch.save_model(module, path) and rebuild the architecture in code, "
                        "or make the model traceable (leaf_paths=, --leaf on the command line)") from None


def check_save(module: nn.Module, pretrained: bool, record: dict | None = None, original: nn.Module | None = None) -> None:
    """What a save would refuse, refused without writing (a dry run promises what the save will do)."""
    if pretrained:
        refuse_unloadable(module, original)
        refuse_hooks(module, "from_pretrained does")
        return
    refuse_hooks(module, "model.py and graph.json do")
    check_constructors(_as_graph_module(module, ((record or {}).get("coverage") or {}).get("opaque")))


def _source(gm: fx.GraphModule, work: Path, **facts) -> tuple[str, dict[str, str], dict]:
    """model.py for `gm`, in the form a later export of the loaded model reproduces, and graph.json's content.

    The source is generated, imported on the meta device (no weights), traced
    again and regenerated: node names then are the ones a re-trace gives, so
    export -> load -> export writes the same file. graph.json describes that
    re-traced graph.
    """
    dual = isinstance(gm, ModeGraphModule)
    make = (lambda g, **f: dual_source(g, generate, **f)) if dual else generate
    call = adapter_call(gm)
    entries: list = []
    first, renames = make(gm, **facts, **({"entries": entries} if call is not None else {}))
    if call is not None:  # called through an adapter: its forward is not the graph's to re-trace; its graph is described
        if dual:
            return first, renames, {"fxsurgery_graph": 1, "class": facts["class_name"],
                                    "unsupported": "it is called through a call adapter and runs a graph per mode"}
        return first, renames, describe(gm, entries, graph=renamed_graph(gm, renames), call=call, **_renamed(facts, renames))
    (work / "model.py").write_text(first, encoding="utf-8")
    with torch.device("meta"):
        rebuilt = import_source(work / "model.py").Model()
    again = _as_graph_module(rebuilt, both=False)  # the source just written: its forward decides nothing by mode
    renamed = _renamed(facts, renames)
    # a graph per train/eval mode: model.py holds both and picks by self.training, graph.json too
    second, _ = make(again, **renamed, entries=entries)
    return second, renames, describe(again, entries, **renamed)


def _renamed(facts: dict, renames: dict[str, str]) -> dict:
    """The facts about a module's paths, with the paths renamed as model.py renames them."""
    return {**facts, "frozen": [rename_path(n, renames) for n in facts["frozen"]],
            "stay_eval": [rename_path(p, renames) for p in facts.get("stay_eval", ())],
            "containers": renamed_containers(facts.get("containers") or {}, renames),
            "ties": {rename_path(a, renames): rename_path(o, renames) for a, o in facts["ties"].items()},
            "non_persistent": [rename_path(n, renames) for n in facts["non_persistent"]],
            "modes": {rename_path(p, renames): t for p, t in facts["modes"].items()}}


def save(module: nn.Module, directory: str | os.PathLike, *, force: bool = False, record: dict | None = None,
         formats=(), example_inputs: tuple | None = None, extra=None, max_shard_size: int | str = DEFAULT_MAX,
         lazy: dict | None = None, static: list | None = None, ranks: bool = False) -> Path:
    """Write `module` as model.py + model.safetensors + surgery.json, atomically.

    `formats` adds model.pt2 (torch.export), model.onnx or model.torchscript.pt,
    each checked against the module on `example_inputs` (pt2 and ONNX keep every dim dynamic except
    those in `static`, a set of dims per input; None: all static); `extra` maps more file
    names to functions that write them. Weights above `max_shard_size` go into
    shards with an index (_shards.py); `lazy` maps id(tensor) of meta tensors
    to functions that read their values, called shard by shard. `ranks=True`:
    this process is one of torchrun's ranks (RANK, WORLD_SIZE) writing this
    output together, each its share of the shards (_ranks.py).
    """
    limit = parse_size(max_shard_size)
    refuse_hooks(module, "model.py and graph.json do")
    group = Ranks.from_env() if ranks else None
    gm = _as_graph_module(module, ((record or {}).get("coverage") or {}).get("opaque"))
    class_name = getattr(module, "_fxsurgery_class", None) or type(module).__name__
    ties = ties_of(gm)
    readers = lazy_names(gm, lazy)
    if readers and formats:
        raise SaveError(f"formats {', '.join(formats)}: a streamed result holds no weights in memory to export; "
                        "fix: leave formats out, or apply without stream")
    tensors, non_persistent = _tensors(gm, ties)
    frozen = [n for n, p in gm.named_parameters() if not p.requires_grad]
    with replacing(directory, force, group) as work:
        # of the modules the graph holds: a kept class's others (a dropout its forward skips) are not in model.py,
        # and naming them made a second save of the loaded result differ from the first
        held = {p for p, _ in gm.named_modules()}
        modes = {p: m.training for p, m in module.named_modules() if p in held}
        source, renames, description = _source(gm, work, class_name=class_name, frozen=frozen, ties=ties,
                                               non_persistent=non_persistent, modes=modes,
                                               stay_eval=[p for p, m in module.named_modules() if stays_eval(m) and p in held],
                                               containers=containers_of(gm, module))
        (work / "model.py").write_text(source, encoding="utf-8")
        (work / GRAPH).write_text(json.dumps(description, indent=1) + "\n", encoding="utf-8")
        # One metadata key only: safetensors writes metadata in hash order, and
        # the same model must give the same bytes every time.
        written = hashlib.sha256((work / "model.py").read_bytes())  # the record's hash, fed while the weights are written
        hashes = write_weights(work, {rename_path(k, renames): readers.get(k, v) for k, v in tensors.items()},
                               {rename_path(k, renames): v for k, v in tensors.items()}, limit, into=written)
        if group is not None and group.rank:  # rank 0 writes the rest
            return Path(directory)
        exported = {fmt: export_as(fmt, current(gm), work, example_inputs, static) for fmt in bar(formats, "export", unit="format")}
        for name, write in (extra or {}).items():  # written by fxsurgery (a diff page): --force may replace them
            write(work / name)
        doc = {"fxsurgery": __version__, "format": FORMAT, "torch": torch.__version__, "class": class_name,
               "renamed": {k: v for k, v in renames.items() if k != v},
               "ties": {rename_path(a, renames): rename_path(o, renames) for a, o in ties.items()},
               "non_persistent": [rename_path(n, renames) for n in non_persistent],
               **(record or {}), "formats": exported,
               **({"shards": hashes} if hashes else {}), "files": _listed(work)}
        doc["sha256"] = file_hashes(work, doc["files"], hashes)
        doc["hash"] = digest(work, doc, hashes, written)
        (work / "surgery.json").write_text(json.dumps(doc, indent=2, default=str) + "\n", encoding="utf-8")
    return Path(directory)


def save_pretrained(module: nn.Module, directory: str | os.PathLike, *, force: bool = False, record: dict | None = None,
                    max_shard_size: int | str = DEFAULT_MAX, lazy: dict | None = None, ranks: bool = False,
                    original: nn.Module | None = None) -> Path:
    """Write a model kept as its own class with its own `save_pretrained`, and surgery.json beside it.

    The directory is the library's own format: `from_pretrained` reloads it
    without fxsurgery, its configuration already following the edit. A streamed
    result (`lazy`) is written shard by shard in that format (_pretrained.py).
    """
    limit = parse_size(max_shard_size)
    refuse_unloadable(module, original)
    refuse_hooks(module, "from_pretrained does")
    group = Ranks.from_env() if ranks else None
    with replacing(directory, force, group) as work:
        hashes = write_pretrained(module, work, limit, lazy, ties_of(module)) if lazy else {}
        if not lazy and (group is None or group.rank == 0):
            module.save_pretrained(work, max_shard_size=limit)
        if not lazy and group is not None:  # written whole by rank 0 alone
            meet(group, work, {})
        if group is not None and group.rank:
            return Path(directory)
        doc = {"fxsurgery": __version__, "format": FORMAT, "torch": torch.__version__, "class": type(module).__name__,
               "saved_by": "save_pretrained", "ties": ties_of(module),  # map-weights reads these two
               "non_persistent": [f"{p}.{n}" if p else n for p, sub in module.named_modules() for n in sorted(sub._non_persistent_buffers_set)],
               **(record or {}), **({"shards": hashes} if hashes else {}),
               "files": _listed(work)}
        doc["sha256"] = file_hashes(work, doc["files"], hashes)
        doc["hash"] = digest(work, doc)  # over the files the library wrote, read back once
        (work / "surgery.json").write_text(json.dumps(doc, indent=2, default=str) + "\n", encoding="utf-8")
    return Path(directory)


def refuse_hooks(module: nn.Module, rebuilt_by: str) -> None:
    """A module running hooks of the user's would load without them, computing something else."""
    hooked = user_hooks(module)
    if hooked:
        shown = ", ".join(hooked[:3]) + (f" and {len(hooked) - 3} more" if len(hooked) > 3 else "")
        raise SaveError(f"{shown}: run hooks registered on the model, which {rebuilt_by} not rebuild, so the saved model "
                        "would compute without them; fix: remove the hooks (handle.remove()) before saving and register "
                        "them again after loading")


def _listed(work: Path) -> list[str]:
    """The files this output holds, as written by fxsurgery: what --force may replace."""
    return sorted({*os.listdir(work), "surgery.json"} - {MARKER})
