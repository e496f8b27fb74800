"""Install the winners of tile sweeps (``tune_glue.py``, ``tune_attention.py`` JSON) for the rest of a process.

A device call is short and its machine goes back seconds after it ends, so a sweep's winners cannot be committed
and re-measured in a second call. Instead ``train_throughput.py --tuned a.json,b.json`` installs them in the same
call, and every row it writes records what it installed (``kernel_switches["tuned"]``): the step is measured with
exactly the configuration that is then committed as the kernels' defaults. A winner is installed as a
``beit_kernels.tuning.override`` of the table entries its sweep mode sets (``tune_glue.overrides``,
``tune_attention.overrides``), undone when the caller's ``ExitStack`` closes.

Per sweep mode, the baseline is the mode's first candidate (each sweep lists the kernel's current default first;
``tests/bench`` checks that for the glue kernels), at group scale 1. The two dk/dv kernels (``dkdv`` and
``dkdv_allq``) compete as one family, against the first candidate of the one the default takes at the sweep's
shape on this device. The fused backward (``fused``) competes with them too: every one of those rows times the
whole backward. A winner replaces the default only when its median is at least ``min_gain``
faster, so noise cannot change a default; rows that are errors (a mismatch, a candidate that did not compile or
fit) never win.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import harness  # noqa: E402

# Modes that patch the same launcher compete with each other: one winner per family.
_FAMILY = {"dkdv_allq": "dkdv", "fused": "dkdv"}


def _default_backward(mode: str, rows: list[dict]) -> str:
    """The attention backward the default takes at the shape and dtype of ``mode``'s rows, on this device."""
    import torch

    from beit_kernels import tuning

    shape, dtype = next((r["shape"], r["dtype"]) for r in rows if r["mode"] == mode)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return tuning.attention_backward(shape["N"], shape["D"], getattr(torch, dtype), device)


def _baseline_mode(mode: str, rows: list[dict]) -> str:
    """The mode whose first candidate is the default that ``mode``'s rows must beat."""
    return _default_backward(mode, rows) if _FAMILY.get(mode, mode) == "dkdv" else mode


def _candidate(r: dict) -> tuple:
    """A row's candidate tuple: the glue sweep records it, the attention sweep records its config and scale."""
    if "candidate" in r:
        return tuple(r["candidate"])
    c = r["config"]
    cand = (c.get("BLOCK_M", 0), c["BLOCK_N"], c["num_warps"], c["num_stages"])
    return cand + ((int(c["DKDV_T"]),) if "DKDV_T" in c else ())  # the fused backward's switch


def choose(rows: list[dict], min_gain: float = 0.03) -> dict[str, dict]:
    """Per family, the row to install: ``{family: {"mode", "candidate", "group_scale", "p50", "baseline_p50"}}``.
    Families whose best row is not ``min_gain`` faster than their baseline are absent."""
    import tune_attention
    import tune_glue

    firsts = {**{k: (v[0], 1) for k, v in tune_glue.CANDIDATES.items()},
              **{k: (v[0], 1) for k, v in tune_attention.CANDIDATES.items()}}  # fmt: skip
    timed = [r for r in rows if r.get("metric") == "time" and r.get("p50") is not None]

    def key(r):
        return _candidate(r), r.get("group_scale", 1)

    def run_of(r):  # rows of one sweep at one shape and dtype: a baseline is only compared within its run
        return json.dumps(r.get("shape"), sort_keys=True), r.get("dtype")

    runs: dict[str, set] = {}
    for r in timed:
        runs.setdefault(r["mode"], set()).add(run_of(r))
    mixed = sorted(m for m, s in runs.items() if len(s) > 1)
    if mixed:
        raise ValueError(f"tuning rows of {mixed} at several shapes or dtypes: pass one sweep's rows per kernel")
    baselines = {}
    for r in timed:
        if firsts.get(r["mode"]) == key(r):
            if r["mode"] in baselines:
                raise ValueError(f"two baseline rows for {r['mode']!r}: pass one sweep's rows per kernel")
            baselines[r["mode"]] = r["p50"]
    baseline_of = {mode: baselines.get(_baseline_mode(mode, timed)) for mode in runs}
    chosen: dict[str, dict] = {}
    for r in timed:
        mode = r["mode"]
        family = _FAMILY.get(mode, mode)
        base = baseline_of[mode]
        if base is None or r["p50"] > base * (1 - min_gain):
            continue
        if family not in chosen or r["p50"] < chosen[family]["p50"]:
            cand, gs = key(r)
            chosen[family] = dict(mode=mode, candidate=list(cand), group_scale=gs, p50=r["p50"], baseline_p50=base)
    # The dq rows time the two-kernel backward, whose dq kernel the fused backward replaces: under a fused backward
    # (the family's winner, or the default with no winner) a dq tile would switch it off, untimed that way.
    if "dq" in chosen:
        family = chosen.get("dkdv")
        fused = family["mode"] == "fused" if family else _default_backward("dq", timed) == "fused"
        if fused:
            print(f"tuned dq: {_candidate_name(chosen.pop('dq'))} dropped: the fused backward has no dq kernel")
    return chosen


def _candidate_name(c: dict) -> str:
    return harness.candidate_name(c["mode"], tuple(c["candidate"]), c["group_scale"])


def install(chosen: dict[str, dict], stack: contextlib.ExitStack) -> dict[str, str]:
    """Enter each winner's override on ``stack`` (one after another: each on top of what the last installed) and
    record them in the harness's kernel switches. Returns ``{family: "mode:candidate[:g<scale>]"}``."""
    import tune_attention
    import tune_glue

    from beit_kernels import tuning

    applied = {}
    saved = dict(harness.TUNED)
    stack.callback(lambda: (harness.TUNED.clear(), harness.TUNED.update(saved)))  # undone with the patches
    for family, c in sorted(chosen.items()):
        mode, cand, gs = c["mode"], tuple(c["candidate"]), c["group_scale"]
        if mode in tune_attention.CANDIDATES:
            stack.enter_context(tuning.override(tune_attention.overrides(mode, cand, gs)))
        else:
            stack.enter_context(tuning.override(tune_glue.overrides(mode, cand)))
        applied[family] = _candidate_name(c)
    harness.TUNED.update(applied)
    return applied


def apply(paths: list[str], stack: contextlib.ExitStack, min_gain: float = 0.03) -> dict[str, str]:
    """Read the sweeps' JSON rows from ``paths`` (a missing file is an error: a device script that asked for the
    winners must not time the defaults unawares), choose and install the winners."""
    rows = []
    for p in paths:
        if not os.path.isfile(p):
            raise FileNotFoundError(f"tuning rows {p!r} do not exist (did the sweep run?)")
        with open(p) as f:
            rows += json.load(f)
    chosen = choose(rows, min_gain)
    applied = install(chosen, stack)
    for family, c in sorted(chosen.items()):
        print(f"tuned {family}: {applied[family]} {c['p50']:.4g} ms against {c['baseline_p50']:.4g} ms", flush=True)
    if not chosen:
        print("tuned: no candidate beat its default by the margin; defaults kept", flush=True)
    return applied
