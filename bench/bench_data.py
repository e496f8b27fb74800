"""Images per second of the BEiT data loaders: the DALI pipeline against the reference PIL loader.

Both run the full BEiT sample (two views, colour jitter, flip, masks) on the synthetic ImageFolder
(``beit-make-synthetic``, about 500x375 JPEGs with some PNG and grayscale) at the same thread count: DALI's
``num_threads`` against the reference loader's DataLoader worker processes. Throughput is measured over whole
epochs, start-up included (so use epochs of many batches); each repeat is one epoch, the providers take turns
epoch by epoch, and the rows hold the median and the 20th/80th percentiles over repeats (every repeat's figure
is in the JSON row).

    python bench/bench_data.py                      # batch 256, 2048 images, all cores
    python bench/bench_data.py --quick              # small smoke run
    python bench/bench_data.py --device gpu --out runs/bench_data.json
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness  # noqa: E402

from beit.data import build_loader, dali_available, list_images, make_synthetic  # noqa: E402


def synthetic_folder(num_images: int, root: str | None) -> Path:
    """The synthetic data set of ``num_images`` images, written once into the cache."""
    cache = Path(os.environ.get("BEIT_CACHE_DIR") or Path.home() / ".cache" / "beit")
    path = Path(root) if root else cache / f"synthetic-{num_images}"
    if not path.exists() or len(list_images(path)) < num_images:
        print(f"writing {num_images} synthetic images to {path} ...", flush=True)
        make_synthetic(path, num_images, classes=10, seed=0)
    return path


def _cpu_seconds() -> float:
    # Children count once reaped: the reference loader's workers end with the epoch (persistent_workers=False).
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def epoch_throughput(loader, epoch: int) -> tuple[float, float]:
    """(images per second, CPU milliseconds per image) over one whole epoch, start-up included (pipeline build,
    worker start). Timing from the first batch instead would flatter the reference loader, whose workers each
    build whole batches in parallel: its first ``num_workers`` batches arrive together. CPU time per image is
    the figure that load from other processes on a shared machine does not move."""
    loader.set_epoch(epoch)
    n, t0, c0 = 0, time.perf_counter(), _cpu_seconds()
    for batch in loader:
        n += batch["images"].shape[0]
    if batch["images"].is_cuda:
        import torch

        torch.cuda.synchronize()
    return n / (time.perf_counter() - t0), 1e3 * (_cpu_seconds() - c0) / n


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", help="image folder (default: a cached synthetic folder of --num-images images)")
    p.add_argument("--num-images", type=int, default=2048)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--repeats", type=int, default=3, help="timed epochs per provider")
    p.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    p.add_argument("--providers", default="dali,reference")
    p.add_argument("--output-dtype", default="float32")
    p.add_argument("--quick", action="store_true", help="128 images, batch 32, one repeat")
    p.add_argument("--out", help="write the JSON rows here")
    args = p.parse_args(argv)
    if args.quick:
        args.num_images, args.batch_size, args.repeats = 128, 32, 1
    data = Path(args.data) if args.data else synthetic_folder(args.num_images, None)
    env = harness.env_info("cuda" if args.device == "gpu" else "cpu")
    loaders = {}
    for provider in args.providers.split(","):
        if provider == "dali" and not dali_available():
            print("DALI is not installed: skipping the dali provider", file=sys.stderr)
            continue
        if provider == "reference" and args.device == "gpu":
            print("the reference loader runs on the CPU only: skipping it for --device gpu", file=sys.stderr)
            continue
        loaders[provider] = build_loader(
            data,
            args.batch_size,
            device=args.device,
            num_threads=args.threads,
            backend="dali" if provider == "dali" else "reference",
            output_dtype=args.output_dtype,
        )
        epoch_throughput(loaders[provider], 0)  # warm-up epoch: plugin load, page cache, allocator
    # Providers take turns, epoch by epoch, so that load from other processes on a shared machine hits both.
    rates = {provider: [] for provider in loaders}
    cpu_ms = {provider: [] for provider in loaders}
    for r in range(args.repeats):
        for provider, loader in loaders.items():
            rate, ms = epoch_throughput(loader, 1 + r)
            rates[provider].append(rate)
            cpu_ms[provider].append(ms)
    rows = []
    for provider, loader in loaders.items():
        shape = dict(batch=args.batch_size, images=len(loader.files), threads=args.threads, size=224, tok=112)
        for metric, unit, values in (("throughput", "images/s", rates), ("cpu_time", "ms/image", cpu_ms)):
            rows.append(
                harness.row(
                    "data_loader", provider, args.device, metric, unit,
                    tuple(np.quantile(values[provider], harness.QUANTILES)),
                    shape=shape, dtype=args.output_dtype, env=env, repeats=values[provider],
                )
            )  # fmt: skip
    by = {r["provider"]: r["p50"] for r in rows if r["metric"] == "throughput"}
    if "dali" in by and "reference" in by:
        rows.append(
            harness.row(
                "data_loader", "dali/reference", args.device, "speedup", "x", by["dali"] / by["reference"],
                shape=rows[0]["shape"], dtype=args.output_dtype, env=env,
            )
        )  # fmt: skip
    if args.out:
        harness.write_rows(rows, args.out)
    print(f"# {env['device']}, torch {env['torch']}, git {env['git_sha']}, data {data}")
    print(harness.format_table(rows, ("kernel", "provider", "mode", "metric", "p50", "p20", "p80", "unit", "shape")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
