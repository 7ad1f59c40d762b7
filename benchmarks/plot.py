"""Turn a results JSON of benchmarks/run.py into PNG plots beside it.

    python -m benchmarks.plot benchmarks/results/cpu-2026-11-26.json

One figure per op: speed-up over the baseline for each case and provider (bars); peak memory per
case and provider where measured; TFLOP/s per case for attention. A provider that is missing is
drawn as a labelled gap, never as zero.
"""

from __future__ import annotations

import argparse
import json
import os
import re
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _op(name: str) -> str:
    # "masked_cross_entropy fwd", "attention-padding30-bwd": the op is the first word.
    return re.split(r"[ -]", name, maxsplit=1)[0]


def plot(path: str) -> list[str]:
    with open(path) as f:
        data = json.load(f)
    # Cases a time budget skipped are not results: leave them out rather than draw gaps.
    rows = [
        r for r in data["rows"]
        if not r["name"].startswith("ceiling:")
        and not str(r.get("status", "")).startswith("skipped")
    ]  # fmt: skip
    dev = data.get("machine", {}).get("device", "?")
    stem = os.path.splitext(path)[0]
    written = []
    by_op = defaultdict(list)
    for r in rows:
        # Attention rows carry a mode (fwd, bwd, fwd+bwd): one figure per mode stays readable.
        by_op[_op(r["name"]) + (f"-{r['mode']}" if r.get("mode") else "")].append(r)
    for op, op_rows in by_op.items():
        for metric, label in (
            ("speedup_vs_baseline", "speed-up vs baseline (x)"),
            ("peak_mem_mb", "peak extra memory (MB)"),
            ("tflops", "TFLOP/s"),
        ):
            have = [r for r in op_rows if isinstance(r.get(metric), (int, float))]
            if not have:
                continue
            cases = sorted({f"{r['name'].split(' ', 1)[-1]} {r['shape']} {r['dtype']}"
                            for r in op_rows})  # fmt: skip
            providers = sorted({r["provider"] for r in op_rows})
            fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(cases)), 4))
            width = 0.8 / max(1, len(providers))
            values = [r[metric] for r in have if r[metric] > 0]
            # Speed-ups that span more than 30x (a 1x baseline next to a 200x op) on a log axis,
            # or the small bars vanish.
            log = metric == "speedup_vs_baseline" and values and max(values) > 30 * min(values)
            for i, p in enumerate(providers):
                xs, ys = [], []
                for j, c in enumerate(cases):
                    for r in op_rows:
                        key = f"{r['name'].split(' ', 1)[-1]} {r['shape']} {r['dtype']}"
                        if r["provider"] == p and key == c:
                            v = r.get(metric)
                            if isinstance(v, (int, float)):
                                xs.append(j + i * width)
                                ys.append(v)
                            else:  # at the axis' foot, in axes units (log axes have no 0)
                                ax.annotate(r.get("status", "n/a"), (j + i * width, 0.01),
                                            xycoords=("data", "axes fraction"), rotation=90,
                                            fontsize=6)  # fmt: skip
                # One fixed color per provider; a provider without a single figure (a missing
                # peer) gets no bar and no legend entry, only its status text.
                if ys:
                    ax.bar(xs, ys, width=width, label=p, color=f"C{i % 10}")
            if log:
                ax.set_yscale("log")
            ax.set_xticks([j + 0.4 - width / 2 for j in range(len(cases))])
            ax.set_xticklabels(cases, rotation=30, ha="right", fontsize=7)
            ax.set_ylabel(label)
            ax.set_title(f"{op} on {dev}", fontsize=9)
            if metric == "speedup_vs_baseline":
                ax.axhline(1.0, color="grey", lw=0.8)
            ax.legend(fontsize=7)
            fig.tight_layout()
            out = f"{stem}-{op}-{metric}.png"
            fig.savefig(out, dpi=110)
            plt.close(fig)
            written.append(out)
    return written


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("results", nargs="+", help="results JSON files written by benchmarks.run")
    for path in p.parse_args().results:
        for out in plot(path):
            print(out)


if __name__ == "__main__":
    main()
