"""Merge the JSON rows of the bench scripts into one short Markdown table: time and peak memory per provider,
with the ratio of each provider's time to ours measured in the same run.

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
        if r.get("metric") in ("time", "peak_memory_added") and r.get("p50") is not None:
            groups[_key(r)].setdefault(r["provider"], {})[r["metric"]] = r["p50"]
    lines = []
    if rows:
        r0 = rows[0]
        lines.append(f"device: {r0['device']}; torch {r0['torch']}; triton {r0['triton']}; commit {r0['git_sha']}; "
                     f"{r0['date']}")  # fmt: skip
        lines.append("")
    lines.append("| kernel | shape | dtype | mode | provider | ms (p50) | peak MiB added | time / ours |")
    lines.append("|---|---|---|---|---|---|---|---|")
    for (kernel, shape, dtype, mode), by_provider in groups.items():
        ours = by_provider.get("ours", {}).get("time")
        for provider, m in by_provider.items():
            t = m.get("time")
            ratio = f"{t / ours:.2f}" if (t is not None and ours) else "-"
            mem = m.get("peak_memory_added")
            lines.append(
                f"| {kernel} | {shape} | {dtype} | {mode} | {provider} | "
                f"{'-' if t is None else f'{t:.3f}'} | {'-' if mem is None else f'{mem:.1f}'} | {ratio} |"
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
