"""Benchmark: large models. Sharded save and load, streamed surgery memory, a 70B plan on meta.

- `save`: `result.save(DIR, max_shard_size=...)` of a 1.48 GB `nn.Sequential`
  (model.py + graph.json generated, every shard hashed and fsynced) against `safetensors.torch.save_file` of the same tensors
  (one file) and `safetensors.torch.save_model`, and against `save_model` then an fsync of its file (the same bytes
  made durable, as `result.save` makes them); rounds interleaved, median ratio. Each save starts once the disk has
  taken what the one before wrote (`os.sync()`, not timed): a save that stops in the page cache would otherwise leave
  its writing to the next.
- `load`: `fxs.load(DIR)` (graph.json rebuilt, hash checked) against
  `safetensors.torch.load_file` + the module built on meta and `load_state_dict(assign=True)`.
- `stream`: a Llama-style transformers model (a few hundred MB, float32)
  written as a sharded checkpoint shard by shard; in a fresh process built in
  `fxs.empty_weights()`, two layers deleted and the embedding frozen, streamed
  into 100 MB output shards. Peak RSS (VmHWM) against the process's RSS after
  imports and the meta build, and against the model's bytes; the in-memory
  `weights=` path beside it.
- `big`: the same surgery on a ~6 GB float32 Llama-style model (1.47B
  parameters) in six 1 GB shards, as the CLI command with 1 GB output shards:
  against copying the checkpoint's files, as two ranks against one, and its
  peak RSS in a fresh process (not in `--quick`).
- `plan`: a Llama 70B configuration built on meta and planned (stream=True, no
  weights): seconds and peak RSS over imports.
- `ranks`: the `stream` surgery as the CLI command, in one process and as two
  torchrun ranks (`--nproc-per-node 2`, gloo), each whole command timed (imports
  and the plan, which every rank makes, included); the two outputs compared
  byte for byte. The save's profile (`sharded_save_profile_seconds`) says where
  a sharded save's time goes.

    python -m benchmarks.large_models --out benchmarks/results [--quick] [--only save_load,ranks]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from .common import machine


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def _sequential(width: int, depth: int):
    from torch import nn
    return nn.Sequential(*[nn.Linear(width, width) for _ in range(depth)]).eval()


def save_and_load(rounds: int, width: int, depth: int, folder: str) -> dict:
    import cProfile
    import pstats

    import torch
    from safetensors.torch import load_file, save_file, save_model

    import fxsurgery as fxs
    torch.manual_seed(0)
    model = _sequential(width, depth)
    result = fxs.apply(model, [], example_inputs=(torch.randn(1, width),))
    state = {k: v.contiguous() for k, v in result.module.state_dict().items()}
    size = sum(t.numel() * t.element_size() for t in state.values())
    shard = max(size // 4, 1)
    times: dict[str, list[float]] = {k: [] for k in ("fxs_save", "fxs_save_one", "save_file", "save_model", "save_model_durable",
                                                     "fxs_load", "load_file")}

    def durable(path):
        save_model(result.module, path)
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def timed(key, fn):
        os.sync()  # the writing of the step before is not this step's
        start = time.perf_counter()
        fn()
        times[key].append(time.perf_counter() - start)

    for r in range(rounds):
        out = os.path.join(folder, f"r{r}")
        steps = [("save_file", lambda out=out: save_file(state, out + ".safetensors", metadata={"format": "pt"})),
                 ("save_model", lambda out=out: save_model(result.module, out + "-m.safetensors")),
                 ("save_model_durable", lambda out=out: durable(out + "-d.safetensors")),
                 ("fxs_save", lambda out=out: result.save(out, max_shard_size=shard)),
                 ("fxs_save_one", lambda out=out: result.save(out + "-one"))]
        for key, fn in steps[r % len(steps):] + steps[:r % len(steps)]:
            timed(key, fn)

        def baseline(out=out):
            with torch.device("meta"):
                m = _sequential(width, depth)
            m.load_state_dict(load_file(out + ".safetensors"), assign=True)
        loads = [("load_file", baseline), ("fxs_load", lambda out=out: fxs.load(out))]
        for key, fn in loads[r % 2:] + loads[:r % 2]:
            timed(key, fn)
        for path in (out, out + "-one"):  # a round writes four times the model: keep the disk free
            shutil.rmtree(path)
        for path in (out + ".safetensors", out + "-m.safetensors", out + "-d.safetensors"):
            os.unlink(path)
    profiler = cProfile.Profile()  # where a sharded save's time goes
    profiler.runcall(result.save, os.path.join(folder, "profiled"), max_shard_size=shard)
    shutil.rmtree(os.path.join(folder, "profiled"))
    median = {k: statistics.median(v) for k, v in times.items()}
    best = {k: min(v) for k, v in times.items()}  # on a shared machine the fastest round is the least disturbed
    return {"model_bytes": size, "max_shard_size": shard, "rounds": rounds, "seconds": median, "best_seconds": best,
            "all_seconds": times,  # the disk's pace varies from round to round: every round, to see the spread
            "best_sharded_over_save_model": best["fxs_save"] / best["save_model"],
            "best_one_over_save_model": best["fxs_save_one"] / best["save_model"],
            "best_sharded_over_durable_save_model": best["fxs_save"] / best["save_model_durable"],
            "best_one_over_durable_save_model": best["fxs_save_one"] / best["save_model_durable"],
            "save_one_over_durable_save_model": median["fxs_save_one"] / median["save_model_durable"],
            "best_sharded_over_save_file": best["fxs_save"] / best["save_file"],
            "best_one_over_save_file": best["fxs_save_one"] / best["save_file"],
            "save_sharded_over_save_file": median["fxs_save"] / median["save_file"],
            "save_sharded_over_save_model": median["fxs_save"] / median["save_model"],
            "save_one_over_save_file": median["fxs_save_one"] / median["save_file"],
            "save_one_over_save_model": median["fxs_save_one"] / median["save_model"],
            "load_over_load_file": median["fxs_load"] / median["load_file"],
            "sharded_save_profile_seconds": _where(pstats.Stats(profiler))}


_WHERE = {"write the bytes (FileIO.write)": "<method 'write' of '_io.FileIO' objects>",
          "wait for the hashing and fsync threads": "<method 'acquire' of '_thread.lock' objects>",
          "fsync": "<built-in method posix.fsync>",
          "model.py and graph.json (_source)": "_source"}


def _where(stats) -> dict:
    """Seconds of a profiled save in the calls that matter (cumulative; the hashing runs in a thread beside the writes)."""
    found = {"total": stats.total_tt}
    for what, name in _WHERE.items():
        found[what] = sum(v[3] for k, v in stats.stats.items() if k[2] == name)
    return found


LLAMA = dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
             num_key_value_heads=4, max_position_embeddings=256)
# the issue's ~6 GB model: 1.47B parameters, float32, written in 6 shards of about 1 GB
LLAMA_6GB = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=26, num_attention_heads=16,
                 num_key_value_heads=16, max_position_embeddings=256)
CONFIGS = {"LLAMA": "LLAMA", "LLAMA_6GB": "LLAMA_6GB"}
LLAMA_70B = dict(vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                 num_key_value_heads=8, max_position_embeddings=8192)


def write_checkpoint(folder: str, parts: int, config: dict) -> tuple[str, int]:
    """A random checkpoint of the Llama-style model, written shard by shard (never whole in memory)."""
    import torch
    import transformers
    from safetensors.torch import save_file

    import fxsurgery as fxs
    with fxs.empty_weights():
        meta = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config))
    shapes = {k: (tuple(v.shape), v.dtype) for k, v in meta.state_dict(keep_vars=True).items()}
    names = list(shapes)
    weight_map, generator = {}, torch.Generator().manual_seed(0)
    for k in range(parts):
        file = f"model-{k + 1:05d}-of-{parts:05d}.safetensors"
        chunk = names[k::parts]
        save_file({n: torch.randn(shapes[n][0], generator=generator).to(shapes[n][1]) * 0.02 for n in chunk},
                  os.path.join(folder, file))
        weight_map.update({n: file for n in chunk})
    index = os.path.join(folder, "model.safetensors.index.json")
    with open(index, "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    return index, sum(torch.Size(s).numel() * torch.empty(0, dtype=d).element_size() for s, d in shapes.values())


def child(kind: str, index: str, out: str, config_name: str = "LLAMA", shard: str = "100MB") -> dict:
    """One surgery in this fresh process: its peak RSS above the RSS after imports and the meta build."""
    import torch
    import transformers

    import fxsurgery as fxs
    config = transformers.LlamaConfig(**(LLAMA_70B if kind == "plan" else globals()[CONFIGS[config_name]]))
    with fxs.empty_weights():
        model = transformers.LlamaForCausalLM(config).eval()
    layers = config.num_hidden_layers
    rules = [fxs.Layers("model.layers", order=[i for i in range(layers) if i not in (2, layers - 3)]),
             fxs.Freeze("model.embed_tokens")]
    base = _status("VmRSS")
    start = time.perf_counter()
    ids = (torch.zeros(1, 8, dtype=torch.long),)
    if kind == "plan":
        result = fxs.apply(model, rules, ids, stream=True)
    else:
        result = fxs.apply(model, rules, ids, weights=index, stream=kind == "stream")
        result.save(out, max_shard_size=shard)
    seconds = time.perf_counter() - start
    return {"kind": kind, "seconds": seconds, "rss_after_imports": base, "peak": _status("VmHWM"),
            "entries": len(result.report.entries)}


def _in_child(kind: str, index: str, out: str, config_name: str = "LLAMA", shard: str = "100MB") -> dict:
    proc = subprocess.run([sys.executable, "-m", "benchmarks.large_models", "--child", kind, "--index", index, "--out", out,
                           "--config", config_name, "--shard", shard],
                          capture_output=True, text=True, check=True, cwd=os.path.dirname(os.path.dirname(__file__)))
    return json.loads(proc.stdout.strip().splitlines()[-1])


BUILD = """import transformers

from benchmarks import large_models


def llama():
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**large_models.{name})).eval()
"""


def _rules(layers: int) -> str:
    """Layers 2 and layers-3 deleted, the embedding frozen (as `child` does)."""
    order = [i for i in range(layers) if i not in (2, layers - 3)]
    return f"fxsurgery: 1\nrules:\n  - layers: model.layers\n    order: {order}\n  - freeze: model.embed_tokens\n"


def _copy_files(index: str, into: str) -> None:
    """The baseline of the ~6 GB run: copy the checkpoint's files (the index and its shards)."""
    os.makedirs(into)
    source = os.path.dirname(index)
    with open(index) as f:
        files = sorted(set(json.load(f)["weight_map"].values()))
    for name in [os.path.basename(index), *files]:
        shutil.copyfile(os.path.join(source, name), os.path.join(into, name))


def ranks(index: str, folder: str, rounds: int, config_name: str = "LLAMA", shard: str = "100MB",
          copy: bool = False) -> dict:
    """The CLI's streamed surgery as one process and as two torchrun ranks: wall time of each whole
    command; with `copy`, copying the checkpoint's files timed beside them in each round."""
    with open(os.path.join(folder, "llama_build.py"), "w") as f:
        f.write(BUILD.format(name=CONFIGS[config_name]))
    with open(os.path.join(folder, "drop.yaml"), "w") as f:
        f.write(_rules(globals()[CONFIGS[config_name]]["num_hidden_layers"]))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": root, "OMP_NUM_THREADS": "1"}  # torchrun gives each rank one thread: so does the one process
    apply = ["-m", "fxsurgery", "apply", "llama_build.py:llama", "drop.yaml", "--input", "1x8:int64", "--weights", index,
             "--stream", "--max-shard-size", shard, "--quiet", "--json", "--profile"]
    logs = os.path.join(folder, "rank-logs")
    commands = {"one": [sys.executable, *apply], "two": [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                          "--nproc-per-node", "2", "--log-dir", logs, "--redirects", "1", *apply]}
    times: dict[str, list[float]] = {k: [] for k in [*commands, *(["copy"] if copy else [])]}
    saves: dict[str, list[float]] = {k: [] for k in commands}
    for r in range(rounds):
        if copy:
            start = time.perf_counter()
            _copy_files(index, os.path.join(folder, "copied"))
            times["copy"].append(time.perf_counter() - start)
            shutil.rmtree(os.path.join(folder, "copied"))
        for key in (("one", "two") if r % 2 == 0 else ("two", "one")):
            out = os.path.join(folder, f"ranks-{key}")
            shutil.rmtree(logs, ignore_errors=True)
            start = time.perf_counter()
            done = subprocess.run([*commands[key], "-o", out], check=True, capture_output=True, text=True, cwd=folder, env=env)
            times[key].append(time.perf_counter() - start)
            text = done.stdout if key == "one" else _rank_zero_stdout(logs)
            saves[key].append(json.loads(text)["profile"]["save"])  # rank 0's save: its shards, the barrier, the rest
        files = sorted(os.listdir(os.path.join(folder, "ranks-one")))
        same = files == sorted(os.listdir(os.path.join(folder, "ranks-two"))) and all(
            _same(os.path.join(folder, "ranks-one", f), os.path.join(folder, "ranks-two", f)) for f in files)
        for key in commands:
            shutil.rmtree(os.path.join(folder, f"ranks-{key}"))
    median = {k: statistics.median(v) for k, v in times.items()}
    save = {k: statistics.median(v) for k, v in saves.items()}
    return {"rounds": rounds, "seconds": median, "save_seconds": save, "all_seconds": times, "all_save_seconds": saves,
            "two_ranks_over_one": median["two"] / median["one"],
            **({"one_over_copy": median["one"] / median["copy"]} if copy else {}),
            "save_two_ranks_over_one": save["two"] / save["one"], "byte_identical": same, "output_files": len(files)}


def _rank_zero_stdout(logs: str) -> str:
    """Rank 0's stdout, which torchrun wrote under --log-dir (its layout varies between versions: searched)."""
    for parent, _, names in os.walk(logs):
        if os.path.basename(parent) == "0" and "stdout.log" in names:
            with open(os.path.join(parent, "stdout.log")) as f:
                return f.read()
    raise FileNotFoundError(f"no rank 0 stdout.log under {logs}")


def _same(a: str, b: str) -> bool:
    with open(a, "rb") as x, open(b, "rb") as y:
        return all(p == q for p, q in zip(iter(lambda: x.read(1 << 24), b""), iter(lambda: y.read(1 << 24), b""))) \
            and os.path.getsize(a) == os.path.getsize(b)


def run(quick: bool = False) -> dict:
    folder = tempfile.mkdtemp(prefix="fxs-large-")
    try:
        width, depth = (1024, 4) if quick else (4096, 22)  # 1.48 GB of float32 in the full run
        figures = {"save_load": save_and_load(1 if quick else 5, width, depth, folder)}
        index, size = write_checkpoint(folder, 6, LLAMA)
        figures["ranks"] = ranks(index, folder, 1 if quick else 3)
        if not quick:  # about 6 GB of checkpoint, and three times that on disk while it runs
            figures["big"] = big(folder, 2)
        for kind in ("stream", "memory", "plan"):
            out = os.path.join(folder, f"out-{kind}")
            got = _in_child(kind, index, out)
            got["peak_over_imports"] = got["peak"] - got["rss_after_imports"]
            if kind != "plan":
                got["model_bytes"] = size
                got["peak_over_imports_per_model"] = got["peak_over_imports"] / size
                got["files"] = sorted(os.listdir(out))
                shutil.rmtree(out)
            figures[kind] = got
        return {"name": "large_models", "machine": machine(), **figures}
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def big(folder: str, rounds: int) -> dict:
    """The ~6 GB model in 1 GB shards: the streamed CLI surgery against copying its files and as 2 ranks,
    and the peak RSS of the streamed surgery in a fresh process."""
    folder = os.path.join(folder, "big")
    os.makedirs(folder)
    index, size = write_checkpoint(folder, 6, LLAMA_6GB)
    figures = {"model_bytes": size, **ranks(index, folder, rounds, "LLAMA_6GB", "1GB", copy=True)}
    out = os.path.join(folder, "out-big")
    got = _in_child("stream", index, out, "LLAMA_6GB", "1GB")
    shutil.rmtree(out)
    figures["stream"] = {**got, "peak_over_imports": got["peak"] - got["rss_after_imports"]}
    shutil.rmtree(folder)
    return figures


def rerun(path: str, parts: list[str], quick: bool) -> dict:
    """Measure `parts` ("save_load", "ranks", "big") again into an existing results file (the rest kept)."""
    with open(path) as f:
        figures = json.load(f)
    folder = tempfile.mkdtemp(prefix="fxs-large-")
    try:
        if "save_load" in parts:
            figures["save_load"] = save_and_load(1 if quick else 5, *((1024, 4) if quick else (4096, 22)), folder)
        if "ranks" in parts:
            index, _ = write_checkpoint(folder, 6, LLAMA)
            figures["ranks"] = ranks(index, folder, 1 if quick else 3)
        if "big" in parts:
            figures["big"] = big(folder, 1 if quick else 2)
        return {**figures, "machine": machine()}
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--child", choices=("stream", "memory", "plan"))
    p.add_argument("--index")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--only", help="comma-separated parts to measure again (save_load, ranks, big) into OUT/large_models.json")
    p.add_argument("--config", default="LLAMA", choices=sorted(CONFIGS))
    p.add_argument("--shard", default="100MB")
    a = p.parse_args(argv)
    if a.child:
        print(json.dumps(child(a.child, a.index, a.out, a.config, a.shard)))
        return
    if a.only:
        figures = rerun(os.path.join(a.out, "large_models.json"), a.only.split(","), a.quick)
    else:
        figures = run(a.quick)
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "large_models.json"), "w") as f:
        json.dump(figures, f, indent=2)
    print(json.dumps({k: v for k, v in figures.items() if k != "machine"}, indent=2))


if __name__ == "__main__":
    main()
