"""A procedurally generated ImageFolder for demos, tests and benchmarks (``make_synthetic``), and its console
script ``beit-make-synthetic OUT --num-images N --classes C`` (``main``; also ``python -m beit.data``)."""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np


def synthetic_image(rng: np.random.Generator, width: int = 500, height: int = 375, axis: np.ndarray | None = None):
    """A procedurally generated PIL image: a gradient or noise texture background with random ellipses,
    rectangles, polygons and lines, sometimes stripes and blur. Colours are uniform in RGB, or with ``axis`` (an
    RGB direction, largest component 1) mid-grey plus or minus a random 35-100 % of the way along it."""
    from PIL import Image, ImageDraw, ImageFilter

    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    kind = rng.integers(3)

    def colour():
        if axis is None:
            return rng.uniform(0, 255, 3)
        return 127.5 + rng.choice((-1.0, 1.0)) * rng.uniform(0.35, 1.0) * 127.5 * axis

    c0, c1 = colour(), colour()
    if kind == 0:  # linear gradient in a random direction
        angle = rng.uniform(0, 2 * np.pi)
        t = (np.cos(angle) * xx + np.sin(angle) * yy) / (width + height) + 0.5
    elif kind == 1:  # sinusoidal texture
        fx, fy = rng.uniform(0.01, 0.15, 2)
        t = 0.5 + 0.5 * np.sin(fx * xx + rng.uniform(0, 6)) * np.cos(fy * yy + rng.uniform(0, 6))
    else:  # smooth noise: coarse random grid upsampled
        coarse = rng.random((rng.integers(3, 12), rng.integers(3, 12))).astype(np.float32)
        t = np.asarray(Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC))
    t = np.clip(t, 0, 1)[..., None]
    bg = (c0 * (1 - t) + c1 * t + rng.normal(0, rng.uniform(0, 12), (height, width, 3))).clip(0, 255)
    img = Image.fromarray(bg.astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(rng.integers(3, 15)):
        color = tuple(int(v) for v in np.clip(colour(), 0, 255))
        x0, y0 = rng.integers(-50, width), rng.integers(-50, height)
        x1, y1 = x0 + rng.integers(10, width // 2), y0 + rng.integers(10, height // 2)
        shape = rng.integers(4)
        if shape == 0:
            draw.ellipse((x0, y0, x1, y1), fill=color)
        elif shape == 1:
            draw.rectangle((x0, y0, x1, y1), fill=color)
        elif shape == 2:
            pts = [(int(rng.integers(0, width)), int(rng.integers(0, height))) for _ in range(rng.integers(3, 7))]
            draw.polygon(pts, fill=color)
        else:
            draw.line((x0, y0, x1, y1), fill=color, width=int(rng.integers(1, 12)))
    if rng.random() < 0.3:
        img = img.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.5, 3))))
    return img


def class_colour_axes(classes: int) -> np.ndarray:
    """[classes, 3] colour axes through mid-grey: achromatic, red-cyan, green-magenta, blue-yellow, then seeded
    random directions. Each scaled so its largest component is 1."""
    fixed = np.array([[1, 1, 1], [1, -1, -1], [-1, 1, -1], [-1, -1, 1]], dtype=np.float64)
    extra = np.random.default_rng(12345).normal(size=(max(classes - 4, 0), 3))
    axes = np.concatenate([fixed, extra])[:classes]
    return axes / np.abs(axes).max(1, keepdims=True)


def make_synthetic(
    out: str | os.PathLike,
    num_images: int,
    classes: int = 10,
    *,
    seed: int = 0,
    size: tuple[int, int] = (500, 375),
    gray_fraction: float = 0.1,
    png_fraction: float = 0.1,
) -> list[str]:
    """Write ``num_images`` synthetic images into ``out/class_XXX/`` (an ImageFolder): JPEG at quality 75-95, a
    ``gray_fraction`` of grayscale ones and a ``png_fraction`` of PNGs; sizes vary by up to 20% around ``size``.
    Deterministic for a seed. Returns the paths written.

    Image n goes to class n % classes, whose colours all lie on that class's axis through mid-grey
    (``class_colour_axes``), symmetric about it: every class has the same expected mean colour, so a linear
    function of the mean pixel separates them poorly, while an encoder that knows which colours its patches hold
    separates them well. That is the linear probe's test of the demo: what MIM on k-means tokens teaches, a random
    encoder lacks (numbers in beit.linprobe)."""
    if num_images <= 0 or classes <= 0:
        raise ValueError(f"num_images and classes must be positive, got {num_images} and {classes}")
    out = Path(out)
    rng = np.random.default_rng(seed)
    paths = []
    axes = class_colour_axes(classes)
    for c in range(classes):
        (out / f"class_{c:03d}").mkdir(parents=True, exist_ok=True)
    for n in range(num_images):
        w = int(size[0] * rng.uniform(0.8, 1.2))
        h = int(size[1] * rng.uniform(0.8, 1.2))
        img = synthetic_image(rng, w, h, axes[n % classes])
        if rng.random() < gray_fraction:
            img = img.convert("L")
        folder = out / f"class_{n % classes:03d}"
        if rng.random() < png_fraction:
            path = folder / f"img_{n:06d}.png"
            img.save(path)
        else:
            path = folder / f"img_{n:06d}.jpg"
            img.save(path, quality=int(rng.integers(75, 96)))
        paths.append(str(path))
    return paths


def main(argv: Sequence[str] | None = None) -> int:
    """``beit-make-synthetic``: write a synthetic ImageFolder."""
    p = argparse.ArgumentParser(prog="beit-make-synthetic", description=make_synthetic.__doc__)
    p.add_argument("out", help="output folder (class subfolders are created in it)")
    p.add_argument("--num-images", type=int, default=1000)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--width", type=int, default=500)
    p.add_argument("--height", type=int, default=375)
    args = p.parse_args(argv)
    paths = make_synthetic(args.out, args.num_images, args.classes, seed=args.seed, size=(args.width, args.height))
    print(f"wrote {len(paths)} images in {args.classes} classes to {args.out}")
    return 0
