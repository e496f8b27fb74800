"""Memory traffic by count: the bytes each op reads and writes, per image, counted on the CPU.

Every op that reaches the dispatcher below autograd (a ``TorchDispatchMode``) is charged the bytes of its distinct
tensor inputs and outputs; views are free, and so are tensors of at most ``--min-numel`` elements. Our custom
ops that write into given tensors (``conv_epilogue``) are charged those as outputs. Two batch sizes are run and
differenced, so the per-image figure leaves out what does not grow with the batch (weights, their casts).
PyTorch's cuDNN convolution adds the bias in a pass of its own (a read and a write of the output), which a CPU run
cannot see: it is charged as ``conv bias add (cuDNN)`` for each convolution given a bias.

A count, not a time: each byte is counted once per op, as if caches held nothing between ops and every op moved
only what it must. What a GPU makes of it is for bench_tokenizer.py and train_throughput.py to measure.

    python bench/count_traffic.py tokenizer                  # DALL-E encoder, 112 px, bf16: fused against unfused
    python bench/count_traffic.py step --depth 1             # BEiT-B/16 training step: ref against triton
"""

from __future__ import annotations

import argparse
import collections
import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")  # our kernels run in Triton's interpreter here

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils._pytree import tree_flatten  # noqa: E402

FREE = {"view", "_unsafe_view", "transpose", "permute", "expand", "t", "unsqueeze", "squeeze", "select", "slice",
        "as_strided", "alias", "detach", "unbind", "split", "split_with_sizes", "empty", "empty_like",
        "empty_strided", "new_empty", "new_empty_strided", "lift_fresh"}  # fmt: skip
# Custom ops that return nothing and write into these argument positions.
OUT_ARGS = {"conv_epilogue": (6, 7)}
BIAS_ADD = "conv bias add (cuDNN)"


def _bytes(tensors, min_numel: int) -> int:
    seen, total = set(), 0
    for t in tensors:
        if not isinstance(t, torch.Tensor) or t.numel() <= min_numel:
            continue
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


class TrafficCount(TorchDispatchMode):
    """Bytes read and written per op name (``counts``) and calls (``calls``)."""

    def __init__(self, min_numel: int = 4096):
        super().__init__()
        self.min_numel = min_numel
        self.counts: collections.Counter = collections.Counter()
        self.calls: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        name = func.overloadpacket.__name__
        if name in FREE:
            return result
        if name in OUT_ARGS:
            outs = [args[i] for i in OUT_ARGS[name] if args[i] is not None]
            ins = [a for i, a in enumerate(args) if i not in OUT_ARGS[name]]
        else:
            ins, outs = tree_flatten((args, kwargs))[0], tree_flatten(result)[0]
        self.counts[name] += _bytes(ins, self.min_numel) + _bytes(outs, self.min_numel)
        self.calls[name] += 1
        if name == "convolution" and args[2] is not None:
            self.counts[BIAS_ADD] += 2 * _bytes(tree_flatten(result)[0], self.min_numel)
            self.calls[BIAS_ADD] += 1
        return result


def count(prepare, run, batch: int, min_numel: int) -> TrafficCount:
    data = prepare(batch)  # outside the count: the inputs are given
    mode = TrafficCount(min_numel)
    with mode:
        run(*data)
    return mode


def per_image(prepare, run, batches: tuple[int, int], min_numel: int) -> dict[str, tuple[float, int]]:
    """op -> (bytes per image, calls per run), from the difference of two batch sizes."""
    lo, hi = (count(prepare, run, b, min_numel) for b in batches)
    names = set(lo.counts) | set(hi.counts)
    return {n: ((hi.counts[n] - lo.counts[n]) / (batches[1] - batches[0]), hi.calls[n]) for n in names}


def tokenizer_runs(args) -> dict:
    """name -> (prepare(batch) -> inputs, run(*inputs)): the encoder with its glue unfused and fused."""
    from beit.tokenizer import DalleEncoder, map_pixels

    torch.manual_seed(0)
    base = DalleEncoder(n_hid=args.n_hid, vocab_size=args.vocab_size)

    def prepare(batch: int) -> tuple:
        g = torch.Generator().manual_seed(batch)
        return (map_pixels(torch.rand(batch, 3, args.size, args.size, generator=g)),)

    def make(fused: bool):
        enc = DalleEncoder(n_hid=args.n_hid, vocab_size=args.vocab_size)
        enc.load_state_dict(base.state_dict())
        enc.configure(precision=args.precision, channels_last=True, fused=fused, check_range=False)
        return prepare, enc.get_codebook_indices

    return {"unfused": make(False), "fused": make(True)}


def step_runs(args) -> dict:
    """name -> (prepare, run): one training step (forward, backward) of each implementation, bf16 autocast."""
    import beit
    from beit.masking import MaskingGenerator, generate_masks

    grid = args.image_size // 16

    def make(impl: str):
        torch.manual_seed(0)
        model = beit.create_model(args.model, depth=args.depth, impl=impl, drop_path_rate=0.1,
                                  img_size=args.image_size)  # fmt: skip

        def prepare(batch: int) -> tuple:
            g = torch.Generator().manual_seed(batch)
            images = torch.randn(batch, 3, args.image_size, args.image_size, generator=g)
            num_mask = max(1, round(75 / 196 * grid * grid))
            masks = generate_masks(MaskingGenerator(grid, num_mask, min(16, num_mask), rng=batch), batch)
            tokens = torch.randint(0, model.config.vocab_size, (batch, grid * grid), generator=g)
            return (images, *masks, tokens)

        def run(images, bool_masked_pos, mask_index, tokens) -> None:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss, _, _ = model.forward_mim_loss(images, bool_masked_pos, mask_index, tokens)
            loss.backward()
            model.zero_grad(set_to_none=True)

        return prepare, run

    return {impl: make(impl) for impl in args.impls.split(",")}


def table(results: dict[str, dict[str, tuple[float, int]]], top: int) -> str:
    names = list(results)
    totals = {k: sum(b for b, _ in v.values()) for k, v in results.items()}
    ops = sorted({op for v in results.values() for op in v}, key=lambda op: -max(v.get(op, (0, 0))[0] for v in
                 results.values()))  # fmt: skip
    head = "| op | " + " | ".join(f"{n} MB/img (calls)" for n in names) + " |"
    lines = [head, "|---|" + "---|" * len(names)]
    for op in ops[:top]:
        cells = [f"{v[op][0] / 1e6:.2f} ({v[op][1]})" if op in v else "-" for v in results.values()]
        lines.append(f"| {op} | " + " | ".join(cells) + " |")
    lines.append("| **total** | " + " | ".join(f"**{totals[n] / 1e6:.2f}**" for n in names) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=("tokenizer", "step"))
    parser.add_argument("--batches", default="1,2", help="the two batch sizes differenced")
    parser.add_argument("--precision", default="bf16", help="tokenizer precision (bf16, fp16, fp32)")
    parser.add_argument("--size", type=int, default=112, help="tokenizer view side")
    parser.add_argument("--n-hid", type=int, default=256)
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--model", default="beit_base_patch16_224")
    parser.add_argument("--depth", type=int, default=1, help="blocks of the step's model")
    parser.add_argument("--image-size", type=int, default=224, help="the step's image side")
    parser.add_argument("--impls", default="ref,triton", help="step implementations compared")
    parser.add_argument("--min-numel", type=int, default=4096, help="smaller tensors are not counted")
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args(argv)
    batches = tuple(int(b) for b in args.batches.split(","))
    if len(batches) != 2 or not 0 < batches[0] < batches[1]:
        parser.error(f"--batches needs two increasing positive sizes, got {args.batches!r}")
    runs = tokenizer_runs(args) if args.what == "tokenizer" else step_runs(args)
    results = {name: per_image(*pr, batches, args.min_numel) for name, pr in runs.items()}
    print(f"# memory traffic by count, per image ({args.what}; batches {batches[0]} and {batches[1]} differenced)")
    print(table(results, args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
