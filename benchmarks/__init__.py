"""Benchmarks of fxsurgery: speed, scale and memory beside torch.fx and hand-written surgery.

Run with `python -m benchmarks.run --out benchmarks/results`; see benchmarks/README.md.
"""
