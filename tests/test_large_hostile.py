"""Hostile inputs to the large-model paths: sharded indexes, DCP directories, files that change under a
streamed save, killed saves, and temporary directories of other hosts.

Each refusal is checked word for word, with nothing written at the output; what is accepted is checked
against the output of the same surgery from a plain checkpoint, byte for byte.
"""

from __future__ import annotations

import json
import os
import pickle
import signal
import socket
import subprocess
import sys
import time
import warnings

import pytest
import torch
import torch.distributed.checkpoint as dcp
from conftest import ROOT, cli
from safetensors.torch import save_file
from torch import nn

import fxsurgery as fxs
from fxsurgery import Freeze
from fxsurgery.errors import bounded
from fxsurgery.export import Ranks, check_target
from fxsurgery.export._atomic import MARKER, take_over
from fxsurgery.export._record import digest

X = (torch.zeros(1, 8),)
RULES = [Freeze("0")]
INDEX = "model.safetensors.index.json"


def build() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


def empty() -> nn.Module:
    with fxs.empty_weights():
        return build()


STATE = {k: v.contiguous() for k, v in build().state_dict().items()}  # 0.weight, 0.bias, 2.weight, 2.bias


def index_of(folder, weight_map: dict, shards: dict[str, list[str]]):
    """An index with `weight_map`, beside shards {file: names} written from STATE."""
    folder.mkdir(exist_ok=True)
    for file, names in shards.items():
        save_file({n: STATE[n] for n in names}, str(folder / file))
    (folder / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder / INDEX


def refused(weights, tmp_path, message: str, stream: bool = True) -> None:
    """Applying with `weights` raises a ModelError saying `message` (cut to one line of 300 characters); no output appears."""
    with pytest.raises(fxs.ModelError) as err:
        fxs.apply(empty(), RULES, X, weights=str(weights), stream=stream).save(tmp_path / "out", max_shard_size=300)
    assert str(err.value) == bounded(message)
    assert not (tmp_path / "out").exists() and not [e for e in os.listdir(tmp_path) if e.startswith(".out.")]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The output of the surgery from one plain .safetensors file (sharded: 300-byte shards)."""
    folder = tmp_path_factory.mktemp("ref")
    save_file(STATE, str(folder / "w.safetensors"))
    fxs.apply(empty(), RULES, X, weights=str(folder / "w.safetensors"), stream=True).save(folder / "out", max_shard_size=300)
    return {f: (folder / "out" / f).read_bytes() for f in os.listdir(folder / "out")}


def files_of(directory) -> dict[str, bytes]:
    return {f: (directory / f).read_bytes() for f in os.listdir(directory)}


# -- sharded indexes ----------------------------------------------------------------------------

@pytest.mark.parametrize("where", ["../outside/evil.safetensors", "/ABS/evil.safetensors", ".", ""])
def test_an_index_naming_a_file_outside_its_directory_is_refused(tmp_path, where):
    (tmp_path / "outside").mkdir()
    save_file(STATE, str(tmp_path / "outside" / "evil.safetensors"))  # a readable checkpoint is there
    where = where.replace("/ABS", str(tmp_path / "outside"))
    index = index_of(tmp_path / "ck", dict.fromkeys(STATE, where), {})
    for stream in (True, False):
        refused(index, tmp_path, f"{index}: names the shard {where!r}, which is not a file beside the index; fix: pass "
                "an index whose weight_map names shard files in its own directory", stream)


def test_a_symlinked_shard_is_read_as_a_hub_cache_holds_them(tmp_path, reference):
    # the Hugging Face cache links each snapshot's files to blobs elsewhere: a link inside the directory is followed
    (tmp_path / "blobs").mkdir()
    save_file(STATE, str(tmp_path / "blobs" / "abc123"))
    (tmp_path / "ck").mkdir()
    os.symlink(tmp_path / "blobs" / "abc123", tmp_path / "ck" / "model-00001-of-00001.safetensors")
    (tmp_path / "ck" / INDEX).write_text(json.dumps({"weight_map": dict.fromkeys(STATE, "model-00001-of-00001.safetensors")}))
    fxs.apply(empty(), RULES, X, weights=str(tmp_path / "ck" / INDEX), stream=True).save(tmp_path / "out", max_shard_size=300)
    assert files_of(tmp_path / "out") == reference


@pytest.mark.parametrize("kind", ["fifo", "link to /dev/zero"])
def test_a_shard_that_is_not_a_regular_file_is_named_so(tmp_path, kind):
    # it was refused as "no such weights file; fix: check the path", though the path is right there
    index = index_of(tmp_path / "ck", {**dict.fromkeys(STATE, "a.safetensors"), "2.bias": "b.safetensors"},
                     {"a.safetensors": ["0.weight", "0.bias", "2.weight"]})
    shard = tmp_path / "ck" / "b.safetensors"
    os.mkfifo(shard) if kind == "fifo" else os.symlink("/dev/zero", shard)
    for stream in (True, False):
        refused(index, tmp_path, f"{shard}: not a regular file; fix: pass a .safetensors file", stream)


def test_a_tensor_in_two_shards_is_refused_not_taken_from_the_last(tmp_path):
    # b.safetensors also holds 0.weight (zeros); read in file order it would silently win
    folder = tmp_path / "ck"
    folder.mkdir()
    save_file({"0.weight": STATE["0.weight"], "0.bias": STATE["0.bias"]}, str(folder / "a.safetensors"))
    save_file({"0.weight": torch.zeros(16, 8), "2.weight": STATE["2.weight"], "2.bias": STATE["2.bias"]}, str(folder / "b.safetensors"))
    weight_map = {"0.weight": "a.safetensors", "0.bias": "a.safetensors", "2.weight": "b.safetensors", "2.bias": "b.safetensors"}
    (folder / INDEX).write_text(json.dumps({"weight_map": weight_map}))
    message = (f"{folder / 'b.safetensors'}: holds 0.weight, but the index maps it to a.safetensors; fix: pass the shards "
               "written with this index, each tensor in one shard")
    for stream in (True, False):
        refused(folder / INDEX, tmp_path, message, stream)


def test_a_shard_holding_a_tensor_the_index_does_not_name_is_refused(tmp_path):
    index = index_of(tmp_path / "ck", {n: "a.safetensors" for n in ("0.weight", "0.bias", "2.weight")}, {"a.safetensors": list(STATE)})
    refused(index, tmp_path, f"{tmp_path / 'ck' / 'a.safetensors'}: holds 2.bias, but the index does not name it; fix: pass "
            "the shards written with this index, each tensor in one shard")


@pytest.mark.parametrize("weight_map", [["a"], None, {"0.weight": 1}, {"0.weight": ["a.safetensors"]}, "deep"])
def test_an_index_whose_weight_map_is_not_names_to_files_is_refused(tmp_path, weight_map):
    (tmp_path / "ck").mkdir()
    deep = "[" * 200_000 + "]" * 200_000  # nested past the JSON decoder's recursion limit
    (tmp_path / "ck" / INDEX).write_text(json.dumps({"weight_map": weight_map}).replace('"deep"', deep))
    refused(tmp_path / "ck" / INDEX, tmp_path, f"{tmp_path / 'ck' / INDEX}: not a sharded checkpoint index "
            f"({'RecursionError' if weight_map == 'deep' else 'TypeError'}); fix: pass the *.safetensors.index.json written beside the shards")


def test_the_cli_refuses_a_hostile_index_in_one_line(tmp_path):
    index = index_of(tmp_path / "ck", dict.fromkeys(STATE, "../../etc/passwd"), {})
    (tmp_path / "m.py").write_text("import torch\nfrom torch import nn\n\ndef build():\n"
                                   "    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))\n")
    (tmp_path / "r.yaml").write_text('fxsurgery: 1\nrules:\n  - freeze: "0"\n')
    code, out, err = cli("apply", f"{tmp_path / 'm.py'}:build", tmp_path / "r.yaml", "--input", "1x8", "--weights", index,
                         "--stream", "-o", tmp_path / "out", "--max-shard-size", "1KB")
    assert (code, out) == (2, "")
    assert err == "fxsurgery: error: " + bounded(f"{index}: names the shard '../../etc/passwd', which is not a file beside the "
                                                 "index; fix: pass an index whose weight_map names shard files in its own directory") + "\n"
    assert not (tmp_path / "out").exists()


# -- a checkpoint that changes between the plan and the save ------------------------------------

def test_a_shard_changed_or_removed_after_the_plan_is_refused_and_a_new_plan_writes(tmp_path, reference):
    file = tmp_path / "w.safetensors"
    fix = "fix: apply again with the checkpoint as it is now, and leave its files alone until the output is written"
    changes = {"shape": {"0.weight": torch.zeros(4, 4)}, "dtype": {"0.weight": torch.zeros(16, 8, dtype=torch.float16)},
               "values": {"0.weight": torch.ones(16, 8)}, "removed": None}
    for what, change in changes.items():
        save_file(STATE, str(file))
        result = fxs.apply(empty(), RULES, X, weights=str(file), stream=True)
        if change is None:
            file.unlink()
        else:
            time.sleep(0.01)  # a rewrite within the clock's tick keeps the time; the inode changes anyway
            save_file({**STATE, **change}, str(file))
        with pytest.raises(fxs.ModelError) as err:
            result.save(tmp_path / "out", max_shard_size=300)
        state = "removed" if change is None else "changed"
        assert str(err.value) == bounded(f"{file}: {state} since the plan was made (reading 0.weight); {fix}"), what
        assert sorted(os.listdir(tmp_path)) == (["w.safetensors"] if change is not None else [])
    save_file(STATE, str(file))
    fxs.apply(empty(), RULES, X, weights=str(file), stream=True).save(tmp_path / "out", max_shard_size=300)
    assert files_of(tmp_path / "out") == reference


# -- torch.distributed.checkpoint directories ---------------------------------------------------

def dcp_of(folder):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        dcp.save(STATE, storage_writer=dcp.FileSystemWriter(str(folder)), no_dist=True)
    return folder


class _Touch:
    """What a hostile .metadata holds: unpickling it would run a command."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return os.system, (f"touch {self.path}",)


def _dotted(command: str) -> bytes:
    """A protocol-4 pickle calling os.system reached through the DCP metadata module's own `import os`."""
    text = [s.encode() for s in ("torch.distributed.checkpoint.metadata", "os.system", command)]
    return b"\x80\x04" + b"".join(b"\x8c" + bytes([len(t)]) + t for t in text[:2]) + b"\x93" + \
        b"\x8c" + bytes([len(text[2])]) + text[2] + b"\x85R."


@pytest.mark.parametrize("payload, name", [(lambda p: pickle.dumps(_Touch(p)), "posix.system"),
                                           (lambda p: _dotted(f"touch {p}"), "torch.distributed.checkpoint.metadata.os.system")])
def test_a_dcp_metadata_pickle_that_runs_code_is_refused_unrun(tmp_path, payload, name):
    folder = dcp_of(tmp_path / "ck")
    (folder / ".metadata").write_bytes(payload(tmp_path / "pwned"))
    refused(folder, tmp_path, f"{folder}: cannot read the torch.distributed.checkpoint metadata: UnpicklingError: refused "
            f"global {name}; fix: pass a complete checkpoint directory written by dcp.save")
    assert not (tmp_path / "pwned").exists()


def _rewrite_metadata(folder, change) -> None:
    from torch.distributed.checkpoint import FileSystemReader
    metadata = FileSystemReader(str(folder)).read_metadata()  # the file is ours here
    for info in metadata.storage_data.values():
        change(info)
    metadata.storage_meta = None
    (folder / ".metadata").write_bytes(pickle.dumps(metadata))


@pytest.mark.parametrize("where", ["../other/__0_0.distcp", "/ABS/__0_0.distcp"])
def test_a_dcp_metadata_naming_a_file_outside_the_directory_is_refused(tmp_path, where):
    dcp_of(tmp_path / "other")
    folder = dcp_of(tmp_path / "ck")
    where = where.replace("/ABS", str(tmp_path / "other"))
    _rewrite_metadata(folder, lambda info: setattr(info, "relative_path", where))
    refused(folder, tmp_path, f"{folder}: cannot read the torch.distributed.checkpoint metadata: ValueError: names the data "
            f"file {where!r}, which is not a file in the directory; fix: pass a complete checkpoint directory written by dcp.save")


def test_a_dcp_directory_whose_data_ends_early_is_refused_in_one_line(tmp_path):
    folder = dcp_of(tmp_path / "ck")
    _rewrite_metadata(folder, lambda info: setattr(info, "offset", 10**6))
    message = (f"{folder}: cannot read 0.weight: EOFError: the file ends before the tensor; fix: pass a complete checkpoint "
               "(the one the plan was made from)")
    for stream in (True, False):
        refused(folder, tmp_path, message, stream)
    os.unlink(folder / "__0_0.distcp")
    refused(folder, tmp_path, f"{folder}: cannot read the torch.distributed.checkpoint metadata: ValueError: names the data "
            "file __0_0.distcp, which is missing; fix: pass a complete checkpoint directory written by dcp.save")


def test_a_plain_dcp_directory_still_writes_the_reference(tmp_path, reference):
    fxs.apply(empty(), RULES, X, weights=str(dcp_of(tmp_path / "ck")), stream=True).save(tmp_path / "out", max_shard_size=300)
    assert files_of(tmp_path / "out") == reference


# -- kills and other hosts ----------------------------------------------------------------------

CHILD = """import sys, torch
from torch import nn
import fxsurgery as fxs
with fxs.empty_weights():
    model = nn.Sequential(*[nn.Linear(512, 512) for _ in range(24)])
result = fxs.apply(model, [fxs.Freeze("0")], (torch.zeros(1, 512),), weights=sys.argv[1], stream=True)
result.save(sys.argv[2], max_shard_size="2MB", force=True)
"""


def test_a_streamed_save_killed_mid_write_leaves_the_old_output_and_a_rerun_writes_it_whole(tmp_path):
    torch.manual_seed(1)
    state = nn.Sequential(*[nn.Linear(512, 512) for _ in range(24)]).state_dict()  # 25 MB: 24 output shards of a layer each
    names = list(state)
    weight_map = {n: f"model-{k % 3 + 1:05d}-of-00003.safetensors" for k, n in enumerate(names)}
    (tmp_path / "ck").mkdir()
    for file in set(weight_map.values()):
        save_file({n: state[n] for n in names if weight_map[n] == file}, str(tmp_path / "ck" / file))
    (tmp_path / "ck" / INDEX).write_text(json.dumps({"weight_map": weight_map}))
    (tmp_path / "child.py").write_text(CHILD)
    out = tmp_path / "out"
    fxs.save(nn.Linear(2, 2), out)  # an older output at the path, which --force replaces
    old = files_of(out)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    run = [sys.executable, str(tmp_path / "child.py"), str(tmp_path / "ck" / INDEX), str(out)]
    child = subprocess.Popen(run, env=env, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # kill it once its first output shard is in its temporary directory
        hidden = [tmp_path / e for e in os.listdir(tmp_path) if e.startswith(".out.fxsurgery-tmp-")]
        if hidden and any(f.startswith("model-0") for f in os.listdir(hidden[0])):
            break
        time.sleep(0.005)
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    assert files_of(out) == old  # the old output, whole
    assert subprocess.run(run, env=env, stderr=subprocess.DEVNULL).returncode == 0
    assert [e for e in os.listdir(tmp_path) if e.startswith(".")] == []  # the killed run's directory is gone too
    fresh = tmp_path / "fresh"
    with fxs.empty_weights():
        model = nn.Sequential(*[nn.Linear(512, 512) for _ in range(24)])
    fxs.apply(model, [Freeze("0")], (torch.zeros(1, 512),), weights=str(tmp_path / "ck" / INDEX), stream=True).save(fresh, max_shard_size="2MB")
    got, want = files_of(out), files_of(fresh)
    assert len(want) == 24 + 4  # a shard per layer, the index, model.py, graph.json, surgery.json
    records = [json.loads(f.pop("surgery.json")) for f in (got, want)]  # (its rules' origins name the two scripts)
    assert got == want and records[0]["shards"] == records[1]["shards"]
    assert records[0]["hash"] == digest(out, records[0])  # sealed over the record as the rerun wrote it


def test_a_temporary_directory_of_another_host_is_left_to_its_host(tmp_path):
    # several nodes of one launch (or two machines) writing beside each other on a shared file system:
    # a pid is only judged on the host that wrote it
    fxs.save(nn.Linear(2, 2), tmp_path / "o")
    dead = 2**22 + 12345  # above Linux's largest pid
    other = tmp_path / ".o.fxsurgery-tmp-00000000000000aa"
    here = tmp_path / ".o.fxsurgery-tmp-00000000000000bb"
    for folder, host in ((other, "another-node"), (here, socket.gethostname())):
        folder.mkdir()
        (folder / MARKER).write_text(f"{dead} {host}\n")
        (folder / "model-00001-of-00002.safetensors").write_bytes(b"half")
    check_target(tmp_path / "o", force=True)
    assert sorted(e for e in os.listdir(tmp_path) if e.startswith(".")) == [other.name]


def test_a_rank_handing_over_a_name_outside_its_directory_is_refused(tmp_path):
    ranks = Ranks(0, 2, "host:29500:run")
    ranks.target = tmp_path / "out"
    share = ranks.share(ranks.target, 1)
    share.mkdir()
    (tmp_path / "victim").write_text("keep")
    (share / ".fxsurgery-rank-shards.json").write_text(json.dumps({"../victim": "sha256:0"}))
    (tmp_path / "work").mkdir()
    with pytest.raises(fxs.SaveError) as err:
        take_over(ranks, tmp_path / "work")
    assert str(err.value) == (f"rank 1 of 2: its shards are not in {share} (ValueError); fix: give every rank the same "
                              "output directory on a shared file system")
    assert (tmp_path / "victim").read_text() == "keep" and os.listdir(tmp_path / "work") == []



def test_a_link_named_like_a_temporary_directory_is_never_followed(tmp_path):
    # an archive unpacked beside the output, or another user of a shared directory, can leave links with our names;
    # recovery would empty (or move into place) the directory they point to
    victim = tmp_path / "victim"
    (victim / "sub").mkdir(parents=True)
    (victim / "a.txt").write_text("precious")
    (victim / "sub" / "b.txt").write_text("precious too")
    (victim / MARKER).write_text(f"{2**22 + 12345} {socket.gethostname()}\n")
    links = [f".out.fxsurgery-{kind}-0123456789abcdef" for kind in ("tmp", "old", "trash")]
    for name in links:
        os.symlink(victim, tmp_path / name)
    fxs.save(nn.Linear(2, 2), tmp_path / "out")
    fxs.save(nn.Linear(2, 2), tmp_path / "out", force=True)
    assert sorted(os.listdir(victim)) == [MARKER, "a.txt", "sub"] and (victim / "sub" / "b.txt").read_text() == "precious too"
    assert sorted(e for e in os.listdir(tmp_path) if e.startswith(".")) == sorted(links)
    assert not os.path.islink(tmp_path / "out")


def test_only_a_marked_directory_with_a_trash_name_is_removed(tmp_path):
    # a directory named like our trash but without the marker _dispose writes first is someone else's
    theirs, ours = tmp_path / ".out.fxsurgery-trash-0123456789abcdef", tmp_path / ".out.fxsurgery-trash-00000000000000ff"
    for folder in (theirs, ours):
        folder.mkdir()
        (folder / "notes.txt").write_text("precious")
    (ours / MARKER).write_text(f"{os.getpid()} {socket.gethostname()}\n")  # a run killed while removing it
    complete = tmp_path / ".out.fxsurgery-trash-00000000000000aa"
    fxs.save(nn.Linear(2, 2), complete)  # a whole output, copied there by hand: it looks like one of ours, unmarked
    fxs.save(nn.Linear(2, 2), tmp_path / "out")
    assert sorted(e for e in os.listdir(tmp_path) if e.startswith(".")) == sorted([theirs.name, complete.name])
    assert (theirs / "notes.txt").read_text() == "precious"
    assert sorted(os.listdir(complete)) == ["graph.json", "model.py", "model.safetensors", "surgery.json"]


def test_a_tensor_name_with_control_characters_is_shown_escaped(tmp_path):
    # a name that is a terminal escape sequence reaches the error as text, not as an escape
    save_file({**STATE, "\x1b]0;owned\x07": torch.zeros(1)}, str(tmp_path / "w.safetensors"))
    refused(tmp_path / "w.safetensors", tmp_path, f"{tmp_path / 'w.safetensors'}: does not fit the model: unexpected 1 "
            "('\\x1b]0;owned\\x07'); fix: pass weights saved from this architecture")


def test_dcp_chunks_that_leave_part_of_a_tensor_uncovered_are_refused(tmp_path):
    # read as declared, the uncovered rows would be written as whatever memory held
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata
    folder = dcp_of(tmp_path / "ck")
    from torch.distributed.checkpoint import FileSystemReader
    metadata = FileSystemReader(str(folder)).read_metadata()
    metadata.state_dict_metadata["0.weight"].chunks = [ChunkStorageMetadata(offsets=torch.Size([0, 0]), sizes=torch.Size([8, 8]))]
    metadata.storage_meta = None
    (folder / ".metadata").write_bytes(pickle.dumps(metadata))
    for stream in (True, False):
        refused(folder, tmp_path, f"{folder}: the saved chunks of 0.weight do not cover it exactly once; fix: pass a complete "
                "checkpoint directory written by dcp.save", stream)


@pytest.mark.parametrize("chunks, tiled", [
    ([((0, 0), (8, 8)), ((8, 0), (8, 8))], True),            # two ranks' halves
    ([((0, 0), (8, 8)), ((4, 0), (8, 8))], False),           # overlapping, and rows 12.. uncovered
    ([((0, 0), (16, 8)), ((0, 0), (0, 8))], True),           # an empty chunk covers nothing
    ([((0, 0), (12, 8)), ((8, 0), (4, 8))], False),          # adds up to 16 rows, twice over rows 8..11
    ([((0, 0), (8, 8)), ((8, 0), (9, 8))], False),           # past the end
    ([((-1, 0), (17, 8))], False),
])
def test_dcp_chunks_must_tile_the_tensor(chunks, tiled):
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata

    from fxsurgery.transfer._dcp import _tiled
    made = [ChunkStorageMetadata(offsets=torch.Size(o), sizes=torch.Size(n)) for o, n in chunks]
    assert _tiled((16, 8), made) is tiled


@pytest.mark.parametrize("kind", ["directory", "file", "link"])
def test_a_streamed_cli_run_refuses_an_output_path_it_must_not_replace(tmp_path, kind):
    save_file(STATE, str(tmp_path / "w.safetensors"))
    (tmp_path / "m.py").write_text("import torch\nfrom torch import nn\n\ndef build():\n"
                                   "    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))\n")
    (tmp_path / "r.yaml").write_text('fxsurgery: 1\nrules:\n  - freeze: "0"\n')
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    out = tmp_path / "out"
    # a directory of the user's (not empty: an empty one takes an output)
    {"directory": lambda: (out.mkdir(), (out / "notes.txt").write_text("mine")), "file": lambda: out.write_text("mine"),
     "link": lambda: os.symlink(tmp_path / "mine", out)}[kind]()
    before = sorted(os.listdir(tmp_path))
    code, printed, err = cli("apply", f"{tmp_path / 'm.py'}:build", tmp_path / "r.yaml", "--input", "1x8", "--weights",
                             tmp_path / "w.safetensors", "--stream", "-o", out, "--force", "--max-shard-size", "100")
    why = (f"is a symbolic link (to {tmp_path / 'mine'}); fix: pass the directory it points to, or remove the link" if kind == "link"
           else "exists and is not an fxsurgery output, refusing to replace it; fix: choose another output directory")
    assert (code, printed, err) == (2, "", "fxsurgery: error: " + bounded(f"{out}: {why}") + "\n")
    assert sorted(os.listdir(tmp_path)) == before and (tmp_path / "mine" / "notes.txt").read_text() == "mine"


# -- a record that is no regular file, or huge -------------------------------------------------------------

_OVER_FORCE = ("import sys, torch, fxsurgery as fxs\nfrom torch import nn\ntorch.manual_seed(0)\n"
               "model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))\n"
               "try:\n    fxs.apply(model, [fxs.Freeze('0')], (torch.zeros(1, 8),)).save(sys.argv[1], force=True)\n"
               "except fxs.SaveError as exc:\n    print(exc)\n")


@pytest.mark.parametrize("kind", ["fifo", "dev-zero", "sparse"])
def test_a_record_that_is_a_fifo_a_device_or_huge_is_refused_not_read(tmp_path, kind):
    """surgery.json is read to tell an output fxsurgery wrote: a FIFO blocked --force for ever, a link to /dev/zero
    or a sparse 10 GB file was read whole into memory (fxs.load, inspect, --force and the cleanup of killed runs)."""
    out = tmp_path / "o"
    fxs.apply(build(), RULES, X).save(out)
    record = out / "surgery.json"
    record.unlink()
    if kind == "fifo":
        os.mkfifo(record)
    elif kind == "dev-zero":
        os.symlink("/dev/zero", record)
    else:
        with open(record, "wb") as handle:
            handle.truncate(10 << 30)
    before = sorted(os.listdir(out))
    proc = subprocess.run([sys.executable, "-c", _OVER_FORCE, str(out)], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert (proc.returncode, proc.stdout) == (0, f"{out}: exists and is not an fxsurgery output, refusing to replace it; fix: "
                                                  "choose another output directory\n"), proc.stderr
    assert sorted(os.listdir(out)) == before and sorted(os.listdir(tmp_path)) == ["o"]
    if kind == "sparse":  # a regular file: load reads the record itself, and says why it does not
        with pytest.raises(fxs.SaveError) as err:
            fxs.load(out)
        assert str(err.value) == (f"{record}: not valid JSON (10,737,418,240 bytes, more than the 256 MB a record holds); fix: "
                                  "write the directory again with save()")
