"""Read a saved directory back into a module."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from torch import nn

from .._util import first_line
from ..errors import SaveError
from ._graphdata import GRAPH
from ._rebuild import rebuild
from ._record import FORMAT, import_source, pretrained_files, read_record, verify_hash


def load(directory: str | os.PathLike, device: str | torch.device = "cpu", *, trust_code: bool = False,
         allow: tuple[str, ...] | list[str] = (), verify: bool = True) -> nn.Module:
    """Rebuild a saved module from graph.json and model.safetensors: data only, no pickle, no code from the directory.

    Functions, methods and module classes in graph.json resolve against an
    allowlist (torch, torch.nn, torchvision, operator, math, and the packages
    in `allow`). `trust_code=True` imports the directory's model.py instead
    (it runs whatever that file holds: read it first).

    The weights are checked against the record's sha256 and copied into
    memory of their own: a file changed in place later (cp, rsync --inplace)
    changes nothing loaded. `verify=False` skips both: the weights are then
    mapped, not read, so a load costs what safetensors' own does; a damaged
    file is found only where safetensors' header checks find it.
    """
    directory = Path(directory)
    record = read_record(directory)
    if record.get("saved_by") == "save_pretrained":  # a kept transformers class: its library reads it back
        if verify:
            verify_hash(directory, record)
        return _from_pretrained(directory, record, device)
    if verify:
        verify_hash(directory, record)
    elif record.get("format") not in (1, FORMAT):  # 1: the same files, a hash over fewer of them
        raise SaveError(f"{directory}: unsupported format {record.get('format')!r}; fix: write it again with this fxsurgery")
    if not trust_code:
        if not (directory / GRAPH).is_file():
            raise SaveError(f"{directory}: has no graph.json (written by an older fxsurgery), and loading its model.py would run its code; "
                            "fix: read model.py and load with trust_code=True (--trust-code) if you trust it, or write the directory again with save()")
        return rebuild(directory, tuple(allow), device, owned=verify)
    try:
        return import_source(directory / "model.py").Model.load(str(directory), device=device)
    except SafetensorError as exc:
        raise SaveError(f"{directory / 'model.safetensors'}: cannot read weights: {exc}; fix: write the directory again with save()") from None
    except Exception as exc:
        raise SaveError(f"{directory}: cannot rebuild the model: {type(exc).__name__}: {exc}; fix: write the directory again with save()") from None


def _from_pretrained(directory: Path, record: dict, device) -> nn.Module:
    """The recorded transformers class's own from_pretrained, from this directory alone and from safetensors only (no
    download, no pickle; a class named by the library, so no code from the directory), frozen as the surgery left it."""
    name = record.get("class")
    try:
        import transformers
    except ImportError:
        raise SaveError(f"{directory}: holds a {name} written by save_pretrained, which transformers reads back; "
                        "fix: pip install transformers") from None
    cls = getattr(transformers, name, None) if isinstance(name, str) and name.isidentifier() else None
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise SaveError(f"{directory / 'surgery.json'}: names class {name!r}, which is no transformers model class; "
                        "fix: write the directory again with save()")
    try:
        with tempfile.TemporaryDirectory() as listed:  # the files the record lists (and hashes) alone: an adapter_config.json
            for name in pretrained_files(directory, record):  # put beside them would have peft load other weights
                os.symlink(os.path.realpath(directory / name), os.path.join(listed, name))
            model = cls.from_pretrained(listed, local_files_only=True, use_safetensors=True)
    except SaveError:
        raise
    except Exception as exc:
        raise SaveError(f"{directory}: {name}.from_pretrained refused it: {type(exc).__name__}: {first_line(exc)}; "
                        "fix: write the directory again with save()") from None
    flow = record.get("gradient_flow")
    status = flow.get("status") if isinstance(flow, dict) else None
    params = dict(model.named_parameters(remove_duplicate=False))
    for param_name, state in (status.items() if isinstance(status, dict) else ()):
        if state == "frozen" and param_name in params:
            params[param_name].requires_grad_(False)
    return model.to(device)
