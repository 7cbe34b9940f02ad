"""report.html: one self-contained page (figures inlined as base64 PNG, no external files,
no scripts) with the tables, the figures, the image grids and the run's provenance."""

from __future__ import annotations

import base64
import html
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pandas.io.formats.style import Styler

_CSS = """
body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 70rem; color: #222; }
h1 { font-size: 1.5rem; } h2 { font-size: 1.2rem; margin-top: 2rem; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; font-size: 0.85rem; margin: 0.5rem 0; }
th, td { border: 1px solid #ddd; padding: 0.25rem 0.5rem; text-align: right; }
th { background: #f4f4f4; } caption { text-align: left; font-style: italic; padding: 0.3rem 0; }
figure { margin: 1rem 0; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { font-size: 0.85rem; color: #555; }
pre { background: #f7f7f7; padding: 0.75rem; overflow-x: auto; font-size: 0.8rem; }
.coverage { font-size: 1.05rem; } .partial { color: #a15c00; font-weight: bold; }
dl { display: grid; grid-template-columns: max-content auto; gap: 0.2rem 1rem; font-size: 0.9rem; }
dt { font-weight: bold; }
"""


@dataclass(frozen=True)
class Figure:
    title: str
    path: Path
    caption: str = ""
    css_class: str = "figure"  # "image-grid" for ground truth vs reconstructions


@dataclass(frozen=True)
class Page:
    title: str
    coverage: str  # "8 of 8 cells committed ..."
    partial: bool
    table1: Styler | None
    paired: Styler | None
    figures: Sequence[Figure]
    grids: Sequence[Figure]
    provenance: Mapping[str, str] = field(default_factory=dict)
    spec_text: str = ""
    caption: str = ""


def render(page: Page) -> str:
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{_e(page.title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{_e(page.title)}</h1>",
        f'<p class="coverage{" partial" if page.partial else ""}" id="coverage">'
        f"{_e(page.coverage)}</p>",
        '<section id="table1-section"><h2>Table 1</h2>',
        f"<p>{_e(page.caption)}</p>",
        _styled(page.table1, "table1"),
        "</section>",
        '<section id="paired-section"><h2>Paired comparisons (identical gradients)</h2>',
        _styled(page.paired, "paired"),
        "</section>",
        '<section id="figures"><h2>Figures</h2>',
        *(_figure(f) for f in page.figures),
        "</section>",
        '<section id="image-grids"><h2>Image grids</h2>',
        *(_figure(f) for f in page.grids),
        "</section>",
        '<section id="provenance"><h2>Provenance</h2><dl>',
        *(f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>" for k, v in page.provenance.items()),
        "</dl><h3>Grid spec (grid.yaml)</h3>",
        f"<pre>{_e(page.spec_text)}</pre>",
        "</section></body></html>",
    ]
    return "\n".join(parts)


def _styled(styler: Styler | None, table_id: str) -> str:
    if styler is None:
        return "<p>(nothing to compare yet)</p>"
    # Styler gives its <table> its own id (T_<uuid>): ours goes on a wrapper
    return f'<div id="{table_id}" class="table">{styler.to_html()}</div>'


def _figure(f: Figure) -> str:
    data = base64.b64encode(f.path.read_bytes()).decode("ascii")
    return (
        f'<figure class="{f.css_class}"><img class="{f.css_class}" alt="{_e(f.title)}" '
        f'src="data:image/png;base64,{data}"><figcaption><b>{_e(f.title)}</b> '
        f"{_e(f.caption)}</figcaption></figure>"
    )


def _e(text: str) -> str:
    return html.escape(str(text))
