"""FLOP counts for MFU: the BEiT encoder and head per training image, the tokenizers, and device peaks.

Counts are multiply-accumulates times two, from the layer shapes (the convention of timm's GMAC figures times
two: BEiT-B/16 at 224 px is 17.56 GMAC forward; ../shared/reference/perf_anchors.md section 6). A training step
costs three forwards (forward, and a backward of twice the forward); the tokenizer runs forward only.
"""

from __future__ import annotations

import torch

# Dense bf16/fp16 tensor-core peaks (NVIDIA datasheets), by a substring of the device name.
PEAK_FLOPS = (
    ("H100 PCIe", 756e12),
    ("H100", 989.4e12),
    ("H200", 989.4e12),
    ("A100", 312e12),
    ("V100", 125e12),
)


def encoder_macs_per_image(config, num_masked: float) -> float:
    """Forward MACs of the BEiT encoder and the MIM head on ``num_masked`` rows, per image."""
    img = config.img_size if isinstance(config.img_size, (tuple, list)) else (config.img_size, config.img_size)
    n = (img[0] // config.patch_size) * (img[1] // config.patch_size)
    t = n + 1
    d = config.embed_dim
    hidden = int(d * config.mlp_ratio)
    head_dim = config.attn_head_dim or d // config.num_heads
    inner = head_dim * config.num_heads
    per_block = t * d * 3 * inner + 2 * t * t * inner + t * inner * d + 2 * t * d * hidden
    patch = n * d * config.in_chans * config.patch_size**2
    head = num_masked * d * config.vocab_size
    return patch + config.depth * per_block + head


def train_flops_per_image(config, num_masked: float) -> float:
    return 3 * 2 * encoder_macs_per_image(config, num_masked)


def dalle_encoder_macs(
    image_size: int, n_hid: int = 256, vocab_size: int = 8192, num_positions: float | None = None
) -> float:
    """Forward MACs of the DALL-E dVAE encoder on one ``image_size`` x ``image_size`` image (26.06 G at 112 px);
    with ``num_positions``, the output convolution on that many token positions only (``get_codebook_indices(images,
    positions)``)."""
    if num_positions is not None and (isinstance(num_positions, (bool, torch.Tensor)) or num_positions < 0):
        raise TypeError(f"num_positions must be a non-negative number of positions, got {num_positions!r}")
    macs = 0.0
    s = image_size
    macs += s * s * 3 * n_hid * 49  # 7x7 input conv
    widths = [n_hid, n_hid, 2 * n_hid, 4 * n_hid, 8 * n_hid]
    for g in range(4):
        n_in, n_out = widths[g], widths[g + 1]
        for blk in range(2):
            cin = n_in if blk == 0 else n_out
            h = n_out // 4
            if cin != n_out:
                macs += s * s * cin * n_out  # 1x1 id path
            macs += s * s * (cin * h * 9 + h * h * 9 + h * h * 9 + h * n_out)
        if g < 3:
            s //= 2
    macs += (s * s if num_positions is None else num_positions) * widths[-1] * vocab_size  # 1x1 output conv
    return macs


def tokenizer_flops_per_image(tokenizer, image_size: int, num_positions: float | None = None) -> float:
    """Forward FLOPs of ``tokenizer`` on one ``image_size`` view: the DALL-E encoder's, at its own width and
    vocabulary (its output convolution on ``num_positions`` token positions when given); 0 for the k-means
    tokenizer, whose nearest-centroid search is small next to the model."""
    if "dalle" in type(tokenizer).__name__.lower():
        return 2 * dalle_encoder_macs(image_size, tokenizer.n_hid, tokenizer.vocab_size, num_positions)
    return 0.0


def peak_flops(device: torch.device | str | None = None) -> float | None:
    """The dense bf16 tensor-core peak of a known CUDA device, else None (MFU is then not reported)."""
    device = torch.device(device) if device is not None else None
    if device is None or device.type != "cuda" or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(device)
    for key, flops in PEAK_FLOPS:
        if key in name:
            return flops
    return None
