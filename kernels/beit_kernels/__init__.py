"""beit_kernels: Triton kernels for BEiT pretraining, each with a plain-PyTorch reference.

This package imports torch and triton only, never ``beit``, so other ViT code bases can use it on its own.
``beit_kernels.reference`` holds the plain-PyTorch reference of each public op (same signature); tests,
benchmarks and the CPU path all use it. ``beit_kernels.backend`` tells which devices the Triton path suits.
``beit_kernels.tuning`` holds every kernel's tile and switch choices, and ``tuning.override`` changes them for a
block of code.
"""

from beit_kernels import tuning
from beit_kernels.backend import (
    IMPLS,
    resolve_impl,
    triton_available,
    triton_matmul_ok,
)

# Triton ships for Linux only; elsewhere the package still imports, with the reference path alone.
if triton_available():
    from beit_kernels.attention import attention, attention_qkvpacked
    from beit_kernels.bias_gelu import bias_gelu
    from beit_kernels.conv_epilogue import conv_epilogue
    from beit_kernels.layer_norm import add_layer_norm
    from beit_kernels.linear_cross_entropy import linear_cross_entropy
    from beit_kernels.masked_gather import masked_gather
    from beit_kernels.patch_embed import patch_embed

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "IMPLS",
    "add_layer_norm",
    "attention",
    "attention_qkvpacked",
    "bias_gelu",
    "conv_epilogue",
    "linear_cross_entropy",
    "masked_gather",
    "patch_embed",
    "resolve_impl",
    "triton_available",
    "triton_matmul_ok",
    "tuning",
]
