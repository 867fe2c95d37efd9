"""A process that saves models in forked children and kills them: `python killsave.py`, one JSON request a line.

torch is imported once; each save runs in a fresh fork, so a kill costs no
start-up. Requests:

  {"op": "build", "name": "old", "mb": 64, "seed": 1}      a Sequential of Linear(512, 512) layers
  {"op": "save", "name": "old", "path": P, "force": true,
   "delay": 0.3,           SIGKILL the child this many seconds after the fork, or
   "kill_at": 7,           the child kills itself before its 7th file-system call,
   "exchange": false}      the child cannot swap paths in one step (two renames instead)

Each answer is one JSON line: {"killed": bool, "calls": file-system calls made, "seconds": wall time}.
"""

import json
import os
import signal
import sys
import time

import torch
from torch import nn

torch.set_num_threads(1)  # the children fork from this process: no thread pool to inherit

import fxsurgery as fxs  # noqa: E402
import fxsurgery.export._atomic as atomic  # noqa: E402

CALLS = [(os, "rename"), (os, "unlink"), (os, "rmdir"), (os, "mkdir"), (os, "fsync"), (atomic, "_exchange")]
models = {}


def build(mb: float, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    layers = max(1, round(mb * 2**20 / (512 * 513 * 4)))
    return nn.Sequential(*[nn.Linear(512, 512) for _ in range(layers)])


def child(request: dict, report: int) -> None:
    count = [0]
    if not request.get("exchange", True):
        atomic._exchange = lambda a, b: False
    for owner, name in CALLS:
        real = getattr(owner, name)

        def counted(*args, _real=real, **kwargs):
            count[0] += 1
            if count[0] == request.get("kill_at"):
                os.kill(os.getpid(), signal.SIGKILL)
            return _real(*args, **kwargs)
        setattr(owner, name, counted)
    fxs.save(models[request["name"]], request["path"], force=request.get("force", False))
    os.write(report, str(count[0]).encode())
    os._exit(0)


def save(request: dict) -> dict:
    read, write = os.pipe()
    start = time.perf_counter()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        try:
            child(request, write)
        finally:
            os._exit(1)
    os.close(write)
    if request.get("delay") is not None:
        time.sleep(request["delay"])
        os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    calls = os.read(read, 64)
    os.close(read)
    return {"killed": os.WIFSIGNALED(status), "exit": os.waitstatus_to_exitcode(status),
            "calls": int(calls) if calls else None, "seconds": time.perf_counter() - start}


for line in sys.stdin:
    request = json.loads(line)
    if request["op"] == "build":
        models[request["name"]] = build(request["mb"], request["seed"])
        answer = {"ok": True}
    else:
        answer = save(request)
    print(json.dumps(answer), flush=True)
