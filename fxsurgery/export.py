"""Write a result as model.py + model.safetensors + surgery.json, and read it back.

Nothing here unpickles: weights are safetensors, the record is JSON, and the
module is rebuilt by the generated source. Writes are atomic: everything goes
into a temporary directory beside the target, which is renamed into place
only when complete.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file
from torch import fx, nn

from .version import __version__
from .codegen import generate
from .errors import SaveError

FILES = ("model.py", "model.safetensors", "surgery.json")
FORMAT = 1


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike, force: bool = False):
    """Yield a temporary directory that becomes `target` only if the block succeeds."""
    target = Path(target)
    if target.exists() and not force:
        raise SaveError(f"{target}: already exists; fix: choose another output directory or pass --force (force=True)")
    if target.exists() and not (target / "surgery.json").is_file():
        raise SaveError(f"{target}: exists and is not an fxsurgery output, refusing to replace it; fix: choose another output directory")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    except OSError as exc:
        raise SaveError(f"{target}: cannot write there: {exc.strerror}; fix: choose a writable output directory") from None
    try:
        yield work
        if target.exists():
            old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
            os.rename(target, old)
            os.rename(work, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(work, target)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise


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
        key = (t.untyped_storage().data_ptr(), t.storage_offset()) if t.numel() else None
        tensors[name] = t.clone() if key in seen else t  # safetensors refuses shared memory
        if key is not None:
            seen.add(key)
    return tensors, non_persistent


def digest(directory: Path) -> str:
    h = hashlib.sha256()
    for name in ("model.py", "model.safetensors"):
        with open(directory / name, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                h.update(block)
    return "sha256:" + h.hexdigest()


def save(module: fx.GraphModule, directory: str | os.PathLike, *, force: bool = False, record: dict | None = None) -> Path:
    """Write `module` (a GraphModule) as model.py + model.safetensors + surgery.json."""
    if not isinstance(module, fx.GraphModule):
        raise SaveError(f"can only save a GraphModule (a surgery result), got {type(module).__name__}; fix: pass result.module or call result.save()")
    ties = ties_of(module)
    tensors, non_persistent = _tensors(module, ties)
    frozen = [n for n, p in module.named_parameters() if not p.requires_grad]
    header = f"{type(module).__name__} after surgery, written by fxsurgery {__version__}. Load: Model.load(directory)."
    source, renames = generate(module, header=header, frozen=frozen, ties=ties, non_persistent=non_persistent)
    tensors = {_renamed(k, renames): v for k, v in tensors.items()}
    with atomic_directory(directory, force) as work:
        (work / "model.py").write_text(source, encoding="utf-8")
        # One metadata key only: safetensors writes metadata in hash order, and
        # the same model must give the same bytes every time.
        save_file(tensors, str(work / "model.safetensors"), metadata={"format": "pt"})
        doc = {"fxsurgery": __version__, "format": FORMAT, "torch": torch.__version__,
               "class": type(module).__name__, "renamed": {k: v for k, v in renames.items() if k != v},
               **(record or {}), "hash": digest(work)}
        (work / "surgery.json").write_text(json.dumps(doc, indent=2, default=str) + "\n", encoding="utf-8")
    return Path(directory)


def _renamed(name: str, renames: dict[str, str]) -> str:
    for old in sorted(renames, key=len, reverse=True):
        if name == old or name.startswith(old + "."):
            return renames[old] + name[len(old):]
    return name


def read_record(directory: str | os.PathLike) -> dict:
    directory = Path(directory)
    missing = [f for f in FILES if not (directory / f).is_file()]
    if missing:
        raise SaveError(f"{directory}: not an fxsurgery output (missing {', '.join(missing)}); fix: pass a directory written by save()")
    try:
        return json.loads((directory / "surgery.json").read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SaveError(f"{directory / 'surgery.json'}: not valid JSON ({exc}); fix: write the directory again with save()") from None


def load(directory: str | os.PathLike, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a saved module from model.py and model.safetensors (no pickle)."""
    directory = Path(directory)
    record = read_record(directory)
    if record.get("format") != FORMAT:
        raise SaveError(f"{directory}: unsupported format {record.get('format')!r}; fix: write it again with this fxsurgery")
    if record.get("hash") != digest(directory):
        raise SaveError(f"{directory}: model.py or model.safetensors changed since it was written (hash mismatch); fix: write the directory again with save()")
    name = f"_fxsurgery_saved_{uuid.uuid4().hex}"
    spec = importlib.util.spec_from_file_location(name, directory / "model.py")
    code = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(code)
        return code.Model.load(str(directory), device=device)
    except SafetensorError as exc:
        raise SaveError(f"{directory / 'model.safetensors'}: cannot read weights: {exc}; fix: write the directory again with save()") from None
    except Exception as exc:
        raise SaveError(f"{directory}: cannot rebuild the model: {type(exc).__name__}: {exc}; fix: write the directory again with save()") from None
