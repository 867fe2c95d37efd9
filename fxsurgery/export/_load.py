"""Read a saved directory back into a module."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from torch import nn

from .._util import read_json
from ..errors import SaveError
from ._graphdata import GRAPH
from ._rebuild import rebuild
from ._record import FORMAT, import_source, read_record, verify_hash


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
    try:
        record = read_record(directory)
    except SaveError:  # a save_pretrained directory has no model.py: say what it is instead
        _refuse_pretrained(directory, _surgery(directory))
        raise
    _refuse_pretrained(directory, record)
    if record.get("format") != FORMAT:
        raise SaveError(f"{directory}: unsupported format {record.get('format')!r}; fix: write it again with this fxsurgery")
    if verify:
        verify_hash(directory, record)
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


def _surgery(directory: Path) -> object:
    try:
        return read_json(directory / "surgery.json")
    except (OSError, ValueError):
        return None


def _refuse_pretrained(directory: Path, record: object) -> None:
    """A kept-class result is written by its library (save_pretrained) and read back by it."""
    if isinstance(record, dict) and record.get("saved_by") == "save_pretrained":
        raise SaveError(f"{directory}: holds a {record.get('class')} written by save_pretrained (keep_class=True); "
                        f"fix: load it with {record.get('class')}.from_pretrained({str(directory)!r})")

