"""Checkpoint files: read safely, and undo the prefixes wrappers add to keys.

Weights are read from safetensors, or from torch files with
`weights_only=True`; nothing here runs code from a file.
"""

from __future__ import annotations

import contextlib
import os
import re
from typing import Iterator

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from .._util import first_line, read_json, shape_text, shown
from ..errors import FxsError, ModelError

# DataParallel / DistributedDataParallel and torch.compile wrap a model and
# prefix every key of its state dict.
PREFIXES = ("module.", "_orig_mod.")


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a .safetensors file, or of a weights-only torch checkpoint."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise ModelError(f"{path}: a directory, not a weights file or a torch.distributed.checkpoint directory; fix: pass the "
                         "weights file in it (its .safetensors, or its *.index.json), or load a saved output as the MODEL")
    regular_file(path)
    if not path.endswith(".safetensors"):
        with open(path, "rb") as handle:
            magic = handle.read(4)
        if not magic.startswith((b"PK\x03\x04", b"\x80")):  # torch.save writes a zip (a pickle before torch 1.6)
            raise ModelError(f"{path}: neither a .safetensors file nor a torch checkpoint (zip or pickle); "
                             "fix: pass the model's weights (.safetensors, or a weights-only .pt)")
    try:
        if path.endswith(".safetensors"):
            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
            state = state.get("state_dict", state) if isinstance(state, dict) else state
    except (SafetensorError, OSError, RuntimeError, EOFError, ValueError) as exc:
        first = first_line(exc, type(exc).__name__)
        raise ModelError(f"{path}: cannot read weights: {first}; fix: pass a complete .safetensors file (or a weights-only .pt)") from None
    except Exception as exc:  # torch's weights-only unpickler refuses anything that is not plain data
        if type(exc).__name__ == "UnpicklingError":  # its text is a page of advice with terminal escapes
            found = re.search(r"GLOBAL ([\w.]+)", str(exc))
            raise ModelError(f"{path}: holds pickled objects other than tensors{f' ({found[1]})' if found else ''}, a whole "
                             "model perhaps, which loading weights never runs; fix: save the model's weights "
                             "(safetensors.torch.save_model(model, path), or torch.save(model.state_dict(), path)) and pass that") from None
        raise ModelError(f"{path}: refused: {type(exc).__name__}: {shown(first_line(exc))}; fix: save the weights with safetensors") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelError(f"{path}: does not hold a state dict of tensors; fix: save model.state_dict() to safetensors")
    return state


def strip_prefixes(state: dict, where: str = "the checkpoint") -> dict:
    """Drop `module.` / `_orig_mod.` when every key carries it; a partial prefix is an error."""
    for prefix in PREFIXES:
        carrying = [k for k in state if k.startswith(prefix)]
        if carrying and len(carrying) == len(state):
            state = {k[len(prefix):]: v for k, v in state.items()}
        elif carrying:
            bare = [k for k in state if not k.startswith(prefix)]
            raise ModelError(f"{where}: {len(carrying)} keys start with {prefix!r} ({shown(carrying[0])}, ...) but {len(bare)} do not "
                             f"({shown(bare[0])}, ...); fix: save the weights of one model, unwrapped")
    return state


def regular_file(path: str) -> None:
    """Refuse a path that is missing or not a regular file: /dev/zero would be read forever, a FIFO waits."""
    if os.path.exists(path) and not os.path.isfile(path):
        raise ModelError(f"{path}: not a regular file; fix: pass a .safetensors file")
    if not os.path.isfile(path):
        raise ModelError(f"{path}: no such weights file; fix: check the path")


def plain_name(name: str) -> bool:
    """A file name with no directory part: it cannot point out of the checkpoint's directory."""
    return bool(name) and name not in (".", "..") and not any(c in name for c in "/\\\0")


def stamp(path: str) -> tuple:
    """What changes when a file is replaced or written to: a file read later must still be the one planned from."""
    st = os.stat(path)
    return st.st_ino, st.st_size, st.st_mtime_ns


_SAFE_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                "BOOL": torch.bool}


class Checkpoint:
    """Weights by name, read one tensor at a time: a .safetensors file, a sharded
    `*.index.json` (as Hugging Face writes them), or a weights-only torch file.

    Names and shapes come from the file headers, so a checkpoint is checked
    against a model before a byte of weights is read; tensors are then read
    shard by shard, each straight into its destination.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        self.files: dict[str, str] = {}       # name in the file -> safetensors file
        self.state: dict[str, torch.Tensor] | None = None
        self.meta: dict[str, tuple[tuple, torch.dtype]] = {}
        self.stamps: dict[str, tuple] = {}      # file -> stamp() when its header was read (a streamed read checks it)
        if self.path.endswith(".json"):
            self._index()
        elif self.path.endswith(".safetensors"):
            self._headers([self.path])
        else:
            self.state = read_state_dict(self.path)
            self.meta = {k: (tuple(v.shape), v.dtype) for k, v in self.state.items()}
        stripped = strip_prefixes(dict.fromkeys(self.meta), where=self.path)
        self.keys = dict(zip(stripped, self.meta))  # model name -> name in the file

    def _index(self) -> None:
        try:
            weight_map = read_json(self.path)["weight_map"]  # a FIFO or a sparse 3 GB "index" is refused, not read
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise TypeError
        except (OSError, ValueError, KeyError, TypeError, RecursionError) as exc:
            why = str(exc).partition(":")[0] if type(exc) is ValueError else type(exc).__name__  # read_json: its reason
            raise ModelError(f"{self.path}: not a sharded checkpoint index ({why}); fix: pass the "
                             "*.safetensors.index.json written beside the shards") from None
        outside = sorted({v for v in weight_map.values() if not plain_name(v)})
        if outside:  # a shared index must not make the reader open files elsewhere on the machine
            raise ModelError(f"{self.path}: names the shard {outside[0]!r}, which is not a file beside the index; fix: pass "
                             "an index whose weight_map names shard files in its own directory")
        folder = os.path.dirname(self.path)
        held = self._headers([os.path.join(folder, s) for s in sorted(set(weight_map.values()))])
        for file, keys in held.items():
            shard = os.path.basename(file)
            for key in keys:  # each tensor in the shard the index names, and nowhere else
                if weight_map.get(key) != shard:
                    where = "does not name it" if key not in weight_map else f"maps it to {weight_map[key]}"
                    raise ModelError(f"{file}: holds {shown(key)}, but the index {where}; fix: pass the shards written with "
                                     "this index, each tensor in one shard")
        missing = [k for k, shard in weight_map.items() if k not in held[os.path.join(folder, shard)]]
        if missing:
            raise ModelError(f"{self.path}: the index names {len(missing)} tensors its shards lack ({shown(missing[0])}, ...); "
                             "fix: pass a complete set of shards")

    def _headers(self, files: list[str]) -> dict[str, list[str]]:
        """Read each file's header: names, shapes and dtypes; {file: its tensor names}."""
        from safetensors import safe_open
        held: dict[str, list[str]] = {}
        for file in files:
            regular_file(file)
            try:
                with safe_open(file, framework="pt") as handle:
                    held[file] = list(handle.keys())
                    for key in held[file]:
                        view = handle.get_slice(key)
                        self.meta[key] = (tuple(view.get_shape()), _SAFE_DTYPES.get(view.get_dtype(), view.get_dtype()))
                        self.files[key] = file
            except (SafetensorError, OSError) as exc:
                first = first_line(exc, type(exc).__name__)
                raise ModelError(f"{file}: cannot read weights: {first}; fix: pass a complete .safetensors file (or a weights-only .pt)") from None
            self.stamps[file] = stamp(file)
        return held

    def check(self, own: dict[str, tuple[tuple, torch.dtype]] | nn.Module) -> None:
        """Every tensor `own` names (name -> (shape, dtype), or a model's state dict) is here, with that shape and
        dtype; nothing else is. Of a model's tied names (one tensor) one is enough: safetensors' save_model and
        save_pretrained keep one name of a tied embedding and head, which the others then read."""
        tied: list[list[str]] = []
        if isinstance(own, nn.Module):
            state = own.state_dict(keep_vars=True)
            groups: dict[int, list[str]] = {}
            for name, t in state.items():
                groups.setdefault(id(t), []).append(name)
            for names in groups.values():
                present = [k for k in names if k in self.keys]
                if len({self.keys[k] for k in present}) > 1:
                    tied.append(present)
                for k in names if present else ():
                    self.keys.setdefault(k, self.keys[present[0]])
            own = {k: (tuple(v.shape), v.dtype) for k, v in state.items()}
        missing = [shown(k) for k in own if k not in self.keys]
        unexpected = [shown(k) for k in self.keys if k not in own]
        meta = {k: self.meta[f] for k, f in self.keys.items()}
        wrong = [f"{shown(k)} {shape_text(meta[k][0])} != {shape_text(own[k][0])}" for k in own if k in meta and meta[k][0] != tuple(own[k][0])]
        # a strict load casts silently; a checkpoint in another dtype is a different model's weights
        cast = [f"{shown(k)} {str(meta[k][1]).replace('torch.', '')} != {str(own[k][1]).replace('torch.', '')}"
                for k in own if k in meta and meta[k][0] == tuple(own[k][0]) and meta[k][1] != own[k][1]]
        if missing or unexpected or wrong or cast:
            parts = []
            for what, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong), ("wrong dtype", cast)):
                if items:
                    parts.append(f"{what} {len(items)} ({', '.join(items[:3])})")
            fix = "pass weights saved from this architecture"
            other = {meta[k][1] for k in own if k in meta and meta[k][1] != own[k][1]}
            if cast and not (missing or unexpected or wrong) and len(other) == 1 and next(iter(other)).is_floating_point:
                theirs = str(next(iter(other))).replace("torch.", "")  # the same architecture in another precision
                fix = (f"build the model in {theirs} (a factory returning model.to(torch.{theirs})), or convert the checkpoint: "
                       "nothing is cast silently")
            raise ModelError(f"{self.path}: does not fit the model: {'; '.join(parts)}; fix: {fix}")
        for names in tied:  # one tensor in the model, two in the file: which one a load keeps is an accident of order
            first = read_block(self, names[0], None)
            other = next((k for k in names[1:] if not torch.equal(first, read_block(self, k, None))), None)
            if other is not None:
                raise ModelError(f"{self.path}: holds different values for {shown(names[0])} and {shown(other)}, which the model "
                                 "ties (one tensor); fix: pass weights of this model, or untie the two in the model first")

    def read(self, names) -> Iterator[tuple[str, torch.Tensor]]:
        """(model name, tensor) for each name, one tensor in memory at a time, shard by shard.

        The file is opened again for each tensor: safetensors maps the whole
        file, and pages a tensor touched stay resident while the map lives.
        Each read is checked as a streamed one is (read_block).
        """
        names = list(names)
        if self.files:
            order = {f: i for i, f in enumerate(dict.fromkeys(self.files[self.keys[n]] for n in names))}
            names.sort(key=lambda n: order[self.files[self.keys[n]]])
        for name in names:
            yield name, read_block(self, name, None)


def read_block(checkpoint: Checkpoint, name: str, index: tuple | None) -> torch.Tensor:
    """The checkpoint's tensor `name`, or only `index` (a tuple of slices) of it.

    It is read when its output shard is written, after the plan: a file that
    changed since (replaced, rewritten, removed) or a tensor of another shape
    or dtype than the plan's is refused in one line, before a byte reaches the output.
    """
    key = checkpoint.keys[name]
    where = checkpoint.files.get(key, checkpoint.path)
    fix = "fix: apply again with the checkpoint as it is now, and leave its files alone until the output is written"
    for file, planned in getattr(checkpoint, "stamps", {}).items():
        if file == where or not checkpoint.files:  # a DCP directory: any of its files
            try:
                now = stamp(file)
            except OSError:
                now = None
            if now != planned:
                raise ModelError(f"{file}: {'changed' if now else 'removed'} since the plan was made (reading {name}); {fix}")
    try:
        tensor = _read(checkpoint, key, index)
    except BaseException as exc:  # DCP wraps a reader's failure in a CheckpointException, a BaseException
        if isinstance(exc, (FxsError, KeyboardInterrupt, SystemExit)):
            raise
        inner = next(iter(getattr(exc, "failures", {}).values()), (exc,))[0]  # the reader's own exception
        detail = first_line(inner, "the file ends before the tensor" if isinstance(inner, EOFError) else "no detail")
        raise ModelError(f"{where}: cannot read {name}: {type(inner).__name__}: {detail}; "
                         "fix: pass a complete checkpoint (the one the plan was made from)") from None
    shape, dtype = checkpoint.meta[key]
    if index is not None:
        shape = tuple(len(range(*s.indices(n))) for s, n in zip(index, shape)) + tuple(shape[len(index):])
    if tuple(tensor.shape) != tuple(shape) or tensor.dtype != dtype:
        got, want = (f"{shape_text(s)} {str(d).replace('torch.', '')}" for s, d in ((tensor.shape, tensor.dtype), (shape, dtype)))
        raise ModelError(f"{where}: {name} reads as {got}, not the planned {want}; {fix}")
    return tensor


def _read(checkpoint: Checkpoint, key: str, index: tuple | None) -> torch.Tensor:
    if hasattr(checkpoint, "tensor"):  # a DCP directory: the block alone, through a planner
        return checkpoint.tensor(key) if index is None else checkpoint.region(key, index)
    if checkpoint.state is not None:
        whole = checkpoint.state[key]
        return whole if index is None else whole[index]
    from safetensors import safe_open
    with safe_open(checkpoint.files[key], framework="pt") as handle:
        if index is None:
            return handle.get_tensor(key)
        return handle.get_slice(key)[index]


@contextlib.contextmanager
def empty_weights():
    """Build a model without memory for its parameters: they go to the meta device
    as they are registered, while buffers (computed at construction, like rotary
    tables) stay real. Weights come later, from a Checkpoint."""
    register = nn.Module.register_parameter

    def to_meta(module, name, param):
        register(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = to_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register
