"""Replay a surgery's weight map on another checkpoint of the original model.

surgery.json records, tensor by tensor, where each weight of the new module
came from. Any checkpoint of the original architecture (another fine-tuned
copy, a later epoch) maps into the new layout without tracing again: sources
are read from the checkpoint, tensors a rule made from the saved weights.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from .._util import first_line
from ..errors import SaveError
from ..transfer import Checkpoint, read_state_dict, strip_prefixes
from ._codegen import rename_path
from ._record import read_record
from ._shards import read as read_weights

_DTYPES = {str(d).replace("torch.", ""): d for d in (torch.float16, torch.bfloat16, torch.float32, torch.float64,
                                                      torch.int64, torch.int32, torch.int8, torch.uint8, torch.bool)}


def map_weights(state_dict: dict, surgery: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The state dict of the surgered module, built from a checkpoint of the original.

    `surgery` is a directory written by save() or its surgery.json. The result
    loads into the saved model with `load_state_dict(..., strict=True)`.
    """
    directory = Path(surgery)
    directory = directory.parent if directory.name == "surgery.json" else directory
    record = read_record(directory)
    state = strip_prefixes(state_dict, where="the checkpoint")
    saved = None
    skip = set(record.get("ties", {})) | set(record.get("non_persistent", []))
    renames = record.get("renamed", {})
    out = {}
    for entry in record["report"]["entries"]:
        if entry["status"] == "dropped":
            continue
        name = rename_path(entry["name"], renames)
        if name in skip:
            continue
        constant = entry["op"].startswith("constant")
        if entry["status"] == "new" or constant:
            saved = saved if saved is not None else read_weights(directory)
            out[name] = saved[name]
            continue
        source = entry["source"]
        if source not in state:
            raise SaveError(f"the checkpoint has no '{source}', which {name} is copied from; fix: pass a checkpoint of the original architecture")
        tensor = state[source]
        if list(tensor.shape) != list(entry["shape"]):
            raise SaveError(f"the checkpoint's '{source}' has shape {list(tensor.shape)}, the surgery read {entry['shape']}; fix: pass a checkpoint of "
                            f"the original architecture")
        out[name] = tensor.to(_DTYPES.get(entry["dtype"], tensor.dtype))
    for alias, owner in record.get("ties", {}).items():
        out[alias] = out[owner]
    return out


def write_mapped(checkpoint: str, surgery: str, output: str) -> dict[str, torch.Tensor]:
    """`fxsurgery map-weights`: read a checkpoint file, map it, write safetensors atomically."""
    if str(checkpoint).endswith(".json"):  # a sharded checkpoint's index: read shard by shard
        sharded = Checkpoint(checkpoint)
        state = dict(sharded.read(list(sharded.keys)))
    else:
        state = strip_prefixes(read_state_dict(checkpoint), where=checkpoint)
    mapped = map_weights(state, surgery)
    ties = read_record(Path(surgery)).get("ties", {})
    unique = {k: v.contiguous() for k, v in mapped.items() if k not in ties}
    target = Path(output)
    if target.exists():
        raise SaveError(f"{target}: already exists; fix: choose another output file")
    tmp = target.with_name(f".{target.name}.tmp")
    try:
        save_file(unique, str(tmp), metadata={"format": "pt"})
        os.replace(tmp, target)
    except (OSError, SafetensorError) as exc:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        reason = getattr(exc, "strerror", None) or first_line(exc)
        raise SaveError(f"{target}: cannot write: {reason}; fix: choose a writable path") from None
    return mapped
