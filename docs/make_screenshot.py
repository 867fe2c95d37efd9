"""Make docs/demo-diff.png: the diff of the `fxsurgery demo` surgery, as headless Chromium shows it.

    python docs/make_screenshot.py [--chromium /usr/bin/chromium] [--size 1600x1150]

Runs offline (the page fetches nothing) with a throwaway Chromium profile.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import torchvision

ROOT = Path(__file__).resolve().parent.parent
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars"]


def demo_page(directory: Path) -> Path:
    """Write the demo surgery's diff (ResNet-18, random weights, rules/resnet-finetune.yaml) into `directory`."""
    sys.path.insert(0, str(ROOT))
    import fxsurgery as fxs
    from fxsurgery.views import _diff as diff

    os.chdir(ROOT)   # rule labels then read 'rules/resnet-finetune.yaml:8', as in the README
    torch.manual_seed(0)
    result = fxs.apply(torchvision.models.resnet18(weights=None), ["rules/resnet-finetune.yaml"],
                       example_inputs=(torch.randn(1, 3, 224, 224),))
    return diff.diff(result, directory / "demo-diff.html")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    parser.add_argument("--size", default="1600x1150", help="window size WIDTHxHEIGHT")
    parser.add_argument("-o", "--output", default=str(ROOT / "docs" / "demo-diff.png"))
    args = parser.parse_args()
    width, height = args.size.split("x")
    with tempfile.TemporaryDirectory() as work:
        page = demo_page(Path(work))
        subprocess.run([args.chromium, *FLAGS, f"--user-data-dir={Path(work) / 'profile'}", f"--window-size={width},{height}",
                        f"--screenshot={Path(args.output).resolve()}", page.as_uri()],
                       check=True, capture_output=True, timeout=120)
    print(f"wrote {args.output} ({os.path.getsize(args.output):,} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
