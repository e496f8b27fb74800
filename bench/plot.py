"""A PNG chart of benchmark rows: one panel per kernel; for each (shape, dtype, mode), each provider's time
relative to ours (bars to the right of 1: ours is faster).

    python bench/plot.py OUT/*.json --out bench/results.png
"""

from __future__ import annotations

import argparse
import json

from summarize import _baseline, _key, check_one_run, first_rows


def plot(rows: list[dict], out: str) -> dict:
    """Draw the chart into ``out``; returns the panels drawn: kernel -> [(group label, {provider: time / ours})]."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: dict = {}
    for r in rows:
        if r.get("metric") == "time" and r.get("p50"):
            groups.setdefault(_key(r), {})[r["provider"]] = r["p50"]
    # Providers that differ in dtype by design (the tokenizer's official fp16 module, its bf16 and fp32 variants)
    # land in groups of one or without the baseline: they join the group of the same (kernel, shape, mode) that has
    # the baseline, labelled with their dtype, or else one group of mixed dtypes.
    for key in [k for k, g in groups.items() if len(g) == 1 or _baseline(g) is None]:
        kernel, shape, dtype, mode = key
        home = next((k for k, g in groups.items() if k != key and (k[0], k[1], k[3]) == (kernel, shape, mode)
                     and len(g) > 1 and _baseline(g) is not None), None)  # fmt: skip
        merged = groups.setdefault(home or (kernel, shape, "mixed dtypes", mode), {})
        for provider, t in groups.pop(key).items():
            merged[f"{provider} ({dtype})" if home or provider in merged else provider] = t
    panels: dict = {}  # kernel -> [(label, {provider: time / ours})]
    for (kernel, shape, dtype, mode), by_provider in groups.items():
        base = _baseline(by_provider)
        if base is None:
            continue
        ratios = {p: t / by_provider[base] for p, t in by_provider.items()}
        panels.setdefault(kernel, []).append((f"{shape}\n{dtype} {mode}", ratios))
    if not panels:
        raise ValueError("no rows with a time for 'ours' (or 'triton') to compare against")
    providers = sorted({p for entries in panels.values() for _, ratios in entries for p in ratios})
    colors = {p: plt.get_cmap("tab20")(i % 20) for i, p in enumerate(providers)}
    heights = [max(1.5, 0.22 * sum(len(ratios) for _, ratios in entries)) for entries in panels.values()]
    fig, axes = plt.subplots(len(panels), 1, figsize=(9, sum(heights) + 1), height_ratios=heights, squeeze=False)
    for ax, (kernel, entries) in zip(axes[:, 0], panels.items(), strict=True):
        y, ticks, labels, seen = 0.0, [], [], set()
        for label, ratios in entries:
            top = y
            for p in sorted(ratios):
                ax.barh(y, ratios[p], height=0.8, color=colors[p], label=p if p not in seen else None)
                ax.text(ratios[p], y, f" {ratios[p]:.2f}", va="center", fontsize=5)
                seen.add(p)
                y += 1
            ticks.append((top + y - 1) / 2)
            labels.append(label)
            y += 0.6
        ax.axvline(1.0, color="black", linewidth=0.8)
        ax.set_yticks(ticks, labels, fontsize=5)
        ax.invert_yaxis()
        ax.set_title(kernel, fontsize=8, loc="left")
        ax.tick_params(axis="x", labelsize=6)
        ax.legend(fontsize=5, loc="lower right")
    axes[-1, 0].set_xlabel("time / ours (right of 1: ours is faster)", fontsize=7)
    r0 = rows[0]
    fig.suptitle(f"{r0['device']}, torch {r0['torch']}, triton {r0['triton']}, {r0['git_sha']}", fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 0.985))
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return panels


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("paths", nargs="+")
    p.add_argument("--out", default="results.png")
    args = p.parse_args(argv)
    rows = []
    for path in args.paths:
        with open(path) as f:
            rows += json.load(f)
    check_one_run(rows)
    plot(first_rows(rows)[0], args.out)
    print(args.out)


if __name__ == "__main__":
    main()
