"""Packaging for the BEiT pretraining stack.

The repository keeps its source in ``beit/`` and ``kernels/beit_kernels/``. ``kernels/`` itself is not a package
(no ``__init__.py``): ``kernels`` (and ``bench``) are names taken on PyPI, transformers imports the ``kernels``
package, and ``python -m`` puts the repository root first on ``sys.path``, where a package folder named
``kernels`` would shadow the installed one. A folder without ``__init__.py`` is only a namespace candidate, which
loses to a regular package anywhere on the path. ``bench/`` and ``tests/`` are never installed: the package list
is explicit.
"""

import re
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).parent


def _version() -> str:
    text = (ROOT / "beit" / "__init__.py").read_text()
    return re.search(r'^__version__ = "([^"]+)"', text, re.M).group(1)


DALI = [
    # CUDA 13 wheel; on CUDA 12 machines install nvidia-dali-cuda120 instead (see README).
    "nvidia-dali-cuda130",
]

DEV = [
    "pytest>=7",
    "pytest-benchmark>=4",
    "hypothesis>=6",
    "ruff>=0.5",
    # Interop tests compare against an independent BEiT implementation.
    "transformers>=4.40",
    # The relative-position-table resize is tested against FITPACK's bicubic spline (the official code's interp2d).
    "scipy",
    # dall-e 0.1 is installed with --no-deps by the README's test command: its metadata asks for torchvision,
    # which would replace the installed torch by a multi-GB CUDA build. These are what it imports.
    "attrs",
    "requests",
    *DALI,
]

setup(
    name="beit-stack",
    version=_version(),
    description="Fast, faithful BEiT masked-image-modeling pretraining: Triton kernels, DALI data, trainer.",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.10,<3.13",
    packages=["beit", "beit.data", "beit.tokenizer", "beit_kernels"],
    package_dir={"beit": "beit", "beit_kernels": "kernels/beit_kernels"},
    install_requires=[
        "torch>=2.3",
        "triton>=3.0; platform_system == 'Linux'",
        "numpy>=1.24",
        "safetensors>=0.4",
        "tqdm>=4.60",
        "pillow>=9",
        "pyyaml>=5",
    ],
    extras_require={
        "dali": DALI,
        "dev": DEV,
        "bench": ["xformers", "matplotlib"],
    },
    entry_points={
        "console_scripts": [
            "beit-env=beit.env:main",
            "beit-pretrain=beit.train:main",
            "beit-finetune=beit.finetune:main",
            "beit-attention-map=beit.attention_map:main",
            "beit-export=beit.export:main",
            "beit-linprobe=beit.linprobe:main",
            "beit-tokenizer=beit.tokenizer:main",
            "beit-make-synthetic=beit.data.synthetic:main",
        ],
    },
    classifiers=[
        "Programming Language :: Python :: 3.10",
        "Programming Language :: Python :: 3.11",
        "Programming Language :: Python :: 3.12",
        "Operating System :: POSIX :: Linux",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
