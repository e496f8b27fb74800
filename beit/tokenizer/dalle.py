"""The DALL-E dVAE encoder (the paper's tokenizer), reimplemented without ``attrs`` or ``dall_e``, and a loader for
OpenAI's ``encoder.pkl`` that runs no code from the file.

Architecture (``dall_e/encoder.py``, OpenAI's release of 2021-02):
    input   7x7 conv 3 -> n_hid
    group_1 n_blk x EncoderBlock(n_hid)                       then 2x2 max-pool
    group_2 n_blk x EncoderBlock(2 n_hid)                     then 2x2 max-pool
    group_3 n_blk x EncoderBlock(4 n_hid)                     then 2x2 max-pool
    group_4 n_blk x EncoderBlock(8 n_hid)
    output  ReLU, 1x1 conv 8 n_hid -> vocab_size              logits at 1/8 of the input side
    EncoderBlock(x) = id_path(x) + res_path(x) / (4 n_blk)^2   id_path: 1x1 conv when the width changes
    res_path = relu, 3x3 (n_in -> n_out/4), relu, 3x3, relu, 3x3, relu, 1x1 (-> n_out)
With the defaults (n_hid 256, two blocks per group, 8192 codes) that is 53.8M parameters and about 26 GMAC per
112 px image. Convolution parameters are called ``w`` and ``b``, as in ``dall_e.utils.Conv2d``, so the state-dict
names are the official ones (``blocks.group_1.block_1.res_path.conv_1.w``, ``blocks.output.conv.w``, ...).

Precision. The official module casts every convolution but the last to fp16 on CUDA and keeps the 2048 -> 8192
output convolution in fp32. Here ``precision`` picks autocast "bf16" or "fp16" (or "fp32"); with ``fp32_logits``
(the default) the output convolution stays in fp32 as in the official module, which keeps near-tied logits from
being decided by bf16 rounding. ``channels_last`` converts weights and inputs once; ``compile=True`` wraps the
computation in ``torch.compile``.

Fused glue (``fused``, on by default for CUDA inputs in channels_last). PyTorch's cuDNN convolution adds its bias in
a pass of its own, and each block then makes four more full-resolution passes (ReLU, bias of the last convolution,
scaled residual add, the next block's ReLU; a max-pool at the end of a group). With ``fused`` the convolutions run
without their biases and ``beit_kernels.conv_epilogue`` does each block's glue in one pass: bias plus ReLU after
the hidden 3x3 convolutions, and after the last 1x1 convolution the two biases, the residual add, the max-pool
where the group ends and the ReLU, writing the block's output and its ReLU. Every step rounds as the unfused
chain does, so the logits are those of the unfused chain on the same convolution outputs. By count
(``bench/count_traffic.py tokenizer``: each op's reads and writes, 112 px, bf16), the memory traffic per image
goes from 414 to 259 MB; bench/bench_tokenizer.py measures what that is worth in time.

``encoder.pkl`` is a whole pickled ``dall_e.encoder.Encoder`` (``torch.save(module)``): plain
``torch.load(weights_only=True)`` refuses it and ``weights_only=False`` would import ``dall_e`` and run whatever
the file names. :func:`read_dalle_state_dict` instead unpickles through an allow-list: the encoder's classes and
the torch/collections names such a file holds become inert stand-ins that only keep their attributes; the tensors
are collected from them. Any other name is refused before anything is built.
"""

from __future__ import annotations

import collections
import io
import math
import os
import pickle
import re
import types
import warnings
from collections import OrderedDict
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from beit.precision import resolve_precision
from beit.tokenizer.common import (
    VisualTokenizer,
    as_path,
    check_images,
    check_positions,
    scatter_positions,
    sniff_weights_file,
)
from beit_kernels import triton_available

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def auto_precision(device: torch.device | str) -> str:
    """The encoder's precision for "auto": the trainers' (``beit.precision``): bf16 on a GPU that computes it
    (sm80+), fp16 on an older one (the official module's choice, on the V100s of the paper), fp32 on the CPU."""
    return resolve_precision("auto", torch.device(device))


EXPECTED_FILE = (
    "DALL-E encoder weights: OpenAI's encoder.pkl (https://cdn.openai.com/dall-e/encoder.pkl; "
    "download it with 'wget -O encoder.pkl URL', capital O) or a state dict with keys like 'blocks.input.w' "
    "(.pt/.pth/.safetensors)"
)


class Conv2d(nn.Module):
    """``dall_e.utils.Conv2d``: 'same' padding, odd square kernel, parameters named ``w`` and ``b``."""

    def __init__(self, n_in: int, n_out: int, kw: int, device=None):
        super().__init__()
        if kw < 1 or kw % 2 == 0:
            raise ValueError(f"kernel width must be odd and positive, got {kw}")
        w = torch.empty(n_out, n_in, kw, kw, device=device)
        # The official initialisation, so a randomly initialised encoder has the official activation scale.
        w.normal_(std=1 / math.sqrt(n_in * kw**2))
        self.w = nn.Parameter(w)
        self.b = nn.Parameter(torch.zeros(n_out, device=device))
        self.padding = (kw - 1) // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.w, self.b, padding=self.padding)

    def extra_repr(self) -> str:
        n_out, n_in, kw, _ = self.w.shape
        return f"{n_in}, {n_out}, kernel={kw}"


def _conv_without_bias(x: torch.Tensor, w: torch.Tensor, padding: int) -> torch.Tensor:
    """The fused path's convolution: no bias (its epilogue adds it), the output channels_last (cuDNN gives that
    for channels_last operands already: a no-op then)."""
    return F.conv2d(x, w, None, padding=padding).contiguous(memory_format=torch.channels_last)


class EncoderBlock(nn.Module):
    def __init__(self, n_in: int, n_out: int, n_layers: int, device=None):
        super().__init__()
        if n_out % 4:
            raise ValueError(f"n_out must be a multiple of 4, got {n_out}")
        n_hid = n_out // 4
        self.post_gain = 1 / n_layers**2
        self.id_path = Conv2d(n_in, n_out, 1, device) if n_in != n_out else nn.Identity()
        self.res_path = nn.Sequential(
            OrderedDict(
                [
                    # relu_1 must not work in place: id_path reads the same x.
                    ("relu_1", nn.ReLU()),
                    ("conv_1", Conv2d(n_in, n_hid, 3, device)),
                    ("relu_2", nn.ReLU(inplace=True)),
                    ("conv_2", Conv2d(n_hid, n_hid, 3, device)),
                    ("relu_3", nn.ReLU(inplace=True)),
                    ("conv_3", Conv2d(n_hid, n_hid, 3, device)),
                    ("relu_4", nn.ReLU(inplace=True)),
                    ("conv_4", Conv2d(n_hid, n_out, 1, device)),
                ]
            )
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # post_gain is a power of two (1/64 by default), so add(alpha=) equals the official id + gain * res exactly.
        return torch.add(self.id_path(x), self.res_path(x), alpha=self.post_gain)


class DalleEncoder(VisualTokenizer):
    """The DALL-E dVAE encoder as a frozen tokenizer. ``forward`` gives fp32 logits [B, vocab, H/8, W/8];
    ``get_codebook_indices`` their argmax as [B, (H/8)*(W/8)] in raster order."""

    input_size = 112
    patch_size = 8

    def __init__(
        self,
        n_hid: int = 256,
        n_blk_per_group: int = 2,
        input_channels: int = 3,
        vocab_size: int = 8192,
        group_count: int = 4,
        *,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        if group_count != 4:
            # The official module hard-wires four groups; group_count only enters the residual gain.
            raise ValueError(f"the DALL-E encoder has four groups, got group_count={group_count}")
        if n_hid < 1 or n_blk_per_group < 1 or input_channels < 1 or vocab_size < 2:
            raise ValueError(
                f"invalid encoder config: n_hid={n_hid}, n_blk_per_group={n_blk_per_group}, "
                f"input_channels={input_channels}, vocab_size={vocab_size}"
            )
        self.n_hid, self.n_blk_per_group, self.vocab_size = n_hid, n_blk_per_group, vocab_size
        self.in_channels = input_channels
        n_layers = group_count * n_blk_per_group

        def group(n_in: int, n_out: int, pool: bool) -> nn.Sequential:
            layers = [
                (f"block_{i + 1}", EncoderBlock(n_in if i == 0 else n_out, n_out, n_layers, device))
                for i in range(n_blk_per_group)
            ]
            if pool:
                layers.append(("pool", nn.MaxPool2d(kernel_size=2)))
            return nn.Sequential(OrderedDict(layers))

        self.blocks = nn.Sequential(
            OrderedDict(
                [
                    ("input", Conv2d(input_channels, n_hid, 7, device)),
                    ("group_1", group(n_hid, n_hid, True)),
                    ("group_2", group(n_hid, 2 * n_hid, True)),
                    ("group_3", group(2 * n_hid, 4 * n_hid, True)),
                    ("group_4", group(4 * n_hid, 8 * n_hid, False)),
                    (
                        "output",
                        nn.Sequential(
                            OrderedDict([("relu", nn.ReLU()), ("conv", Conv2d(8 * n_hid, vocab_size, 1, device))])
                        ),
                    ),
                ]
            )
        )
        self.requires_grad_(False)
        self.eval()
        self.precision = "fp32"
        self.fp32_logits = True
        self.channels_last = False
        self.fused: bool | str = "auto"
        self.pad_input_channels = 0
        self._compiled = None

    @property
    def config(self) -> dict:
        return dict(
            n_hid=self.n_hid,
            n_blk_per_group=self.n_blk_per_group,
            input_channels=self.in_channels,
            vocab_size=self.vocab_size,
        )

    def configure(
        self,
        *,
        precision: str | None = None,
        channels_last: bool | None = None,
        fp32_logits: bool | None = None,
        compile: bool | dict | None = None,
        check_range: bool | None = None,
        fused: bool | str | None = None,
        pad_input_channels: int | None = None,
    ) -> DalleEncoder:
        """Set the inference mode; ``None`` keeps a setting. ``precision`` "auto": see ``auto_precision``.
        ``compile`` is True or a dict of ``torch.compile`` keyword arguments. ``fused`` True runs the glue in
        ``beit_kernels.conv_epilogue`` (channels_last only: Triton on CUDA, its interpreter on CPU), False in
        PyTorch ops, "auto" (the default) fused for CUDA inputs (sm70 and newer: the kernel is elementwise, no
        tensor-core dot) when channels_last is on. ``pad_input_channels`` (fused path, half precision; 0, the
        default, or 1: none) zero-pads the image's 3 channels to a multiple of it for the 7x7 input convolution, as
        NVIDIA's convolution guide advises for tensor cores (cuDNN pads internally otherwise); the zeros add exact
        zeros, but the convolution may round differently. Off by default: slower on an H100 (bench_tokenizer.py's
        pad8 provider, bench/RESULTS.md). Every argument is checked before any setting changes."""
        if precision == "auto":
            precision = auto_precision(self.blocks.input.w.device)
        if precision is not None and precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)} or 'auto', got {precision!r}")
        if fused is not None and not (isinstance(fused, bool) or fused == "auto"):
            raise ValueError(f"fused must be True, False or 'auto', got {fused!r}")
        new_cl = self.channels_last if channels_last is None else bool(channels_last)
        new_fused = self.fused if fused is None else fused
        if new_fused is True and not new_cl:
            raise ValueError(
                "fused=True needs channels_last=True (the fused glue reads channels_last maps); pass fused=False or "
                "'auto' with channels_last=False"
            )
        if fused is True and not triton_available():
            raise ValueError("fused=True needs the triton package, which is not installed")
        if pad_input_channels is not None and (
            not isinstance(pad_input_channels, int) or isinstance(pad_input_channels, bool) or pad_input_channels < 0
        ):
            raise ValueError(f"pad_input_channels must be an int >= 0, got {pad_input_channels!r}")
        if compile is not None and not isinstance(compile, (bool, dict)):
            raise TypeError(f"compile must be True, False or a dict of torch.compile arguments, got {compile!r}")
        if precision is not None:
            self.precision = precision
        if channels_last is not None:
            self.channels_last = new_cl
            self.to(memory_format=torch.channels_last if new_cl else torch.contiguous_format)
        self.fused = new_fused
        if pad_input_channels is not None:
            self.pad_input_channels = pad_input_channels
        if fp32_logits is not None:
            self.fp32_logits = bool(fp32_logits)
        if check_range is not None:
            self.check_range = bool(check_range)
        if compile is not None:
            if compile is False:
                self._compiled = None
            else:
                kwargs = compile if isinstance(compile, dict) else {}
                self._compiled = torch.compile(self._logits_any, **kwargs)
        return self

    def uses_fused(self, device: torch.device) -> bool:
        """Whether inputs on ``device`` take the fused glue."""
        if self.fused == "auto":
            return (
                self.channels_last
                and device.type == "cuda"
                and triton_available()
                and torch.cuda.get_device_capability(device)[0] >= 7  # Triton's oldest GPU
            )
        return bool(self.fused)

    def _logits(self, x: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        fn = self._compiled if self._compiled is not None else self._logits_any
        return fn(x, positions)

    def _logits_any(self, x: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, vocab, H/8, W/8], or [B K, vocab, 1, 1] at ``positions`` [B, K] of the H/8 x W/8 grid (a
        padding entry computes position 0, for the caller to drop). In the compute dtype without ``fp32_logits``
        (bf16/fp16): argmax needs no fp32 copy of them."""
        r = self._trunk_fused(x) if self.uses_fused(x.device) else self._trunk_eager(x)
        return self._head(r, positions)

    def _head(self, r: torch.Tensor, positions: torch.Tensor | None) -> torch.Tensor:
        """The output 1x1 convolution on the ReLU'd features r [B, C, h, w] (the output module's ReLU is applied):
        in fp32 with ``fp32_logits`` (the official module's fp32 convolution, autocast off whatever the caller's),
        else under autocast in the compute dtype. At ``positions`` only the rows asked for are convolved."""
        if positions is not None:
            B, C, H, W = r.shape
            rows = r.permute(0, 2, 3, 1).reshape(B, H * W, C)  # [B, N, C]: a view of channels_last memory
            r = rows.gather(1, positions.clamp(min=0)[..., None].expand(-1, -1, C))  # [B, K, C]
            r = r.reshape(-1, C, 1, 1)  # [B K, C, 1, 1]
        dtype = PRECISIONS[self.precision]
        lowp = dtype is not None and not self.fp32_logits
        conv = self.blocks.output.conv
        with torch.autocast(r.device.type, dtype=dtype or torch.bfloat16, enabled=lowp):
            return F.conv2d(r, conv.w, conv.b)

    def _trunk_eager(self, x: torch.Tensor) -> torch.Tensor:
        """Everything before the output convolution, its ReLU included, in PyTorch ops: fp32 with ``fp32_logits``
        (or fp32 precision), else the compute dtype."""
        dtype = PRECISIONS[self.precision]
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if dtype is None:
            x = x.float()
        # Explicit autocast states both ways, so a caller's autocast region cannot change the tokenizer's precision.
        with torch.autocast(x.device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            h = x
            for name, module in self.blocks.named_children():
                if name != "output":
                    h = module(h)
            if dtype is not None and not self.fp32_logits:
                return self.blocks.output.relu(h)
        return self.blocks.output.relu(h.float())

    def _trunk_fused(self, x: torch.Tensor) -> torch.Tensor:
        """``_trunk_eager`` with the convolutions run without their biases and the glue in ``conv_epilogue``."""
        from beit_kernels import conv_epilogue

        dtype = PRECISIONS[self.precision]
        cl = torch.channels_last
        x = x.contiguous(memory_format=cl)
        if dtype is None:
            x = x.float()

        def conv(inp: torch.Tensor, m: Conv2d) -> torch.Tensor:
            return _conv_without_bias(inp, m.w, m.padding)  # the epilogue adds the bias

        blocks = self.blocks
        groups = [blocks.group_1, blocks.group_2, blocks.group_3, blocks.group_4]
        relu_dtype = torch.float32 if dtype is None or self.fp32_logits else dtype
        with torch.autocast(x.device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            # h: a block's input (for its identity path), r = relu(h) (for its residual path).
            h, r = conv_epilogue(self._input_conv(x), blocks.input.b, inplace=True)
            for gi, group in enumerate(groups):
                members = [m for name, m in group.named_children() if name != "pool"]
                pool = "pool" in group._modules
                for bi, blk in enumerate(members):
                    rp = blk.res_path
                    t = r
                    for layer in (rp.conv_1, rp.conv_2, rp.conv_3):
                        _, t = conv_epilogue(conv(t, layer), layer.b, return_out=False, inplace=True)
                    if isinstance(blk.id_path, Conv2d):
                        residual, residual_bias = conv(h, blk.id_path), blk.id_path.b
                    else:
                        residual, residual_bias = h, None
                    tail = dict(residual=residual, residual_bias=residual_bias, gain=blk.post_gain)
                    c4 = conv(t, rp.conv_4)
                    if gi == len(groups) - 1 and bi == len(members) - 1:
                        # The last block: only the output convolution reads it, through its ReLU.
                        _, r = conv_epilogue(c4, rp.conv_4.b, return_out=False, relu_dtype=relu_dtype,
                                             inplace=relu_dtype == c4.dtype, **tail)  # fmt: skip
                    elif bi == len(members) - 1 and pool:
                        h, r = conv_epilogue(c4, rp.conv_4.b, pool=True, **tail)
                    else:
                        h, r = conv_epilogue(c4, rp.conv_4.b, inplace=True, **tail)
        return r

    def _input_conv(self, x: torch.Tensor) -> torch.Tensor:
        """The 7x7 input convolution without its bias, channels_last; in half precision with
        ``pad_input_channels``, on x cast to the compute dtype and zero-padded to a multiple of that many
        channels (the weight padded alike)."""
        m = self.blocks.input
        dtype = PRECISIONS[self.precision]
        pad = -x.shape[1] % max(1, self.pad_input_channels)
        if not pad or dtype is None:  # fp32 has no half-precision tensor cores to gain
            return _conv_without_bias(x, m.w, m.padding)
        B, C, H, W = x.shape
        padded = torch.zeros((B, H, W, C + pad), dtype=dtype, device=x.device).permute(0, 3, 1, 2)  # channels_last
        padded[:, :C] = x
        w = F.pad(m.w.to(dtype), (0, 0, 0, 0, 0, pad))  # [out, C + pad, 7, 7]
        return _conv_without_bias(padded, w.contiguous(memory_format=torch.channels_last), m.padding)

    def _check_shape(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != self.in_channels:
            shape = list(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"expected images [B, {self.in_channels}, H, W], got {shape}")
        if not torch.is_floating_point(x):
            raise TypeError(f"expected float images (after map_pixels), got {x.dtype}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_shape(x)
        return self._logits(x).float()

    @torch.no_grad()
    def get_codebook_indices(self, images: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """Token ids [B, (H/8)*(W/8)] (int64) of images [B, 3, H, W] already passed through ``map_pixels``.

        With ``positions`` [B, K] (token indices in raster order, -1 padding: the masked patches' padded index),
        the output convolution and the argmax run on those positions only, and the other ids are -1. BEiT's loss
        reads the masked patches' tokens alone; at 75 of 196 that leaves out 62% of the 2048 -> 8192 output
        convolution (4.1 of the encoder's 52.1 GFLOP an image at 112 px) and of the fp32 logits.

        Runs under ``no_grad`` rather than ``inference_mode``: the ids become cross-entropy targets, and autograd
        refuses to save inference tensors for backward."""
        check_images(images, self.in_channels, self.patch_size, self.check_range)
        self.check_device(images)
        B = images.shape[0]
        n = self.num_tokens(images.shape[2], images.shape[3])
        if positions is None:
            return self._logits(images).argmax(dim=1).flatten(1)  # logits [B, vocab, H/8, W/8]
        positions = check_positions(positions, B, n, images.device)
        ids = self._logits(images, positions).argmax(dim=1).view(B, -1)  # logits [B K, vocab, 1, 1]
        return scatter_positions(ids, positions, n)

    @torch.no_grad()
    def get_codebook_probs(self, images: torch.Tensor) -> torch.Tensor:
        """Softmax over the vocabulary, [B, vocab, H/8, W/8] in fp32 (the official ``get_codebook_probs``)."""
        check_images(images, self.in_channels, self.patch_size, self.check_range)
        self.check_device(images)
        return torch.softmax(self._logits(images).float(), dim=1)


# ----------------------------------------------------------------------------------------------------------------
# Reading encoder.pkl without running it


class _PickledModule:
    """An inert stand-in for a module class named in the pickle: it keeps the unpickled attribute dict and runs
    nothing else. Subclassed once per allowed class so the original name stays known."""

    pickled_name = "?"
    # torch's legacy (pre-1.6) loader reads this when the saved class source differs from ours; False = no patch file.
    dump_patches = False

    def __setstate__(self, state) -> None:
        if not isinstance(state, dict):
            raise pickle.UnpicklingError(f"unexpected state of type {type(state).__name__} for {self.pickled_name}")
        self.__dict__["state"] = state

    def __repr__(self) -> str:
        return f"<pickled {self.pickled_name}>"


_MODULE_CLASSES = {
    ("dall_e.encoder", "Encoder"),
    ("dall_e.encoder", "EncoderBlock"),
    ("dall_e.utils", "Conv2d"),
    ("torch.nn.modules.container", "Sequential"),
    ("torch.nn.modules.activation", "ReLU"),
    ("torch.nn.modules.pooling", "MaxPool2d"),
    ("torch.nn.modules.linear", "Identity"),
}
_STANDINS = {
    key: type(f"Pickled_{key[1]}", (_PickledModule,), {"pickled_name": ".".join(key)}) for key in _MODULE_CLASSES
}
# Callables a torch.save'd module needs: tensor and parameter rebuilding, the containers of nn.Module's state and
# torch.device (the encoder keeps its construction device as an attribute). None of them runs code named by the file.
_CALLABLES = {
    ("torch._utils", "_rebuild_tensor"): torch._utils._rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): torch._utils._rebuild_parameter_with_state,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch", "device"): torch.device,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
}


class RestrictedUnpickler(pickle.Unpickler):
    """Resolves only the names of ``_MODULE_CLASSES`` (to stand-ins) and ``_CALLABLES``; storages are resolved by
    torch's loader before this is asked."""

    def find_class(self, module: str, name: str):
        if module == "__builtin__":  # protocol 2 files written by Python 3 use the Python 2 name
            module = "builtins"
        key = (module, name)
        if key in _STANDINS:
            return _STANDINS[key]
        if key in _CALLABLES:
            return _CALLABLES[key]
        if module.startswith("dall_e.decoder"):
            raise pickle.UnpicklingError(
                f"the file holds {module}.{name}: it is the DALL-E decoder (decoder.pkl); the tokenizer needs "
                "the encoder (encoder.pkl)"
            )
        raise pickle.UnpicklingError(
            f"the pickle references {module}.{name}, which is not part of the DALL-E encoder; refusing to load it "
            "(unpickling unknown classes can run arbitrary code)"
        )


def _restricted_pickle_module() -> types.ModuleType:
    mod = types.ModuleType("beit_restricted_pickle")
    mod.Unpickler = RestrictedUnpickler
    mod.load = lambda f, **kw: RestrictedUnpickler(f, **kw).load()
    mod.loads = lambda b, **kw: RestrictedUnpickler(io.BytesIO(b), **kw).load()
    return mod


def _collect_tensors(obj: _PickledModule, prefix: str, out: dict[str, torch.Tensor]) -> None:
    state = obj.state
    skip = set(state.get("_non_persistent_buffers_set") or ())
    for attr in ("_parameters", "_buffers"):
        for name, value in (state.get(attr) or {}).items():
            if value is None or name in skip:
                continue
            if not isinstance(value, torch.Tensor):
                raise ValueError(f"{prefix}{name} holds a {type(value).__name__}, expected a tensor")
            out[prefix + name] = value.detach()
    for name, child in (state.get("_modules") or {}).items():
        if child is None:
            continue
        if not isinstance(child, _PickledModule):
            raise ValueError(f"submodule {prefix}{name} is a {type(child).__name__}, expected a module")
        _collect_tensors(child, f"{prefix}{name}.", out)


def _torch_load_restricted(path: Path) -> object:
    try:
        with warnings.catch_warnings():
            # The legacy format stores class sources and warns that our stand-ins' sources differ: expected.
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", pickle_module=_restricted_pickle_module(), weights_only=False)
    except pickle.UnpicklingError as e:
        msg = str(e)
        if "refusing" in msg or "decoder" in msg:
            raise ValueError(f"{path}: {msg}; expected {EXPECTED_FILE}") from None
        raise ValueError(f"{path} is not a torch pickle ({msg}); expected {EXPECTED_FILE}") from None
    except RuntimeError as e:
        if "explicit pickle_module" in str(e):
            raise RuntimeError(
                "TORCH_FORCE_WEIGHTS_ONLY_LOAD is set, which rules out the restricted unpickler needed for "
                f"{path}; unset it, or convert the file once to a state dict (.safetensors) elsewhere"
            ) from None
        raise ValueError(
            f"{path} could not be read as a torch file ({str(e).splitlines()[0]}): truncated or corrupt? "
            f"expected {EXPECTED_FILE}"
        ) from None
    except (EOFError, OSError) as e:
        raise ValueError(
            f"{path} ends early or cannot be read ({e}): truncated download? expected {EXPECTED_FILE}"
        ) from None
    except (TypeError, ValueError, AttributeError, IndexError, KeyError, OverflowError, MemoryError) as e:
        # An allowed callable (OrderedDict, torch.device, a tensor rebuild) given arguments no torch.save writes.
        first = str(e).splitlines()[0] if str(e) else ""
        raise ValueError(
            f"{path} is not a valid torch pickle of the DALL-E encoder ({type(e).__name__}: {first}); "
            f"expected {EXPECTED_FILE}"
        ) from None


def read_dalle_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The encoder's tensors from ``encoder.pkl`` (a pickled ``dall_e.encoder.Encoder``, zip or legacy torch
    format) or from a state dict (.pt/.pth/.safetensors), with the official names. Runs no code from the file."""
    path = as_path(path)
    sniff_weights_file(path, EXPECTED_FILE)
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            obj = load_file(str(path), device="cpu")
        except SafetensorError as e:
            raise ValueError(f"{path} is not a valid safetensors file ({e}); expected {EXPECTED_FILE}") from None
    else:
        obj = _torch_load_restricted(path)
    if isinstance(obj, _PickledModule):
        if obj.pickled_name != "dall_e.encoder.Encoder":
            raise ValueError(f"{path} holds a pickled {obj.pickled_name}; expected a dall_e.encoder.Encoder")
        sd: dict[str, torch.Tensor] = {}
        _collect_tensors(obj, "", sd)
        return sd
    if isinstance(obj, dict):
        for key in ("state_dict", "model", "encoder"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
        sd = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        if not sd:
            raise ValueError(f"{path} holds a dict without tensors; expected {EXPECTED_FILE}")
        # Wrappers (BEiT's Dalle_VAE keeps the encoder as .encoder, DDP adds module.) prefix every key.
        for prefix in ("module.", "encoder."):
            if all(k.startswith(prefix) for k in sd):
                sd = {k[len(prefix) :]: v for k, v in sd.items()}
        return sd
    raise ValueError(f"{path} holds a {type(obj).__name__}; expected {EXPECTED_FILE}")


def infer_config(sd: dict[str, torch.Tensor], source: str = "the state dict") -> dict:
    """Encoder hyper-parameters from tensor shapes; a clear error when the keys are not the encoder's."""
    if "blocks.input.w" not in sd or "blocks.output.conv.w" not in sd:
        hint = ""
        if "codebook" in sd:
            hint = " (it is a k-means tokenizer: use the spec kmeans:PATH)"
        elif any(k.startswith(("blocks.0.", "patch_embed.", "beit.")) for k in sd):
            hint = " (it looks like a BEiT model checkpoint)"
        raise ValueError(
            f"{source} has no 'blocks.input.w' / 'blocks.output.conv.w'{hint}; first keys: {sorted(sd)[:5]}; "
            f"expected {EXPECTED_FILE}"
        )
    w_in, w_out = sd["blocks.input.w"], sd["blocks.output.conv.w"]
    if w_in.dim() != 4 or w_out.dim() != 4:
        raise ValueError(f"{source}: the input/output convolution weights are not 4-D; expected {EXPECTED_FILE}")
    blocks = {int(m.group(1)) for k in sd if (m := re.fullmatch(r"blocks\.group_1\.block_(\d+)\..*", k))}
    return dict(
        n_hid=w_in.shape[0],
        input_channels=w_in.shape[1],
        vocab_size=w_out.shape[0],
        n_blk_per_group=max(blocks, default=0),
    )


def dalle_encoder_from_state_dict(sd: dict[str, torch.Tensor], source: str = "the state dict") -> DalleEncoder:
    """Build an encoder of the right size and load ``sd`` into it strictly (every mismatch is named)."""
    cfg = infer_config(sd, source)
    if cfg["n_blk_per_group"] < 1:
        raise ValueError(f"{source} has no blocks.group_1.block_* weights; expected {EXPECTED_FILE}")
    with torch.device("meta"):
        skeleton = DalleEncoder(**cfg)
    expected = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    wrong = [
        f"{k}: {tuple(sd[k].shape)} vs {expected[k]}" for k in expected if k in sd and tuple(sd[k].shape) != expected[k]
    ]
    if missing or unexpected or wrong:
        parts = []
        for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
            if items:
                parts.append(f"{label} ({len(items)}): {', '.join(items[:6])}{' ...' if len(items) > 6 else ''}")
        raise ValueError(f"{source} does not match a DALL-E encoder with {cfg}: " + "; ".join(parts))
    bad = [k for k, v in sd.items() if not torch.is_floating_point(v) or not torch.isfinite(v).all()]
    if bad:
        raise ValueError(f"{source} has non-float or non-finite values in {', '.join(bad[:6])}")
    # assign=True adopts the file's tensors instead of copying them into a second, randomly initialised set.
    skeleton.load_state_dict({k: v.float().contiguous() for k, v in sd.items()}, strict=True, assign=True)
    return skeleton


def load_dalle_encoder(
    path: str | os.PathLike, device: torch.device | str | None = None, **configure_kwargs
) -> DalleEncoder:
    """Read ``encoder.pkl`` (or an encoder state dict) and return a frozen :class:`DalleEncoder` on ``device``,
    configured with ``configure_kwargs`` (``precision``, ``channels_last``, ``fp32_logits``, ``compile``)."""
    path = as_path(path)
    sd = read_dalle_state_dict(path)
    encoder = dalle_encoder_from_state_dict(sd, str(path))
    if device is not None:
        encoder.to(device)
    return encoder.configure(**configure_kwargs)
