"""Where a trainer's log lines go: JSON lines, the progress bar, TensorBoard, and a plot at the end."""

from __future__ import annotations

import json
import os
from pathlib import Path


class LogSinks:
    """The main rank's sinks (others pass ``enabled=False`` and write nothing): ``log.jsonl`` in the run folder,
    a tqdm bar when ``progress``, TensorBoard scalars when tensorboard is installed, and ``curves.png`` of
    ``plot_keys`` (with their titles) when matplotlib is."""

    def __init__(self, out_dir: Path, *, enabled: bool, progress: bool, total: int, start: int, desc: str,
                 plot_keys: dict[str, str] | None = None):  # fmt: skip
        self.out_dir, self.enabled = Path(out_dir), enabled
        self.plot_keys = plot_keys or {}
        self.history: list[dict] = []
        self.bar = None
        self.writer = None
        if not enabled:
            return
        self._trim_log(start)
        if progress:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, desc=desc, unit="step", dynamic_ncols=True)
        try:
            from torch.utils.tensorboard import SummaryWriter
        except Exception:  # tensorboard is optional
            pass
        else:
            self.writer = SummaryWriter(str(self.out_dir / "tb"))

    def _trim_log(self, step: int) -> None:
        """Keep the log lines up to ``step``, where this run starts (a resume): the steps after the checkpoint
        are trained and logged again, and each step must appear once."""
        path = self.out_dir / "log.jsonl"
        if not path.is_file():
            return
        lines = path.read_text().splitlines()
        kept = [line for line in lines if (m := _parse(line)) is not None and m.get("step", 0) <= step]
        if len(kept) == len(lines):
            return
        tmp = path.with_name(".log.jsonl.tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, path)

    def advance(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def log(self, m: dict, postfix: dict | None = None) -> None:
        """One log point: appended to the history on every rank, written by the main rank."""
        self.history.append(m)
        if not self.enabled:
            return
        with open(self.out_dir / "log.jsonl", "a") as f:
            f.write(json.dumps(m) + "\n")
        if self.bar is not None and postfix:
            self.bar.set_postfix(**postfix)
        if self.writer is not None:
            for k, v in m.items():
                if isinstance(v, (int, float)) and k not in ("step", "epoch"):
                    self.writer.add_scalar(f"train/{k}", v, m["step"])

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()

    def plot(self) -> None:
        if self.enabled:
            plot_curves(self.history, self.out_dir / "curves.png", self.plot_keys)


def plot_curves(history: list[dict], path: Path, keys: dict[str, str]) -> None:
    """One panel per key of ``keys`` (its value the panel's title) against the step; nothing without matplotlib."""
    if not history or not keys:
        return
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    steps = [h["step"] for h in history]
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 3.5), squeeze=False)
    for ax, (key, title) in zip(axes[0], keys.items()):
        ax.plot(steps, [h[key] for h in history])
        ax.set(xlabel="step", ylabel=key, title=title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _parse(line: str) -> dict | None:
    """A log line, or None for one a killed process left unfinished."""
    try:
        m = json.loads(line)
    except ValueError:
        return None
    return m if isinstance(m, dict) else None
