"""`--format dcp`: the weights as a torch.distributed.checkpoint directory beside model.py.

Written by `dcp.save` without a process group (`no_dist=True`) into
`model.dcp/`, read back through `dcp.load` and compared bit for bit, like
every other format is verified before it is listed.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
from torch import nn

from ..errors import SaveError

DIRECTORY = "model.dcp"


def write_dcp(module: nn.Module, work: Path) -> dict:
    import torch.distributed.checkpoint as dcp
    state = {k: v.detach() for k, v in module.state_dict().items()}
    if any(t.is_meta for t in state.values()):
        raise SaveError("dcp: a streamed result holds no weights in memory to write; fix: leave --format dcp out, "
                        "or apply without --stream")
    path = work / DIRECTORY
    back = {k: torch.empty_like(v) for k, v in state.items()}
    with warnings.catch_warnings():  # "assuming the intent is to save in a single process": it is
        warnings.simplefilter("ignore", UserWarning)
        dcp.save(state, storage_writer=dcp.FileSystemWriter(str(path)), no_dist=True)
        dcp.load(back, storage_reader=dcp.FileSystemReader(str(path)), no_dist=True)
    differ = [k for k in state if not torch.equal(back[k], state[k])]
    if differ:
        raise SaveError(f"dcp: {differ[0]} reads back different from what was written; fix: save without --format dcp")
    for entry in os.scandir(path):  # the output is fsynced file by file; this directory's files too
        if entry.is_file():
            with open(entry.path, "rb") as handle:
                os.fsync(handle.fileno())
    return {"file": DIRECTORY, "tensors": len(state), "max_abs_diff": 0.0}
