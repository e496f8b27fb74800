"""Merge the JSON rows of the bench scripts into one short Markdown table: time, images per second and peak memory
per provider, with the ratio of each provider's time to ours ("ours", or "triton" in the training-step rows)
measured in the same run.

    python bench/summarize.py OUT/*.json > OUT/summary.md
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict


def _key(r):
    shape = ",".join(f"{k}={v}" for k, v in r["shape"].items()) if isinstance(r["shape"], dict) else str(r["shape"])
    return r["kernel"], shape, r["dtype"], r["mode"]


def summarize(rows: list[dict]) -> str:
    groups: dict = defaultdict(dict)
    for r in rows:
        metric = r.get("metric")
        if metric == "peak_memory":
            metric = "peak_memory_added"  # the training step reports its whole peak: one column for both
        if metric == "throughput" and r.get("unit") != "images/s":
            continue
        if metric in ("time", "peak_memory_added", "throughput") and r.get("p50") is not None:
            groups[_key(r)].setdefault(r["provider"], {})[metric] = r["p50"]
    lines = []
    if rows:
        r0 = rows[0]
        lines.append(f"device: {r0['device']}; torch {r0['torch']}; triton {r0['triton']}; commit {r0['git_sha']}; "
                     f"{r0['date']}")  # fmt: skip
        lines.append("")
    lines.append("| kernel | shape | dtype | mode | provider | ms (p50) | images/s | peak MiB | time / ours |")
    lines.append("|---|---|---|---|---|---|---|---|---|")
    for (kernel, shape, dtype, mode), by_provider in groups.items():
        ours = (by_provider.get("ours") or by_provider.get("triton") or {}).get("time")
        for provider, m in by_provider.items():
            t = m.get("time")
            ratio = f"{t / ours:.2f}" if (t is not None and ours) else "-"
            mem, ips = m.get("peak_memory_added"), m.get("throughput")
            lines.append(
                f"| {kernel} | {shape} | {dtype} | {mode} | {provider} | {'-' if t is None else f'{t:.3f}'} | "
                f"{'-' if ips is None else f'{ips:.1f}'} | {'-' if mem is None else f'{mem:.1f}'} | {ratio} |"
            )
    return "\n".join(lines)


def main(paths: list[str]) -> None:
    rows = []
    for p in paths:
        with open(p) as f:
            rows += json.load(f)
    print(summarize(rows))


if __name__ == "__main__":
    main(sys.argv[1:])
