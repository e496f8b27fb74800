"""A PNG chart of benchmark rows: for each (kernel, shape, dtype, mode), time per provider relative to ours.

    python bench/plot.py OUT/*.json --out bench/results.png
"""

from __future__ import annotations

import argparse
import json

from summarize import _key


def plot(rows: list[dict], out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: dict = {}
    for r in rows:
        if r.get("metric") == "time" and r.get("p50"):
            groups.setdefault(_key(r), {})[r["provider"]] = r["p50"]
    labels, providers = [], sorted({p for g in groups.values() for p in g})
    speedups = {p: [] for p in providers}
    for key, by_provider in groups.items():
        ours = by_provider.get("ours") or by_provider.get("triton")
        if not ours:
            continue
        labels.append(f"{key[0]} {key[3]}\n{key[1]} {key[2]}")
        for p in providers:
            speedups[p].append(by_provider[p] / ours if p in by_provider else 0.0)
    if not labels:
        raise ValueError("no rows with a time for 'ours' (or 'triton') to compare against")
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(labels)), 4))
    width = 0.8 / len(providers)
    for i, p in enumerate(providers):
        ax.bar([x + i * width for x in range(len(labels))], speedups[p], width, label=p)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(labels))], labels, fontsize=6, rotation=15, ha="right")
    ax.set_ylabel("time / ours (higher: ours is faster)")
    r0 = rows[0]
    ax.set_title(f"{r0['device']}, torch {r0['torch']}, triton {r0['triton']}, {r0['git_sha']}", fontsize=8)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("paths", nargs="+")
    p.add_argument("--out", default="results.png")
    args = p.parse_args(argv)
    rows = []
    for path in args.paths:
        with open(path) as f:
            rows += json.load(f)
    plot(rows, args.out)
    print(args.out)


if __name__ == "__main__":
    main()
