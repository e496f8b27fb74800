"""beit.figures.line_chart: a PNG drawn with PIL whose points lie where the data puts them."""

import math

import pytest
from PIL import Image

from beit.figures import BACKGROUND, COLORS, FRAME, line_chart, nice_ticks

FINETUNED = ([1, 2, 3, 4, 5, 6], [35.0, 52.5, 61.0, 66.0, 69.5, 71.0])
SCRATCH = ([1, 2, 3, 4, 5, 6], [12.0, 18.0, 24.5, 29.0, 33.0, 36.0])


def _pixel(box, xlim, ylim, x, y):
    # the linear map from data to pixels, written out here rather than taken from the module
    left, top, right, bottom = box
    px = left + (x - xlim[0]) * (right - left) / (xlim[1] - xlim[0])
    py = bottom - (y - ylim[0]) * (bottom - top) / (ylim[1] - ylim[0])
    return math.floor(px + 0.5), math.floor(py + 0.5)


def _near(img, xy, color, radius=1):
    x, y = xy
    return any(
        img.getpixel((x + dx, y + dy)) == color
        for dx in range(-radius, radius + 1)
        for dy in range(-radius, radius + 1)
    )


def test_line_chart_draws_each_series_at_its_data(tmp_path):
    path = tmp_path / "fig5.png"
    layout = line_chart(
        {"BEiT fine-tuned": FINETUNED, "from scratch": SCRATCH},
        path,
        title="Validation accuracy",
        xlabel="epoch",
        ylabel="top-1 (%)",
        ylim=(0, 100),
        size=(640, 400),
    )
    img = Image.open(path).convert("RGB")
    assert img.size == (640, 400) == layout.size
    assert layout.ylim == (0.0, 100.0)
    x0, x1 = layout.xlim
    assert x0 < 1 and x1 > 6 and (x1 - x0) < 6  # the data's range with a small margin
    left, top, right, bottom = layout.box
    assert 0 < left < right < 640 and 0 < top < bottom < 400
    # the frame lies on the plot area's edges
    assert img.getpixel((left, (top + bottom) // 2)) == FRAME
    assert img.getpixel(((left + right) // 2, top)) == FRAME

    for (xs, ys), color in ((FINETUNED, COLORS[0]), (SCRATCH, COLORS[1])):
        for i in (0, len(xs) - 1):  # first and last points: the marker's centre
            assert img.getpixel(_pixel(layout.box, layout.xlim, layout.ylim, xs[i], ys[i])) == color
        # the line between the first two points passes through their midpoint
        mid = _pixel(layout.box, layout.xlim, layout.ylim, (xs[0] + xs[1]) / 2, (ys[0] + ys[1]) / 2)
        assert _near(img, mid, color)
    # a position with no data shows neither colour (the pixel check can fail)
    empty = _pixel(layout.box, layout.xlim, layout.ylim, 3.5, 90.0)
    assert img.getpixel(empty) not in COLORS[:2]
    # each series' colour also appears in the legend, right of the plot
    legend = img.crop((right + 1, top, 640, bottom))
    colors = {c for _, c in legend.getcolors(maxcolors=1 << 16)}
    assert COLORS[0] in colors and COLORS[1] in colors
    assert COLORS[2] not in colors


def test_automatic_y_limits_hold_the_data(tmp_path):
    layout = line_chart(
        {"loss": ([0, 10, 20], [2.5, 1.25, 0.75])}, tmp_path / "a.png", title="", xlabel="step", ylabel="loss"
    )
    y0, y1 = layout.ylim
    assert y0 < 0.75 and y1 > 2.5
    img = Image.open(tmp_path / "a.png").convert("RGB")
    assert img.getpixel(_pixel(layout.box, layout.xlim, layout.ylim, 10, 1.25)) == COLORS[0]
    # a single point gets a window around it
    one = line_chart({"acc": ([3], [0.5])}, tmp_path / "b.png", title="t", xlabel="x", ylabel="y")
    assert one.xlim[0] < 3 < one.xlim[1] and one.ylim[0] < 0.5 < one.ylim[1]


def test_nice_ticks():
    assert nice_ticks(0, 100) == ([0, 20, 40, 60, 80, 100], 0)
    ticks, dec = nice_ticks(0.84, 5.16)
    assert ticks == [1, 2, 3, 4, 5] and dec == 0
    ticks, dec = nice_ticks(0.0, 1.0)
    assert [round(t, 6) for t in ticks] == [0.0, 0.2, 0.4, 0.6, 0.8, 1.0] and dec == 1


@pytest.mark.parametrize(
    "series, kwargs, match",
    [
        ({}, {}, "no series"),
        ({"a": ([1, 2, 3], [1, 2])}, {}, "3 x values but 2 y values"),
        ({"a": ([1, 2], [1, float("nan")])}, {}, "not finite"),
        ({"a": ([1, float("inf")], [1, 2])}, {}, "not finite"),
        ({"a": ([], [])}, {}, "no points"),
        ({"a": ([1, 2], [1, "x"])}, {}, "not a number"),
        ({"a": ([1, 2], [1, 2])}, {"ylim": (5, 0)}, "low < high"),
        ({"a": ([1, 2], [1, 200])}, {"ylim": (0, 100)}, "leaves out"),
        ({f"s{i}": ([1], [1]) for i in range(len(COLORS) + 1)}, {}, "at most"),
    ],
)
def test_bad_input_raises_and_writes_nothing(tmp_path, series, kwargs, match):
    path = tmp_path / "bad.png"
    with pytest.raises(ValueError, match=match):
        line_chart(series, path, title="t", xlabel="x", ylabel="y", **kwargs)
    assert not path.exists()


def test_background_is_white_outside_the_drawing(tmp_path):
    line_chart({"a": FINETUNED}, tmp_path / "c.png", title="t", xlabel="x", ylabel="y")
    img = Image.open(tmp_path / "c.png").convert("RGB")
    assert img.getpixel((0, 0)) == BACKGROUND
