"""Replay a surgery's weight map on another checkpoint of the original model.

surgery.json records, tensor by tensor, where each weight of the new module
came from. Any checkpoint of the original architecture (another fine-tuned
copy, a later epoch) maps into the new layout without tracing again: sources
are read from the checkpoint, tensors a rule made from the saved weights.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .._util import first_line, shown
from ..errors import SaveError, SurgeryWarning
from ..spec import replay
from ..transfer import open_checkpoint, read_state_dict, strip_prefixes
from ._atomic import fsync_dir, mark, recover, remove, umask, under_a_file
from ._codegen import rename_path
from ._record import read_record, verify_hash
from ._shards import SINGLE, shard_files


def map_weights(state_dict: dict | str | os.PathLike, surgery: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The state dict of the surgered module, built from a checkpoint of the original
    (a state dict, or a checkpoint file, sharded index or DCP directory as `--weights` takes).

    `surgery` is a directory written by save() or its surgery.json. The result
    loads into the saved model with `load_state_dict(..., strict=True)`. A
    tensor a rule adapted (rows selected, a BatchNorm folded, input channels
    adapted) is computed again from the checkpoint exactly as apply computed it;
    one whose recipe the record lacks (a user's pattern) is refused, and so is
    a checkpoint tensor of another dtype than the surgery read: nothing is cast.
    """
    where = "the checkpoint"
    if isinstance(state_dict, (str, os.PathLike)):
        state_dict, where = _read(state_dict), str(state_dict)
    if not isinstance(state_dict, dict):
        raise SaveError(f"{where}: is a {type(state_dict).__name__}, not a state dict; fix: pass model.state_dict() or a checkpoint file")
    odd = next((k for k, v in state_dict.items() if not isinstance(v, torch.Tensor)), None)
    if odd is not None:  # else it failed inside the replay, blamed on the surgery's record
        raise SaveError(f"{where}: {shown(str(odd))} is a {type(state_dict[odd]).__name__}, not a tensor; fix: pass a state dict "
                        "of tensors (model.state_dict())")
    directory = _directory(surgery)
    record = read_record(directory)
    verify_hash(directory, record)  # the tensors a rule made are copied from it, its record says where each comes from
    state = strip_prefixes(state_dict, where=where)
    chosen = [r["text"] for r in record.get("rules", []) if isinstance(r, dict) and re.match(r"prune .* amount=", str(r.get("text")))]
    if chosen:  # the rows map-weights keeps are the ones the surgery's checkpoint ranked first, not this one's
        warnings.warn(f"{shown(chosen[0])} chose its channels by importance on the weights the surgery was made on; "
                      f"{shown(where)} keeps those channels, which its own weights might not rank first; fix: apply the "
                      "rules again with --weights CHECKPOINT to choose by this checkpoint, or prune by channels=",
                      SurgeryWarning, stacklevel=2)
    try:
        _refuse_unexpected(record, state, where)
        return _mapped(directory, record, state)
    except (KeyError, TypeError, AttributeError, ValueError) as exc:  # a record save() did not write
        raise SaveError(f"{directory / 'surgery.json'}: not a record map-weights can read ({type(exc).__name__}: "
                        f"{first_line(exc)}); fix: write the directory again with save()") from None


def _directory(surgery: str | os.PathLike) -> Path:
    """The saved directory, given as itself or as its surgery.json."""
    directory = Path(surgery)
    if directory.name == "surgery.json":
        return directory.parent
    if directory.is_file():  # model.py, model.safetensors: a file of the output, not the output
        raise SaveError(f"{surgery}: a file, not a directory written by save(); fix: pass its directory "
                        f"({directory.parent}) or its surgery.json")
    return directory


def _read(checkpoint: str | os.PathLike) -> dict:
    if str(checkpoint).endswith(".json") or os.path.isdir(checkpoint):  # a sharded index or a DCP directory: read tensor by tensor
        sharded = open_checkpoint(checkpoint)
        return dict(sharded.read(list(sharded.keys)))
    return read_state_dict(checkpoint)


def _mapped(directory: Path, record: dict, state: dict) -> dict[str, torch.Tensor]:
    saved = _Saved(directory)
    skip = set(record.get("ties", {})) | set(record.get("non_persistent", []))
    renames = record.get("renamed", {})
    recipes = record["report"].get("recipes", {})
    state = _with_tied_names(state, record, renames)
    out = {}
    for entry in record["report"]["entries"]:
        if entry["status"] == "dropped":
            continue
        name = rename_path(entry["name"], renames)
        if name in skip:
            continue
        if entry["status"] == "new" or entry["op"].startswith("constant"):
            out[name] = saved[name]
        elif entry["name"] in recipes:
            out[name] = _replayed(directory, recipes[entry["name"]], state, name, saved[name])
        elif entry["status"] == "adapted":
            raise SaveError(f"{name} is {entry['op']} from {entry['source']}, which map-weights cannot recompute (only weights "
                            "policies and built-in patterns replay); fix: apply the rules again with --weights CHECKPOINT")
        else:
            out[name] = _fits(state, entry["source"], name, entry["shape"], entry["dtype"])
    for alias, owner in record.get("ties", {}).items():
        out[alias] = out[owner]
    return out


def _safetensors(path: Path) -> bool:
    try:
        with safe_open(str(path), framework="pt"):
            return True
    except (SafetensorError, OSError, ValueError):
        return False


def _refuse_unexpected(record: dict, state: dict, where: str) -> None:
    """A checkpoint tensor of a module the original did not have (another architecture's, a head the surgery never saw) is refused,
    as `--weights` refuses it: mapped silently, the rest of such a checkpoint could be anything."""
    report = record["report"]
    known = {e.get("source") for e in report["entries"]} | {e["name"] for e in report["entries"] if e["status"] == "dropped"}
    known |= {source for recipe in report.get("recipes", {}).values() for source in recipe.get("read", {})}
    # a module's tensors the report does not name one by one (a folded BatchNorm's num_batches_tracked) are its own
    owners = {name.rpartition(".")[0] for name in known if isinstance(name, str)}
    # (a source may name a module: a user's pattern computed fc.weight "from fc")
    unexpected = [shown(k) for k in state if k not in known and k.rpartition(".")[0] not in owners | known]
    if unexpected:
        raise SaveError(f"{shown(where)}: does not fit the original model: unexpected {len(unexpected)} ({', '.join(unexpected[:3])}); "
                        "fix: pass weights saved from the architecture the surgery was made on")


def _with_tied_names(state: dict, record: dict, renames: dict) -> dict:
    """The checkpoint, where it keeps one name of a tied pair, under the other name too.

    `safetensors.save_model` keeps lm_head.weight of a tied Llama, save_pretrained
    keeps model.embed_tokens.weight; the surgery read both names, one value."""
    source = {rename_path(e["name"], renames): e["source"] for e in record["report"]["entries"] if e.get("source")}
    state = dict(state)
    for alias, owner in record.get("ties", {}).items():
        pair = [source.get(alias), source.get(owner)]
        held = [n for n in pair if n in state]
        if len(held) == 1 and None not in pair:
            state[pair[1 - pair.index(held[0])]] = state[held[0]]
    return state


def _replayed(directory: Path, recipe, state: dict, name: str, initial: torch.Tensor) -> torch.Tensor:
    """`name` computed again from the checkpoint by its recipe; a recipe that does not work says so (a tampered record)."""
    try:
        for source, (shape, dtype) in recipe.get("read", {}).items():
            _fits(state, source, name, shape, dtype)
        dst = initial.clone()  # what a policy leaves alone (pad) stays as the rule initialised it
        replay(recipe, lambda source: _fits(state, source, name, dst.shape, None), dst)
        return dst
    except SaveError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError, IndexError, RuntimeError) as exc:
        raise SaveError(f"{directory / 'surgery.json'}: cannot replay {name} ({type(exc).__name__}: {first_line(exc)}); "
                        "fix: write the directory again with save()") from None


def _fits(state: dict, source: str, name: str, shape, dtype: str) -> torch.Tensor:
    """The checkpoint's `source`, which must have the shape and dtype the surgery read."""
    if source not in state:
        raise SaveError(f"the checkpoint has no '{source}', which {name} is made from; fix: pass a checkpoint of the original architecture")
    tensor = state[source]
    if dtype is None:  # read by a recipe: checked against what the surgery read, above
        return tensor
    if list(tensor.shape) != list(shape):
        raise SaveError(f"the checkpoint's '{source}' has shape {list(tensor.shape)}, the surgery read {list(shape)}; fix: pass a checkpoint of "
                        f"the original architecture")
    found = str(tensor.dtype).replace("torch.", "")
    if found != dtype:
        raise SaveError(f"the checkpoint's '{source}' is {found}, the surgery read {dtype}; fix: pass a {dtype} checkpoint "
                        "(map-weights casts nothing, as --weights does not)")
    return tensor


class _Saved:
    """The saved directory's own tensors (model.safetensors or its shards), read one at a time when needed."""

    def __init__(self, directory: Path):
        self.directory = directory

    def __getitem__(self, name: str) -> torch.Tensor:
        files = shard_files(self.directory) or [SINGLE]
        for file in files:
            path = str(self.directory / file)
            try:
                with safe_open(path, framework="pt") as handle:
                    if name in handle.keys():
                        return handle.get_tensor(name)
            except (SafetensorError, OSError) as exc:
                raise SaveError(f"{path}: cannot read {name}: {first_line(exc, type(exc).__name__)}; fix: write the directory "
                                "again with save()") from None
        raise SaveError(f"{self.directory}: holds no tensor {name}; fix: write the directory again with save()")


def write_mapped(checkpoint: str, surgery: str, output: str, force: bool = False) -> dict[str, torch.Tensor]:
    """`fxsurgery map-weights`: read a checkpoint file, map it, write safetensors atomically
    (`force`: replacing a file of that name, never a directory or a link)."""
    if Path(output).suffix != ".safetensors":  # before any work: a .pt name over safetensors bytes fails torch.load later
        raise SaveError(f"{output}: map-weights writes safetensors; fix: name the output *.safetensors, "
                        f"e.g. {Path(output).with_suffix('.safetensors').name}")
    target = Path(output)
    if os.path.lexists(target) and not (force and target.is_file() and not target.is_symlink()):
        fix = "choose another output file" + ("" if force else " or pass --force (force=True)")
        what = "already exists" if not force else "is not a regular file, which --force replaces"
        raise SaveError(f"{target}: {what}; fix: {fix}")
    if os.path.lexists(target) and not _safetensors(target):  # --force replaces weights, not a user's other file
        raise SaveError(f"{target}: is not a safetensors file, which --force replaces; fix: choose another output file")
    if under_a_file(target):
        raise SaveError(under_a_file(target))
    if not target.parent.is_dir():
        raise SaveError(f"{target}: its directory {target.parent} does not exist; fix: create it, or choose another output file")
    mapped = map_weights(checkpoint, surgery)
    ties = read_record(_directory(surgery)).get("ties", {})
    unique = {k: v.contiguous() for k, v in mapped.items() if k not in ties}
    recover(target)  # a killed run's marked temp directory, and the half-written file in it
    work = target.parent / f".{target.name}.fxsurgery-tmp-{secrets.token_hex(8)}"
    try:
        os.mkdir(work)
        mark(work)
        save_file(unique, str(work / target.name), metadata={"format": "pt"})  # its own temp file lands in `work` too
        os.chmod(work / target.name, 0o666 & ~umask())  # safetensors makes it private; save() gives its files the umask's modes too
        with open(work / target.name, "rb") as handle:  # on disk before it takes the name: a crash leaves the old state or the new
            os.fsync(handle.fileno())
        os.replace(work / target.name, target)
        fsync_dir(target.parent)
    except (OSError, SafetensorError) as exc:
        reason = getattr(exc, "strerror", None) or first_line(exc)
        raise SaveError(f"{target}: cannot write: {reason}; fix: choose a writable path") from None
    finally:
        with contextlib.suppress(OSError):
            remove(work)
    return mapped
