"""Figures stay readable at many configurations (issue 18, Deliver 8): rendered with real
matplotlib (Agg) from synthetic configurations, then every visible text's window extent is
checked against every other text and against the image axes, and Figure 4a's axes against
being squeezed flat by their labels."""

from __future__ import annotations

from collections.abc import Iterator

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.text import Text
from matplotlib.transforms import Bbox

from pipelines import report_figures as figs

RNG = np.random.default_rng(0)
VARIANTS = [
    "paper",
    "tuned",
    "tuned 2x iterations",
    "tuned iterations=400, lr=0.016, signed_grad=True, tv=0.235, tv_form=zero_pad",
]
METHODS = ["gi-x", "gi-x+bn", "gi-z/w+bn"]


def labels(n: int) -> list[str]:
    """n distinct labels as the report makes them, long ones (Table 1's tuned presets) included."""
    every = [f"{m} [{v}]" for m in METHODS for v in VARIANTS]
    every += [f"gi-z/w [tuned {k}x iterations]" for k in range(2, 40)]
    return every[:n]


def image() -> np.ndarray:
    return RNG.random((3, 32, 32))


def _undrawn_tick_labels(fig: Figure) -> set[int]:
    """Tick labels outside their axis's view interval keep visible=True but are not drawn."""
    hidden: set[int] = set()
    for ax in fig.axes:
        for axis in (ax.xaxis, ax.yaxis):
            lo, hi = sorted(axis.get_view_interval())
            for tick in [*axis.get_major_ticks(), *axis.get_minor_ticks()]:
                if not lo - 1e-9 <= tick.get_loc() <= hi + 1e-9:
                    hidden |= {id(tick.label1), id(tick.label2)}
    return hidden


def texts(fig: Figure) -> list[tuple[str, Bbox]]:
    """(text, window extent) of every text the figure draws."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()  # type: ignore[attr-defined]
    hidden = _undrawn_tick_labels(fig)
    out = []
    for t in fig.findobj(Text):
        if t.get_visible() and t.get_text().strip() and id(t) not in hidden:
            out.append((t.get_text(), t.get_window_extent(renderer)))
    return out


def _shrunk(box: Bbox, px: float = 0.5) -> Bbox:
    return Bbox.from_extents(box.x0 + px, box.y0 + px, box.x1 - px, box.y1 - px)


def overlaps(boxes: list[tuple[str, Bbox]]) -> Iterator[tuple[str, str]]:
    for i, (a, box_a) in enumerate(boxes):
        for b, box_b in boxes[i + 1 :]:
            if _shrunk(box_a).overlaps(_shrunk(box_b)):
                yield a, b


def image_axes(fig: Figure) -> list[Axes]:
    return [ax for ax in fig.axes if ax.images]


def assert_readable(fig: Figure) -> None:
    boxes = texts(fig)
    assert boxes, "no text at all"
    clash = list(overlaps(boxes))
    assert not clash, f"{len(clash)} overlapping text pairs, e.g. {clash[:3]}"
    renderer = fig.canvas.get_renderer()  # type: ignore[attr-defined]
    for ax in image_axes(fig):
        frame = _shrunk(ax.get_window_extent(renderer))
        hits = [t for t, box in boxes if _shrunk(box).overlaps(frame)]
        assert not hits, f"text over an image: {hits[:3]}"
    page = fig.bbox
    outside = [t for t, box in boxes if box.x0 < -1 or box.y0 < -1 or box.x1 > page.x1 + 1]
    assert not outside, f"text cut off at the figure's edge: {outside[:3]}"


def test_aliases_are_short_unique_and_spelled_out() -> None:
    names = labels(12)
    short, legend = figs.aliases(names)
    assert len(set(short.values())) == 12
    assert all(len(a) <= figs.ALIAS_MAX for a in short.values())
    assert short["gi-x [paper]"] == "gi-x [paper]"  # short labels stay as they are
    long = names[3]
    assert f"{short[long]} = {long}" in legend
    assert len(legend) == sum(len(n) > figs.ALIAS_MAX for n in names)


@pytest.mark.parametrize("n", [1, 12, 25])
def test_image_grid_labels_never_overlap(n: int) -> None:
    short, legend = figs.aliases(labels(n))
    truth = [image() for _ in range(4)]
    columns = [
        figs.Column(f"{a}\nsparsity 0.99", [image() for _ in truth], [f"{k + 10.5:.1f} dB"] * 4)
        for k, a in enumerate(short.values())
    ]
    fig = figs.grid_figure(truth, columns, title="ground truth vs every method", legend=legend)
    try:
        assert_readable(fig)
        shown = [t for t, _ in texts(fig)]
        # the ground truth stands next to every block of methods, every method is titled
        blocks = -(-n // figs.GRID_COLUMNS)
        assert shown.count("ground truth") == blocks
        assert all(any(t.startswith(a) for t in shown) for a in short.values())
        assert len(image_axes(fig)) == 4 * (blocks + n)
    finally:
        plt.close(fig)


def test_strip_row_labels_do_not_overlap_at_12_configurations() -> None:
    short, legend = figs.aliases(labels(12))
    frames = [(f"it {i}", image()) for i in (50, 100, 200)] + [("final (400)", image())]
    rows = [(a, frames) for a in short.values()]
    fig = figs.strip_figure(rows, image(), legend)
    try:
        assert_readable(fig)
        assert len(image_axes(fig)) == 12 * 5
    finally:
        plt.close(fig)


def _bars(n: int, offset: float) -> pd.DataFrame:
    mean = np.linspace(10, 20, n) + offset
    return pd.DataFrame({"mean": mean, "ci_low": mean - 1, "ci_high": mean + 1})


def test_fig4a_is_not_squeezed_by_its_labels_at_12_configurations() -> None:
    short, legend = figs.aliases(labels(12))
    names = list(short.values())
    panels = [(names, _bars(12, 0), _bars(12, 2)), (names, _bars(12, -1), _bars(12, 1))]
    fig = figs.bars_figure(["B = 4", "B = 8"], panels, legend)
    try:
        assert_readable(fig)
        renderer = fig.canvas.get_renderer()  # type: ignore[attr-defined]
        for ax in fig.axes:
            height = ax.get_window_extent(renderer).height
            assert height > 0.45 * fig.bbox.height, "the bars are squeezed by their labels"
            ticks = [t.get_window_extent(renderer) for t in ax.get_xticklabels()]
            assert len(ticks) == 12 and not list(overlaps([("", t) for t in ticks]))
            frame = _shrunk(ax.get_window_extent(renderer))
            assert not any(_shrunk(t).overlaps(frame) for t in ticks)
    finally:
        plt.close(fig)
