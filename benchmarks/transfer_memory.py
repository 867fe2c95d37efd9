"""Benchmark 3: the transfer stage against the hand-written ways of copying a model.

Variants, each in a fresh subprocess so that peak memory does not mix:
- `deepcopy`: copy.deepcopy(model);
- `load_state_dict`: the destination built on the meta device, to_empty(), load_state_dict(sd);
- `load_state_dict_assign`: the destination built on the meta device, load_state_dict(sd, assign=True);
- `fxs_copy`: fxsurgery's transfer stage (copy mode) after an empty surgery; its copies are lazy
  (copy-on-write), so this is the surgery's own cost and memory;
- `fxs_copy_written`: the same, then a writable pointer asked of every tensor (what a first
  optimizer step does to a trained tensor): each lazy copy then copies its bytes, so this is
  the cost of copies that are all used;
- `fxs_share`: the transfer stage in share mode, where the package has one;
- `fxs_apply`: the whole of fxs.apply(model, []) (peak memory of the pipeline; time not compared);
- `fxs_stream`: the model built inside fxs.empty_weights() and filled from a sharded
  safetensors checkpoint (4 shards) by fxs.apply(..., weights=index): the large-model path.
Peak RSS is the step's own high-water mark (/proc/self/clear_refs resets
VmHWM just before it), less the process's RSS before the model was built,
over the bytes of the model's tensors: 2.0 is "the original and one copy".
"""

from __future__ import annotations

import argparse
import copy
import gc
import inspect
import json
import os
import shutil
import subprocess
import sys
import time

VARIANTS = ("deepcopy", "load_state_dict", "load_state_dict_assign", "fxs_copy", "fxs_copy_written", "fxs_share", "fxs_apply",
            "fxs_stream")
GOALS = {"copy_over_load_state_dict_max": 1.1, "written_copy_over_load_state_dict_max": 1.1, "share_over_assign_max": 1.1,
         "copy_peak_over_model_max": 2.1, "share_peak_over_model_max": 1.1}


def _status(field: str) -> int:
    """A VmRSS/VmHWM line of /proc/self/status, in bytes (0 where there is no /proc)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _reset_peak() -> bool:
    """Start VmHWM again from the current RSS (Linux: write 5 to clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def share_mode() -> dict | None:
    """How to ask the transfer stage to share tensors, if it can (a feature another change may add)."""
    import importlib

    stage = importlib.import_module("fxsurgery.transfer")
    params = inspect.signature(stage.transfer).parameters
    if "copy" in params:
        return {"copy": False}
    if "mode" in params:
        return {"mode": "share"}
    if "share" in params:
        return {"share": True}
    return None


SYNTHETIC = "synthetic2g"  # 8 x Linear(8192, 8192): 2.15 GB of float32


def _build(name: str):
    if name == SYNTHETIC:
        from torch import nn
        return nn.Sequential(*[nn.Linear(8192, 8192) for _ in range(8)]).eval()
    from torchvision.models import get_model

    return get_model(name, weights=None).eval()


def _inputs(name: str, size: int):
    import torch
    return (torch.randn(1, 8192),) if name == SYNTHETIC else (torch.randn(1, 3, size, size),)


LARGEST_SHARD = [0]  # bytes of the largest shard _shard wrote in this process
FOLDERS: list[str] = []  # what _shard wrote, removed when the child is done


def _shard(model, parts: int = 4) -> str:
    """The model's weights as a sharded safetensors checkpoint with an index, in a temporary folder."""
    import tempfile

    from safetensors.torch import save_file
    folder = tempfile.mkdtemp(prefix="fxs-bench-")
    FOLDERS.append(folder)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    names, weight_map = list(state), {}
    for i in range(parts):
        file = f"model-{i + 1:05d}-of-{parts:05d}.safetensors"
        save_file({k: state[k] for k in names[i::parts]}, os.path.join(folder, file))
        weight_map.update({k: file for k in names[i::parts]})
        shard = sum(state[k].numel() * state[k].element_size() for k in names[i::parts])
        LARGEST_SHARD[0] = max(LARGEST_SHARD[0], shard)
    index = os.path.join(folder, "model.safetensors.index.json")
    with open(index, "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    return index


def _step(variant: str, name: str, model, inputs):
    """(the callable to time and measure, a description of the recipe), with its setup done untimed."""
    import torch

    import fxsurgery as fxs
    from fxsurgery.transfer import transfer

    from .recipe import prepared

    if variant == "deepcopy":
        return (lambda: copy.deepcopy(model)), "copy.deepcopy(model)"
    if variant in ("load_state_dict", "load_state_dict_assign"):
        sd = model.state_dict()
        assign = variant.endswith("assign")

        def load():
            with torch.device("meta"):
                new = _build(name)
            if not assign:
                new.to_empty(device="cpu")
            new.load_state_dict(sd, assign=assign)
            return new
        return load, f"meta-device build, {'load_state_dict(sd, assign=True)' if assign else 'to_empty + load_state_dict(sd)'}"
    if variant == "fxs_apply":
        return (lambda: fxs.apply(model, [], example_inputs=inputs).module), "fxs.apply(model, [])"
    if variant == "fxs_stream":
        index = _shard(model)

        def stream():
            with fxs.empty_weights():
                empty = _build(name)
            return fxs.apply(empty, [], example_inputs=inputs, weights=index).module
        return stream, "fxs.empty_weights() build, fxs.apply(model, [], weights=<4-shard index.json>)"
    kwargs = {} if variant.startswith("fxs_copy") else share_mode()
    rewritten = prepared(model, [], inputs)
    if variant == "fxs_copy_written":
        def written():
            made = transfer(rewritten)[0]
            for t in made.state_dict().values():
                t.data_ptr()  # a writable pointer: a lazy copy copies its bytes here
            return made
        return written, "fxsurgery.transfer.transfer(rewritten), then data_ptr() of every tensor (its first write)"
    return (lambda: transfer(rewritten, **kwargs)[0]), f"fxsurgery.transfer.transfer(rewritten, **{kwargs})"


def child(variant: str, name: str, size: int) -> dict:
    """Run one variant once in this process and measure it."""
    import torch
    import torchvision.models  # noqa: F401  (libraries loaded before the baseline: not the model's cost)


    gc.collect()
    base_rss = _status("VmRSS")
    torch.manual_seed(0)
    model = _build(name)
    tensors = list(model.parameters()) + list(model.buffers())
    model_bytes = sum(t.numel() * t.element_size() for t in tensors)
    inputs = _inputs(name, size)
    step, recipe = _step(variant, name, model, inputs)
    if variant == "fxs_stream":  # the weights are on disk now: the original is not in memory on this path
        del model, tensors
        gc.collect()
    gc.collect()
    before = _status("VmRSS")
    reset = _reset_peak()
    t0 = time.perf_counter()
    made = step()
    seconds = time.perf_counter() - t0
    peak = _status("VmHWM")
    for folder in FOLDERS:  # gigabytes of shards: left behind, they crowd the page cache of later runs
        shutil.rmtree(folder, ignore_errors=True)
    first_new = next(iter(made.parameters()))
    shares = variant != "fxs_stream" and first_new.data_ptr() == tensors[0].data_ptr()
    return {"variant": variant, "recipe": recipe, "seconds": seconds, "model_bytes": model_bytes,
            "largest_shard_bytes": LARGEST_SHARD[0],
            "rss_base": base_rss, "rss_before_step": before, "peak_rss": peak, "peak_reset": reset,
            "peak_over_model": (peak - base_rss) / model_bytes,
            "step_extra_over_model": (peak - before) / model_bytes,
            "shares_storage": shares}


def _spawn(variant: str, name: str, size: int, threads: int) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.transfer_memory", "--child", variant, "--model", name,
           "--size", str(size), "--threads", str(threads)]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=root)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        return {"variant": variant, "error": tail}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run(quick: bool = False, repeats: int | None = None, model: str | None = None, threads: int = 1) -> dict:
    import statistics

    from .common import log

    name = model or ("vit_b_16" if quick else "vit_l_16")
    repeats = repeats or (1 if quick else 3)
    variants = [v for v in VARIANTS if v != "fxs_share" or share_mode() is not None]
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    for r in range(repeats):  # rounds, each starting one variant further along
        for i in range(len(variants)):
            v = variants[(i + r) % len(variants)]
            out = _spawn(v, name, 224, threads)
            runs[v].append(out)
            log(f"transfer {name} {v}: " + (f"{out['seconds']:.2f}s peak {out['peak_over_model']:.2f}x model"
                                              if "error" not in out else f"FAILED {out['error']}"))
    rows = {}
    for v, outs in runs.items():
        good = [o for o in outs if "error" not in o]
        if not good:
            rows[v] = {"error": outs[0]["error"]}
            continue
        rows[v] = {"recipe": good[0]["recipe"], "repeats": len(good),
                   "seconds": statistics.median(o["seconds"] for o in good),
                   "peak_over_model": statistics.median(o["peak_over_model"] for o in good),
                   "step_extra_over_model": statistics.median(o["step_extra_over_model"] for o in good),
                   "shares_storage": good[0]["shares_storage"], "peak_reset": good[0]["peak_reset"],
                   "model_bytes": good[0]["model_bytes"], "largest_shard_bytes": good[0].get("largest_shard_bytes", 0),
                   "all_seconds": [o["seconds"] for o in good]}

    def over(a, b):
        return rows[a]["seconds"] / rows[b]["seconds"] if "seconds" in rows.get(a, {}) and "seconds" in rows.get(b, {}) else None

    return {"benchmark": "transfer", "goal": GOALS, "model": name, "input": list(_inputs(name, 224)[0].shape),
            "share_mode": share_mode() is not None and "supported" or "absent: fxs_share skipped",
            "variants": rows,
            "summary": {"copy_over_load_state_dict": over("fxs_copy", "load_state_dict"),
                        "written_copy_over_load_state_dict": over("fxs_copy_written", "load_state_dict"),
                        "written_copy_peak_over_model": rows.get("fxs_copy_written", {}).get("peak_over_model"),
                        "share_over_assign": over("fxs_share", "load_state_dict_assign"),
                        "deepcopy_over_load_state_dict": over("deepcopy", "load_state_dict"),
                        "copy_peak_over_model": rows.get("fxs_copy", {}).get("peak_over_model"),
                        "share_peak_over_model": rows.get("fxs_share", {}).get("peak_over_model"),
                        "apply_peak_over_model": rows.get("fxs_apply", {}).get("peak_over_model"),
                        "stream_peak_over_model": rows.get("fxs_stream", {}).get("peak_over_model"),
                        # the goal: the model's size plus its largest shard plus 10%
                        "stream_limit_over_model": (1.1 + rows["fxs_stream"]["largest_shard_bytes"] / rows["fxs_stream"]["model_bytes"]
                                                    if "seconds" in rows.get("fxs_stream", {}) else None)}}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="one transfer variant in this process (used by benchmarks.run)")
    p.add_argument("--child", choices=VARIANTS, required=True)
    p.add_argument("--model", default="vit_l_16")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    import warnings

    import torch
    warnings.simplefilter("ignore")
    torch.set_num_threads(a.threads)
    print(json.dumps(child(a.child, a.model, a.size)))


if __name__ == "__main__":
    main()
