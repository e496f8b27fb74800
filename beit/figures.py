"""Figures drawn with PIL alone (no plotting library is a dependency): ``line_chart`` for curves such as the
paper's Figure 5 (validation accuracy against epochs, BEiT fine-tuned against trained from scratch).

Coordinates: a data point (x, y) is drawn at the pixel

    px = left + (x - x0) / (x1 - x0) * (right - left)
    py = bottom - (y - y0) / (y1 - y0) * (bottom - top)

rounded to the nearest integer, where (left, top, right, bottom) is the plot area and (x0, x1), (y0, y1) the axis
limits; ``line_chart`` returns them (``ChartLayout``) so a caller can place things on the figure.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

# One colour per series, in order (Tableau 10): distinct from each other and from the chart's greys.
COLORS: tuple[tuple[int, int, int], ...] = (
    (31, 119, 180),
    (214, 39, 40),
    (44, 160, 44),
    (255, 127, 14),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (23, 190, 207),
)
BACKGROUND = (255, 255, 255)
FRAME = (60, 60, 60)
GRID = (228, 228, 228)
TEXT = (20, 20, 20)
MARKER_RADIUS = 4
LINE_WIDTH = 2
X_PAD = 0.04  # the x axis reaches this fraction of the data's x range past each end, so markers clear the frame
Y_PAD = 0.06  # the same for the y axis when no ``ylim`` is given


@dataclass(frozen=True)
class ChartLayout:
    """Where ``line_chart`` drew: the image ``size`` (width, height), the plot area ``box`` (left, top, right,
    bottom) in pixels, and the axis limits ``xlim`` = (x0, x1), ``ylim`` = (y0, y1) at the box's edges."""

    size: tuple[int, int]
    box: tuple[int, int, int, int]
    xlim: tuple[float, float]
    ylim: tuple[float, float]

    def to_pixel(self, x: float, y: float) -> tuple[int, int]:
        left, top, right, bottom = self.box
        (x0, x1), (y0, y1) = self.xlim, self.ylim
        px = left + (x - x0) / (x1 - x0) * (right - left)
        py = bottom - (y - y0) / (y1 - y0) * (bottom - top)
        return round(px), round(py)


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)  # a scalable font where PIL has FreeType
    except TypeError:  # Pillow before 10.1: only the fixed bitmap font
        return ImageFont.load_default()


def _finite(values, what: str) -> list[float]:
    out = []
    for v in values:
        if isinstance(v, bool):
            raise ValueError(f"{what}: {v!r} is not a number")
        try:
            f = float(v)
        except (TypeError, ValueError):
            raise ValueError(f"{what}: {v!r} is not a number") from None
        if not math.isfinite(f):
            raise ValueError(f"{what}: {v!r} is not finite")
        out.append(f)
    return out


def _check_series(series) -> dict[str, tuple[list[float], list[float]]]:
    if not isinstance(series, Mapping):
        raise TypeError(f"series must be a dict name -> (xs, ys), got {type(series).__name__}")
    if not series:
        raise ValueError("no series to plot")
    if len(series) > len(COLORS):
        raise ValueError(f"at most {len(COLORS)} series can be told apart by colour, got {len(series)}")
    checked = {}
    for name, pair in series.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"series names must be non-empty strings, got {name!r}")
        if not isinstance(pair, Sequence) or isinstance(pair, str) or len(pair) != 2:
            raise ValueError(f"series {name!r}: expected a pair (xs, ys)")
        xs, ys = (_finite(v, f"series {name!r} {axis}") for v, axis in zip(pair, ("x", "y")))
        if not xs:
            raise ValueError(f"series {name!r} has no points")
        if len(xs) != len(ys):
            raise ValueError(f"series {name!r}: {len(xs)} x values but {len(ys)} y values")
        checked[name] = (xs, ys)
    return checked


def _limits(lo: float, hi: float, pad: float) -> tuple[float, float]:
    if hi > lo:
        return lo - pad * (hi - lo), hi + pad * (hi - lo)
    half = 0.5 if lo == 0 else 0.1 * abs(lo)  # one distinct value: a window around it
    return lo - half, hi + half


def nice_ticks(lo: float, hi: float, target: int = 6) -> tuple[list[float], int]:
    """Tick values in [lo, hi] at a step of 1, 2, 2.5 or 5 times a power of ten, at most ``target`` + 1 of them,
    and the number of decimals that prints them exactly."""
    span = hi - lo
    mag = 10.0 ** math.floor(math.log10(span / target))
    for m in (1.0, 2.0, 2.5, 5.0, 10.0):
        step = m * mag
        if span / step <= target:
            break
    first = math.ceil(lo / step - 1e-9)
    ticks = []
    i = first
    while i * step <= hi + 1e-9 * span:
        ticks.append(i * step)
        i += 1
    decimals = max(0, -math.floor(math.log10(step) + 1e-12)) + (1 if m == 2.5 else 0)
    return ticks, decimals


def _text_size(draw, text: str, font) -> tuple[int, int]:
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    return right - left, bottom - top


def line_chart(
    series: dict[str, tuple[list[float], list[float]]],
    path: str | os.PathLike,
    *,
    title: str,
    xlabel: str,
    ylabel: str,
    ylim: tuple[float, float] | None = None,
    size: tuple[int, int] = (720, 460),
) -> ChartLayout:
    """Write a PNG line chart to ``path``: one line with a marker on each point per series, in ``COLORS`` order,
    points joined in the order given; axes with ticks and numeric labels, light grid lines, a legend right of the
    plot, the title above it.

    ``series``: name -> (xs, ys), equal lengths, at least one point, finite numbers; at most ``len(COLORS)``
    series. The x axis spans the data's x range plus ``X_PAD`` of it each side; the y axis spans ``ylim`` when
    given (every y must lie inside it), else the data's y range plus ``Y_PAD``. ``size`` (width, height) in pixels.
    Everything is checked before anything is drawn or written. Returns the ``ChartLayout``."""
    from PIL import Image, ImageDraw

    data = _check_series(series)
    width, height = (int(v) for v in size)
    if width < 240 or height < 160:
        raise ValueError(f"size {size} is too small for a chart (at least 240 x 160)")
    xs_all = [x for xs, _ in data.values() for x in xs]
    ys_all = [y for _, ys in data.values() for y in ys]
    if ylim is not None:
        bounds = _finite(ylim, "ylim")
        if len(bounds) != 2 or not bounds[0] < bounds[1]:
            raise ValueError(f"ylim must be (low, high) with low < high, got {tuple(ylim)}")
        y0, y1 = bounds
        outside = [y for y in ys_all if not y0 <= y <= y1]
        if outside:
            raise ValueError(f"ylim {(y0, y1)} leaves out y values {outside[:5]}")
    else:
        y0, y1 = _limits(min(ys_all), max(ys_all), Y_PAD)
    x0, x1 = _limits(min(xs_all), max(xs_all), X_PAD)
    xticks, xdec = nice_ticks(x0, x1)
    yticks, ydec = nice_ticks(y0, y1)
    xlabels = [f"{t:.{xdec}f}" for t in xticks]
    ylabels = [f"{t:.{ydec}f}" for t in yticks]

    img = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(img)
    font, title_font = _font(13), _font(16)
    tick_h = max(_text_size(draw, s, font)[1] for s in xlabels + ylabels + ["0"])
    ytick_w = max(_text_size(draw, s, font)[0] for s in ylabels)
    label_h = _text_size(draw, "Ag", font)[1]
    swatch = 28
    legend_w = swatch + 8 + max(_text_size(draw, name, font)[0] for name in data) + 12

    top = _text_size(draw, title, title_font)[1] + 24 if title else 16
    left = 12 + label_h + 10 + ytick_w + 8
    right = width - legend_w - 16
    bottom = height - (8 + tick_h + 10 + label_h + 12)
    if right - left < 80 or bottom - top < 60:
        raise ValueError(f"size {size} leaves no room for the plot next to the labels and the legend")
    layout = ChartLayout((width, height), (left, top, right, bottom), (x0, x1), (y0, y1))

    # grid and frame under the data, so markers on the frame stay visible
    for t in xticks:
        px = layout.to_pixel(t, y0)[0]
        draw.line([(px, top), (px, bottom)], fill=GRID)
    for t in yticks:
        py = layout.to_pixel(x0, t)[1]
        draw.line([(left, py), (right, py)], fill=GRID)
    draw.rectangle([left, top, right, bottom], outline=FRAME)
    for t, s in zip(xticks, xlabels):
        px = layout.to_pixel(t, y0)[0]
        draw.line([(px, bottom), (px, bottom + 5)], fill=FRAME)
        draw.text((px, bottom + 8), s, fill=TEXT, font=font, anchor="mt")
    for t, s in zip(yticks, ylabels):
        py = layout.to_pixel(x0, t)[1]
        draw.line([(left - 5, py), (left, py)], fill=FRAME)
        draw.text((left - 8, py), s, fill=TEXT, font=font, anchor="rm")

    for (xs, ys), color in zip(data.values(), COLORS):
        points = [layout.to_pixel(x, y) for x, y in zip(xs, ys)]
        if len(points) > 1:
            draw.line(points, fill=color, width=LINE_WIDTH)
    r = MARKER_RADIUS
    for (xs, ys), color in zip(data.values(), COLORS):
        for px, py in (layout.to_pixel(x, y) for x, y in zip(xs, ys)):
            draw.ellipse([px - r, py - r, px + r, py + r], fill=color, outline=color)

    if title:
        draw.text(((left + right) // 2, 10), title, fill=TEXT, font=title_font, anchor="mt")
    draw.text(((left + right) // 2, height - 10), xlabel, fill=TEXT, font=font, anchor="mb")
    if ylabel:
        w, h = _text_size(draw, ylabel, font)
        tile = Image.new("RGB", (w + 4, h + 6), BACKGROUND)
        ImageDraw.Draw(tile).text((2, 0), ylabel, fill=TEXT, font=font)
        tile = tile.rotate(90, expand=True)
        img.paste(tile, (10, max(0, (top + bottom) // 2 - tile.height // 2)))

    lx, ly = right + 14, top + 4
    for name, color in zip(data, COLORS):
        cy = ly + label_h // 2 + 2
        draw.line([(lx, cy), (lx + swatch, cy)], fill=color, width=LINE_WIDTH)
        draw.ellipse([lx + swatch // 2 - r, cy - r, lx + swatch // 2 + r, cy + r], fill=color, outline=color)
        draw.text((lx + swatch + 8, cy), name, fill=TEXT, font=font, anchor="lm")
        ly += label_h + 12

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format="PNG")
    return layout
