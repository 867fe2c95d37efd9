"""Outputs: --force replaces only fxsurgery's files; a replacement is crash-safe at every instant.

- surgery.json lists the files fxsurgery wrote; --force (force=True) refuses,
  naming them, when the directory holds anything else, and writes nothing.
- A save killed at any moment (SIGKILL, at every file-system call of the
  protocol and at random times during a large save) leaves the path holding
  the complete old or the complete new output, checked by its hash and by
  loading it; the next run removes the temporary directories, and only
  fxsurgery's own.
- Files and directories are fsynced; directories get the umask's modes.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_bad_inputs import run_cli
from torch import nn

import fxsurgery as fxs
import fxsurgery.export._atomic as atomic
from fxsurgery.export._record import digest

HERE = Path(__file__).resolve().parent


def small(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))


def record(path: Path) -> dict:
    return json.loads((path / "surgery.json").read_text())


def hashes(path: Path) -> dict:
    return {f: hashlib.sha256((path / f).read_bytes()).hexdigest() for f in sorted(os.listdir(path))}


def leftovers(parent: Path) -> list[str]:
    return sorted(e for e in os.listdir(parent) if e.startswith("."))


# -- --force replaces only what fxsurgery wrote ------------------------------------------------

def test_record_lists_the_files_written(tmp_path):
    fxs.save(small(0), tmp_path / "o")
    assert record(tmp_path / "o")["files"] == ["graph.json", "model.py", "model.safetensors", "surgery.json"]
    assert sorted(os.listdir(tmp_path / "o")) == ["graph.json", "model.py", "model.safetensors", "surgery.json"]


def test_force_refuses_a_directory_with_other_files(tmp_path):
    out = tmp_path / "o"
    fxs.save(small(0), out)
    (out / "finetuned.safetensors").write_bytes(b"weeks of training")
    (out / "notes.txt").write_text("mine")
    before = hashes(out)
    with pytest.raises(fxs.SaveError) as err:
        fxs.save(small(1), out, force=True)
    assert str(err.value) == (f"{out}: holds files fxsurgery did not write (finetuned.safetensors, notes.txt), refusing to "
                              "replace it; fix: move them out of the directory or choose another output directory")
    assert hashes(out) == before and leftovers(tmp_path) == []


def test_cli_force_refuses_a_directory_with_other_files(tmp_path):
    out = tmp_path / "o"
    fxs.save(small(0), out)
    (out / "finetuned.safetensors").write_bytes(b"weeks of training")
    before = hashes(out)
    code, stdout, stderr, raised = run_cli(["apply", "torchvision.models:resnet18", "fold-bn", "--eval",
                                            "--input=1x3x32x32", "-o", str(out), "--force"])
    message = (f"{out}: holds files fxsurgery did not write (finetuned.safetensors), refusing to replace it; "
               "fix: move them out of the directory or choose another output directory")
    assert (code, stdout, stderr) == (2, "", f"fxsurgery: error: {message}\n")
    assert type(raised) is fxs.SaveError and hashes(out) == before and leftovers(tmp_path) == []


def test_force_refuses_a_file_of_yours_inside_a_directory_it_wrote(tmp_path):
    """model.dcp/ is listed as written by fxsurgery, so --force deleted whatever a user had put inside it."""
    out = tmp_path / "o"
    x = torch.randn(2, 4)
    fxs.apply(small(0), [], example_inputs=(x,)).save(out, formats=["dcp"])
    assert sorted(os.listdir(out / "model.dcp")) == [".metadata", "__0_0.distcp"]
    (out / "model.dcp" / "notes.txt").write_text("mine")
    with pytest.raises(fxs.SaveError) as err:
        fxs.apply(small(1), [], example_inputs=(x,)).save(out, formats=["dcp"], force=True)
    assert str(err.value) == (f"{out}: holds files fxsurgery did not write (model.dcp/notes.txt), refusing to replace it; "
                              "fix: move them out of the directory or choose another output directory")
    assert (out / "model.dcp" / "notes.txt").read_text() == "mine" and leftovers(tmp_path) == []
    (out / "model.dcp" / "notes.txt").unlink()
    fxs.apply(small(1), [], example_inputs=(x,)).save(out, formats=["dcp"], force=True)   # its own files only: replaced
    assert torch.equal(fxs.load(out).state_dict()["0.weight"], small(1)[0].weight)


def test_force_replaces_an_output_of_its_own(tmp_path):
    out = tmp_path / "o"
    fxs.save(small(0), out)
    fxs.save(small(1), out, force=True)
    assert torch.equal(fxs.load(out).state_dict()["0.weight"], small(1)[0].weight)
    assert sorted(os.listdir(out)) == record(out)["files"] and leftovers(tmp_path) == []


def test_force_on_an_output_without_a_file_list_replaces_the_known_names(tmp_path):
    out = tmp_path / "o"
    fxs.save(small(0), out)
    old = record(out)
    del old["files"]
    (out / "surgery.json").write_text(json.dumps(old))  # as written by an fxsurgery before the list
    fxs.save(small(1), out, force=True)
    (out / "extra.bin").write_bytes(b"x")
    with pytest.raises(fxs.SaveError, match=r"holds files fxsurgery did not write \(extra.bin\)"):
        fxs.save(small(2), out, force=True)


# -- modes and fsync -----------------------------------------------------------------------------

@pytest.mark.parametrize("umask, mode", [(0o022, 0o755), (0o077, 0o700), (0o002, 0o775)])
def test_output_modes_follow_the_umask(tmp_path, umask, mode):
    previous = os.umask(umask)
    try:
        fxs.save(small(0), tmp_path / "o")
    finally:
        os.umask(previous)
    assert (tmp_path / "o").stat().st_mode & 0o777 == mode
    assert {f: (tmp_path / "o" / f).stat().st_mode & 0o777 for f in os.listdir(tmp_path / "o")} == \
        dict.fromkeys(["graph.json", "model.py", "model.safetensors", "surgery.json"], 0o666 & ~umask)


def test_files_and_directories_are_fsynced(tmp_path, monkeypatch):
    synced, real = [], os.fsync

    def recording(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real(fd)
    monkeypatch.setattr(os, "fsync", recording)
    fxs.save(small(0), tmp_path / "o")
    work = {Path(p).name for p in synced if "/.o.fxsurgery-tmp-" in p}
    assert {"model.py", "model.safetensors", "surgery.json"} <= work
    assert any(re.fullmatch(r"\.o\.fxsurgery-tmp-[0-9a-f]{16}", name) for name in work)  # the directory itself
    assert synced[-1] == str(tmp_path)  # the rename, in the parent


# -- recovery: finish or roll back, and remove only our own -----------------------------------

def _interrupted(tmp_path, *, new_complete: bool) -> tuple[Path, str, str]:
    """The state a kill between the two renames leaves: the old output moved aside, the new one beside it."""
    out = tmp_path / "o"
    fxs.save(small(0), out)
    fxs.save(small(1), tmp_path / "new")
    token = "0123456789abcdef"
    os.rename(out, tmp_path / f".o.fxsurgery-old-{token}")
    os.rename(tmp_path / "new", tmp_path / f".o.fxsurgery-tmp-{token}")
    if not new_complete:
        (tmp_path / f".o.fxsurgery-tmp-{token}" / atomic.MARKER).write_text(f"{2**22 + 12345} {socket.gethostname()}\n")  # a dead writer
    return out, record(tmp_path / f".o.fxsurgery-old-{token}")["hash"], record(tmp_path / f".o.fxsurgery-tmp-{token}")["hash"]


@pytest.mark.parametrize("new_complete", [True, False])
def test_the_next_run_finishes_or_rolls_back(tmp_path, new_complete):
    out, old, new = _interrupted(tmp_path, new_complete=new_complete)
    assert not out.exists()
    loaded = fxs.load(out)  # the next run: load, save or the CLI
    assert record(out)["hash"] == (new if new_complete else old) == digest(out, record(out))
    assert torch.equal(loaded.state_dict()["0.weight"], small(1 if new_complete else 0)[0].weight)
    assert leftovers(tmp_path) == []


def test_the_cli_finishes_an_interrupted_replacement_before_refusing(tmp_path):
    out, old, new = _interrupted(tmp_path, new_complete=True)
    code, _, stderr, _ = run_cli(["apply", "torchvision.models:resnet18", "fold-bn", "-o", str(out)])
    assert (code, stderr) == (2, f"fxsurgery: error: {out}: already exists; fix: choose another output directory or pass --force\n")
    assert record(out)["hash"] == new and leftovers(tmp_path) == []


def test_recovery_leaves_directories_it_did_not_make(tmp_path):
    fxs.save(small(0), tmp_path / "o")
    kept = {".o.fxsurgery-tmp-0123456789abcdef": "user.txt",     # our name, not our marker
            ".o.old-12345678": atomic.MARKER,                      # our marker, not our name
            ".o.fxsurgery-tmp-XYZ": atomic.MARKER,                 # not a token
            ".other.fxsurgery-tmp-0123456789abcdef": atomic.MARKER}  # another output's
    for name, file in kept.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / file).write_text("999999999 elsewhere\n")
    live = tmp_path / ".o.fxsurgery-tmp-fedcba9876543210"  # a run still writing
    live.mkdir()
    (live / atomic.MARKER).write_text(f"{os.getppid()} {__import__('socket').gethostname()}\n")
    dead = tmp_path / ".o.fxsurgery-tmp-00000000000000aa"
    dead.mkdir()
    (dead / atomic.MARKER).write_text(f"{2**22 + 12345} {__import__('socket').gethostname()}\n")
    (dead / "model.safetensors").write_bytes(b"half")
    fxs.save(small(1), tmp_path / "o", force=True)
    assert leftovers(tmp_path) == sorted([*kept, live.name])


# -- kills ---------------------------------------------------------------------------------------

class Killer:
    def __init__(self):
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")])}
        self.proc = subprocess.Popen([sys.executable, str(HERE / "killsave.py")], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=env)

    def __call__(self, **request) -> dict:
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def killer():
    k = Killer()
    yield k
    k.close()


def complete(path: Path, allowed: dict[str, str]) -> str:
    """Which of `allowed` (name -> record hash) the output at `path` is; fails unless it is complete."""
    rec = record(path)
    assert sorted(os.listdir(path)) == rec["files"]
    assert digest(path, rec) == rec["hash"]
    names = [n for n, h in allowed.items() if h == rec["hash"]]
    assert names, f"{path} holds neither of {sorted(allowed)}"
    return names[0]


@pytest.mark.parametrize("exchange", [True, False])
def test_a_kill_at_every_step_of_a_replacement(tmp_path, killer, exchange):
    killer(op="build", name="s0", mb=0.01, seed=0), killer(op="build", name="s1", mb=0.01, seed=1)
    pristine, out = tmp_path / "pristine", tmp_path / "o"
    assert killer(op="save", name="s0", path=str(pristine))["exit"] == 0
    allowed = {"old": record(pristine)["hash"]}
    shutil.copytree(pristine, out)
    steps = killer(op="save", name="s1", path=str(out), force=True, exchange=exchange)["calls"]
    allowed["new"] = record(out)["hash"]
    seen = set()
    for n in range(1, steps + 1):
        shutil.rmtree(out)
        shutil.copytree(pristine, out)
        assert killer(op="save", name="s1", path=str(out), force=True, exchange=exchange, kill_at=n)["killed"]
        if exchange:
            complete(out, allowed)  # at every instant, before any recovery
        atomic.recover(out)  # what the next run does first
        seen.add(complete(out, allowed))
        assert leftovers(tmp_path) == [], n
    assert seen == {"old", "new"} and steps >= 8
    assert fxs.load(out).state_dict()["0.weight"].shape == (512, 512)


MB = float(os.environ.get("FXS_KILL_MB", 64))  # 200 MB (the target size) takes ~50 s on 2 busy cores


def test_kills_at_random_moments_of_a_large_save(tmp_path, killer):
    """~20 kills during a first save and ~20 during a --force replacement of a large output."""
    rng = random.Random(0)
    killer(op="build", name="old", mb=MB, seed=1), killer(op="build", name="new", mb=MB, seed=2)
    out, pristine = tmp_path / "o", tmp_path / "pristine"
    took = killer(op="save", name="old", path=str(pristine))["seconds"]
    killer(op="save", name="new", path=str(tmp_path / "ref"))
    old, new = record(pristine)["hash"], record(tmp_path / "ref")["hash"]
    shutil.rmtree(tmp_path / "ref")
    states = {"save": set(), "force": set()}
    # 40 kills at random moments, and for each mode one at once and one run left to finish (no kill),
    # so both outcomes are seen however slow the machine is at the moment
    plan = [("save" if i % 2 == 0 else "force", rng.uniform(0, took * 1.1)) for i in range(40)]
    plan += [(mode, delay) for mode in ("save", "force") for delay in (0.0, None)]
    for i, (mode, delay) in enumerate(plan):
        if out.exists():
            shutil.rmtree(out)
        if mode == "force":
            shutil.copytree(pristine, out, copy_function=os.link)  # hard links: cheap, and a save never writes in place
        killer(op="save", name="new", path=str(out), force=mode == "force", delay=delay)
        if mode == "force":  # before any recovery
            state = complete(out, {"old": old, "new": new})
        else:
            state = complete(out, {"new": new}) if out.exists() else "none"
        atomic.recover(out)  # what the next run does first
        assert leftovers(tmp_path) == [], (i, delay)
        states[mode].add(state)
    fxs.load(out)
    print(f"{MB} MB, one save {took:.2f} s, states {states}")
    assert states == {"save": {"none", "new"}, "force": {"old", "new"}}


def test_a_load_leaves_the_temp_directory_of_a_save_still_running(tmp_path):
    out = tmp_path / "o"
    fxs.save(small(0), out)
    # a writer between its last two steps: marker removed, rename not yet done; it looks complete
    fxs.save(small(1), tmp_path / "new")
    pending = tmp_path / ".o.fxsurgery-tmp-00000000000000bb"
    os.rename(tmp_path / "new", pending)
    empty = tmp_path / ".o.fxsurgery-tmp-00000000000000cc"  # a writer between mkdir and its marker
    empty.mkdir()
    loaded = fxs.load(out)
    assert run_cli(["inspect", str(out)])[0] == 0
    assert torch.equal(loaded.state_dict()["0.weight"], small(0)[0].weight)
    assert leftovers(tmp_path) == sorted([pending.name, empty.name])
    assert record(pending)["hash"] == digest(pending, record(pending))  # untouched: the writer's rename still finds it
