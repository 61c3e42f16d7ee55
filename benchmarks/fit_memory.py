"""Peak memory of `probe.fit` does not grow with the number of samples.

Each size runs in a fresh subprocess, which streams a generated Yin-Yang loader (batches are
made on the fly, so the data set itself never sits in memory) through a ResMLP and fits the
probe; the subprocess reports its peak RSS before and after fitting.

    python benchmarks/fit_memory.py [--sizes 10000 40000 160000]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import json, resource, sys, torch
from koopman_hooks import KoopmanProbe
from koopman_hooks.data.yinyang import YinYangDataset
from koopman_hooks.models import ResMLP

n, batch = int(sys.argv[1]), 256
torch.manual_seed(0)
torch.set_num_threads(1)
model = ResMLP(4, 3, width=64, depth=5).eval()

class Stream:
    def __iter__(self):
        for i in range(0, n, batch):
            ds = YinYangDataset(min(batch, n - i), seed=i)
            yield ds.inputs, ds.targets

before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
KoopmanProbe(model, ["blocks.0", "blocks.4"], latent_dim=32, steps=10, verbose=False).fit(Stream(), epochs=1)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"samples": n, "peak_rss_mb_before_fit": before, "peak_rss_mb_after_fit": after}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 40_000, 160_000])
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "fit_memory.json"))
    args = parser.parse_args()
    rows = []
    for n in args.sizes:
        out = subprocess.run([sys.executable, "-c", CHILD, str(n)], capture_output=True, text=True, check=True)
        row = json.loads(out.stdout.strip().splitlines()[-1])
        row["fit_growth_mb"] = row["peak_rss_mb_after_fit"] - row["peak_rss_mb_before_fit"]
        rows.append(row)
        print(f"{n:>8d} samples: peak RSS {row['peak_rss_mb_after_fit']:.1f} MB (fit added {row['fit_growth_mb']:.1f} MB)", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=2))
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
