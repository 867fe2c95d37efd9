"""Several ranks writing one output: torchrun with two processes on this machine (gloo).

Each launch is compared with the same surgery in one process: every file of
the two output directories byte for byte, surgery.json included. A rank that
fails leaves nothing at the output path.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torchvision
from conftest import ROOT, RULES, cli, tensors_in
from test_stream import write_shards

import fxsurgery as fxs
from fxsurgery.export import check_target

transformers = pytest.importorskip("transformers")

TINY = ("import transformers\n\ndef build():\n    return transformers.LlamaForCausalLM(transformers.LlamaConfig("
        "vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, "
        "num_key_value_heads=2, max_position_embeddings=64)).eval()\n")
DROP = "fxsurgery: 1\nrules:\n  - layers: model.layers\n    order: [0, 2, 3]\n  - freeze: model.embed_tokens\n"


def torchrun(*args, script=None, cwd=None):
    """`python -m torch.distributed.run --nproc-per-node 2 -m fxsurgery ARGS` (or a script): (status, output)."""
    run = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    run += [script] if script else ["-m", "fxsurgery"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.path.join(ROOT, "tests")}
    proc = subprocess.run(run + [str(a) for a in args], capture_output=True, text=True, cwd=cwd, env=env, timeout=600)
    return proc.returncode, proc.stdout + proc.stderr


def same_files(a, b) -> list[str]:
    names = sorted(os.listdir(a))
    assert sorted(os.listdir(b)) == names
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    return names


def llama_checkpoint(folder):
    (folder / "tiny.py").write_text(TINY)
    (folder / "drop.yaml").write_text(DROP)
    torch.manual_seed(0)
    with torch.device("cpu"):
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64)).eval()
    (folder / "ck").mkdir()
    return model, write_shards(model.state_dict(), folder / "ck", parts=4)


def test_two_ranks_write_the_one_process_output_byte_for_byte(tmp_path):
    model, index = llama_checkpoint(tmp_path)
    args = ["apply", "tiny.py:build", "drop.yaml", "--input", "1x8:int64", "--weights", index, "--stream",
            "--max-shard-size", "40KB", "--quiet"]
    code, out = torchrun(*args, "-o", tmp_path / "two", cwd=tmp_path)
    assert code == 0, out
    assert "rank 1 of 2: shards written; rank 0 completes " + str(tmp_path / "two") + "/\n" in out
    here = os.getcwd()
    os.chdir(tmp_path)
    try:
        code, _, err = cli(*args, "-o", tmp_path / "one")
    finally:
        os.chdir(here)
    assert code == 0, err
    names = same_files(tmp_path / "one", tmp_path / "two")
    # 3 layers of nine tensors, the embedding, the final norm and lm_head in 40 kB shards: 17 of them
    assert names == ["config.json", "generation_config.json", *[f"model-{k:05d}-of-00017.safetensors" for k in range(1, 18)],
                     "model.safetensors.index.json", "surgery.json"]
    assert not [e for e in os.listdir(tmp_path) if e.startswith(".")]  # every rank's temporary directory is gone
    got = tensors_in(tmp_path / "two")
    assert torch.equal(got["model.layers.1.mlp.up_proj.weight"], model.model.layers[2].mlp.up_proj.weight)
    assert len(got) == 3 * 9 + 3


def test_two_ranks_write_a_regenerated_module_as_one_process(tmp_path):
    model = torchvision.models.resnet18().eval()
    index = write_shards(model.state_dict(), tmp_path, parts=4)
    args = ["apply", "torchvision.models:resnet18", os.path.join(RULES, "classifier-head.yaml"), "--input", "1x3x64x64",
            "--weights", index, "--stream", "--max-shard-size", "8MB", "--quiet", "--seed", "7"]
    code, out = torchrun(*args, "-o", tmp_path / "two", cwd=tmp_path)
    assert code == 0, out
    code, _, err = cli(*args, "-o", tmp_path / "one")  # the new head's initial values from the same seed
    assert code == 0, err
    names = same_files(tmp_path / "one", tmp_path / "two")
    assert [n for n in names if n.startswith("model-")] == [f"model-{k:05d}-of-00009.safetensors" for k in range(1, 10)]
    assert {"model.py", "graph.json", "surgery.json", "model.safetensors.index.json"} < set(names)
    x = torch.randn(1, 3, 64, 64)
    got = tensors_in(tmp_path / "two")
    model.fc = torch.nn.Identity()
    with torch.no_grad():
        assert torch.equal(fxs.load(tmp_path / "two").eval()(x), torch.nn.functional.linear(model(x), got["fc.weight"], got["fc.bias"]))


def test_a_failing_rank_leaves_nothing_at_the_output(tmp_path):
    model, index = llama_checkpoint(tmp_path)
    # rank 1 cannot read its tensors (a disk error): it fails while rank 0 writes its shards
    (tmp_path / "broken.py").write_text(
        "import errno, importlib, os, sys\nstream = importlib.import_module('fxsurgery.transfer._stream')\n"
        "def broken(*args):\n    raise OSError(errno.EIO, 'Input/output error')\n"
        "if os.environ['RANK'] == '1':\n    stream.read_block = broken\n"
        "from fxsurgery.cli import main\nsys.exit(main())\n")
    args = ["apply", "tiny.py:build", "drop.yaml", "--input", "1x8:int64", "--weights", index, "--stream",
            "--max-shard-size", "40KB", "--quiet", "-o", "out"]
    code, out = torchrun(*args, script="broken.py", cwd=tmp_path)
    assert code != 0
    assert "fxsurgery: error: out: cannot write: Input/output error; fix: choose a writable output directory\n" in out
    assert not (tmp_path / "out").exists()
    left = [e for e in os.listdir(tmp_path) if e.startswith(".")]
    # rank 1 removed its own directory; rank 0, killed by torchrun (it does not stop in a wait), may leave its
    # unfinished one, hidden and marked, as any killed run does
    assert all(e.startswith(".out.fxsurgery-tmp-") and os.path.exists(tmp_path / e / ".fxsurgery-partial") for e in left)
    check_target(tmp_path / "out", force=False)  # what the next run does first
    assert [e for e in os.listdir(tmp_path) if e.startswith(".")] == []
