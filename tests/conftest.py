"""Shared models and helpers: small hand-written modules and real torchvision models."""

import contextlib
import io
import json
import os
import subprocess
import sys

import pytest
import torch
import torchvision
from torch import nn

from fxsurgery.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RULES = os.path.join(ROOT, "rules")


sys.path.insert(0, os.path.join(ROOT, "examples"))
from walkthrough import M3 as Three  # noqa: E402
from walkthrough import M as Two  # noqa: E402  (the walkthrough's models)


@pytest.fixture
def two():
    torch.manual_seed(0)
    return Two()


@pytest.fixture
def three():
    torch.manual_seed(0)
    return Three()


@pytest.fixture
def resnet18():
    torch.manual_seed(0)
    return torchvision.models.resnet18(weights=None)


def state_copy(model: nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_state_equal(model: nn.Module, saved: dict) -> None:
    state = model.state_dict()
    assert state.keys() == saved.keys()
    for k, v in saved.items():
        assert torch.equal(state[k], v), k


def cli(*args):
    """Run the CLI in-process: (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in args])
    return code, out.getvalue(), err.getvalue()


def cli_process(*args, cwd=None):
    """Run the CLI as a separate process, as a user would."""
    proc = subprocess.run([sys.executable, "-m", "fxsurgery.cli", *map(str, args)],
                          capture_output=True, text=True, cwd=cwd or ROOT)
    return proc.returncode, proc.stdout, proc.stderr


def rehash(directory) -> None:
    """Make surgery.json's hash match the files and the record again, as someone who replaced them would."""
    from pathlib import Path

    from fxsurgery.export._record import digest
    directory = Path(directory)
    record = json.loads((directory / "surgery.json").read_text())
    record["hash"] = digest(directory, record)
    (directory / "surgery.json").write_text(json.dumps(record))


def tensors_in(directory) -> dict:
    """Every tensor of the .safetensors files in a directory (one file or shards), by name."""
    from safetensors.torch import load_file
    out = {}
    for name in sorted(os.listdir(directory)):
        if name.endswith(".safetensors"):
            out.update(load_file(os.path.join(directory, name)))
    return out
