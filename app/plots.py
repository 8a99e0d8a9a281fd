"""Server-rendered charts: SVG strings and PNG overlays, no JavaScript and no matplotlib.

Every function is pure. SVG charts come back as ``markupsafe.Markup`` (a ``str``): every
label inside has been escaped here, so templates can print them with plain ``{{ }}``.
Charts use presentation attributes only (no ``style``), so a strict Content-Security-Policy
does not break them, and each one is ``role="img"`` with a ``<title>`` for screen readers.
"""

from __future__ import annotations

import hashlib
import io
import math
import re
from collections.abc import Callable, Sequence

import numpy as np
from markupsafe import Markup, escape
from PIL import Image

from app.templating import num, pct, sign_class, signed

FONT = "system-ui, -apple-system, 'Segoe UI', Roboto, sans-serif"
INK, MUTED, GRID = "#1f2933", "#616e7c", "#e4e7eb"
POSITIVE, NEGATIVE = "#2563eb", "#dd6b20"  # blue supports a class, orange counts against it
BIAS, TOTAL, BEFORE = "#9aa5b1", "#323f4b", "#cbd2d9"
GAIN, LOSS = "#2f855a", "#c53030"
# Okabe-Ito: distinguishable with the common colour-vision deficiencies.
SERIES_COLOURS = ("#0072b2", "#e69f00", "#009e73", "#d55e00", "#cc79a7", "#56b4e9", "#000000")
SERIES_DASHES = (None, "6 3", "2 3", "8 3 2 3")

_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")  # not allowed in XML 1.0


# ---------------------------------------------------------------- SVG building blocks
def _n(value: float) -> str:
    """A coordinate with at most one decimal."""
    text = f"{value:.1f}".rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


def _clean(label: object) -> str:
    return _CONTROL.sub("", str(label))


def _clip(label: str, max_chars: int) -> str:
    return label if len(label) <= max_chars else label[: max_chars - 1] + "\u2026"


def _text_width(label: str, font_size: float) -> float:
    return len(label) * font_size * 0.58


def _attrs(attrs: dict[str, object]) -> str:
    parts = []
    for key, value in attrs.items():
        if value is None:
            continue
        name = key.rstrip("_").replace("_", "-")
        parts.append(f' {name}="{escape(_clean(value))}"')
    return "".join(parts)


def _el(tag: str, content: str | None = None, **attrs: object) -> str:
    if content is None:
        return f"<{tag}{_attrs(attrs)}/>"
    return f"<{tag}{_attrs(attrs)}>{content}</{tag}>"


def _text(x: float, y: float, label: object, **attrs: object) -> str:
    return _el("text", str(escape(_clean(label))), x=_n(x), y=_n(y), **attrs)


def _tip(label: object) -> str:
    """A hover tooltip: an SVG ``<title>`` child."""
    return f"<title>{escape(_clean(label))}</title>"


def _svg(width: float, height: float, title: str, body: list[str], kind: str, desc: str = "") -> Markup:
    head = (
        f'<svg xmlns="http://www.w3.org/2000/svg" role="img"{_attrs({"aria-label": title})}'
        f' class="chart chart-{kind}" width="{_n(width)}" height="{_n(height)}"'
        f' viewBox="0 0 {_n(width)} {_n(height)}" font-family="{escape(FONT)}" font-size="12"'
        f' fill="{INK}">'
    )
    parts = [head, _tip(title)]
    if desc:
        parts.append(f"<desc>{escape(_clean(desc))}</desc>")
    parts.extend(body)
    parts.append("</svg>")
    return Markup("".join(parts))


def _finite(value: object, what: str) -> float:
    number = float(value)  # type: ignore[arg-type]
    if not math.isfinite(number):
        raise ValueError(f"{what} is not a finite number: {value!r}")
    return number


def _uid(*parts: object) -> str:
    """A deterministic id (for gradients): equal content may safely share it."""
    return hashlib.sha1(repr(parts).encode()).hexdigest()[:10]


def _heading(title: str, x: float = 0) -> str:
    return _text(x, 16, _clip(_clean(title), 90), font_size=14, font_weight="600")


class _Scale:
    """Maps data values in [lo, hi] linearly onto pixels [start, end]."""

    def __init__(self, lo: float, hi: float, start: float, end: float):
        if hi <= lo:
            hi = lo + 1.0
        self.lo, self.hi, self.start, self.end = lo, hi, start, end

    def __call__(self, value: float) -> float:
        return self.start + (value - self.lo) / (self.hi - self.lo) * (self.end - self.start)


def _link(body: str, concept: str, href_for: Callable[[str], str] | None) -> str:
    return _el("a", body, href=href_for(concept)) if href_for else body


# ---------------------------------------------------------------- concept weights
def weight_bars(
    items: Sequence[tuple[str, float]],
    title: str,
    width: int = 640,
    top: int | None = None,
    concept_href: Callable[[str], str] | None = None,
) -> Markup:
    """Horizontal bars of concept weights for one class, strongest positive first.

    ``top`` keeps the ``top`` strongest positive and the ``top`` strongest negative weights.
    Every row is a ``<g class="row" data-concept=...>`` (wrapped in a link when
    ``concept_href`` is given).
    """
    rows = [(_clean(name), _finite(w, f"weight of {name!r}")) for name, w in items]
    if top is not None:
        positive = sorted((r for r in rows if r[1] > 0), key=lambda r: -r[1])[:top]
        negative = sorted((r for r in rows if r[1] < 0), key=lambda r: r[1])[:top]
        rows = positive + negative
    rows.sort(key=lambda r: -r[1])
    row_h, top_y = 24, 34
    height = top_y + max(len(rows), 1) * row_h + 34
    body = [_heading(title)]
    if not rows:
        body.append(_text(width / 2, top_y + 16, "No non-zero weights", text_anchor="middle", fill=MUTED))
        return _svg(width, height, title, body, "weights")
    labels = [_clip(name, 34) for name, _ in rows]
    label_w = min(width * 0.42, max(_text_width(lab, 12) for lab in labels) + 12)
    lo, hi = min(0.0, min(w for _, w in rows)), max(0.0, max(w for _, w in rows))
    pad_left = 58 if lo < 0 else 4
    scale = _Scale(lo, hi, label_w + pad_left, width - 58)
    zero = scale(0.0)
    for i, ((name, weight), label) in enumerate(zip(rows, labels, strict=False)):
        y = top_y + i * row_h
        x0, x1 = sorted((zero, scale(weight)))
        if weight != 0:
            x1 = max(x1, x0 + 1)  # a tiny weight stays visible
        positive = weight >= 0
        value_x = x1 + 4 if positive else x0 - 4
        parts = [
            _tip(f"{name}: {num(weight, 3, sign=True)}"),
            _text(label_w, y + 16, label, text_anchor="end"),
            _el("rect", class_=f"bar {'pos' if positive else 'neg'}", x=_n(x0), y=_n(y + 4),
                width=_n(x1 - x0), height=str(row_h - 8), rx="2", fill=POSITIVE if positive else NEGATIVE),
            _text(value_x, y + 16, num(weight, 3, sign=True), text_anchor="start" if positive else "end",
                  fill=MUTED, font_size=11),
        ]
        body.append(_link(_el("g", "".join(parts), class_="row", data_concept=name), name, concept_href))
    bottom = top_y + len(rows) * row_h
    body.append(_el("line", class_="zero", x1=_n(zero), x2=_n(zero), y1=str(top_y - 2), y2=str(bottom + 2),
                    stroke=INK, stroke_width="1"))
    body.append(_legend([(POSITIVE, "supports the class"), (NEGATIVE, "counts against it")], label_w, bottom + 20))
    return _svg(width, height, title, body, "weights")


def _legend(entries: Sequence[tuple[str, str]], x: float, y: float) -> str:
    parts = []
    for colour, label in entries:
        parts.append(_el("rect", x=_n(x), y=_n(y - 9), width="10", height="10", rx="2", fill=colour))
        parts.append(_text(x + 14, y, label, fill=MUTED, font_size=11))
        x += 26 + _text_width(label, 11)
    return _el("g", "".join(parts), class_="legend")


# ---------------------------------------------------------------- class x concept heatmap
_DIVERGING = ((-1.0, (192, 86, 33)), (-0.5, (246, 173, 85)), (0.0, (247, 250, 252)),
              (0.5, (99, 179, 237)), (1.0, (43, 108, 176)))


def _diverging(t: float) -> str:
    """Colour for t in [-1, 1]: orange (negative), near-white (0), blue (positive)."""
    t = min(1.0, max(-1.0, t))
    for (t0, c0), (t1, c1) in zip(_DIVERGING, _DIVERGING[1:], strict=False):
        if t <= t1:
            f = (t - t0) / (t1 - t0)
            return "#" + "".join(f"{round(a + (b - a) * f):02x}" for a, b in zip(c0, c1, strict=False))
    return "#2b6cb0"


def heatmap(
    row_labels: Sequence[str],
    col_labels: Sequence[str],
    values,
    title: str,
    cell: int = 14,
    max_abs: float | None = None,
) -> Markup:
    """A rows x columns grid (classes x concepts) coloured on a scale centred at 0.

    ``values`` is anything ``numpy.asarray`` accepts. Cells are at least 8 px; NaN cells
    are grey. ``max_abs`` fixes the colour range (default: the largest magnitude).
    """
    grid = np.asarray(values, dtype=float)
    if grid.ndim != 2 or grid.shape != (len(row_labels), len(col_labels)):
        raise ValueError(f"heatmap values have shape {grid.shape}, labels need "
                         f"({len(row_labels)}, {len(col_labels)})")
    cell = max(8, int(cell))
    finite = grid[np.isfinite(grid)]
    limit = float(max_abs) if max_abs else float(np.abs(finite).max()) if finite.size else 0.0
    limit = limit if limit > 0 else 1.0
    rows = [_clean(r) for r in row_labels]
    cols = [_clean(c) for c in col_labels]
    col_font = min(11.0, max(7.0, cell * 0.85))
    label_w = min(200.0, max((_text_width(_clip(r, 28), 12) for r in rows), default=0) + 12)
    col_h = max((_text_width(_clip(c, 28), col_font) for c in cols), default=0) * 0.87 + 10
    grid_x, grid_y = label_w, 30 + col_h
    overhang = max((_text_width(_clip(c, 28), col_font) for c in cols[-6:]), default=0) * 0.5
    width = max(grid_x + len(cols) * cell + overhang + 16, grid_x + 230, 340)  # room for the legend
    height = grid_y + len(rows) * cell + 58
    body = [_heading(title)]
    for j, col in enumerate(cols):
        x, y = grid_x + j * cell + cell / 2 + col_font / 3, grid_y - 4
        body.append(_text(x, y, _clip(col, 28), font_size=_n(col_font), transform=f"rotate(-60 {_n(x)} {_n(y)})",
                          class_="col-label"))
    cells = []
    for i, row in enumerate(rows):
        y = grid_y + i * cell
        body.append(_text(grid_x - 6, y + cell / 2 + 4, _clip(row, 28), text_anchor="end", class_="row-label"))
        for j, col in enumerate(cols):
            value = grid[i, j]
            ok = math.isfinite(value)
            cells.append(_el(
                "rect", _tip(f"{row} \u00d7 {col}: {num(value, 3, sign=True) if ok else 'n/a'}"),
                class_="cell", x=_n(grid_x + j * cell), y=_n(y), width=str(cell - 1), height=str(cell - 1),
                fill=_diverging(value / limit) if ok else "#cbd2d9", data_row=row, data_col=col,
            ))
    body.append(_el("g", "".join(cells), class_="cells"))
    body.append(_gradient_legend(grid_x, grid_y + len(rows) * cell + 18, limit))
    return _svg(width, height, title, body, "heatmap")


def _gradient_legend(x: float, y: float, limit: float) -> str:
    gid = "div-" + _uid("diverging", limit)
    stops = "".join(_el("stop", offset=f"{(t + 1) * 50:.0f}%", stop_color=_diverging(t)) for t in (-1, -0.5, 0, 0.5, 1))
    parts = [
        _el("defs", _el("linearGradient", stops, id=gid)),
        _el("rect", x=_n(x), y=_n(y), width="160", height="10", fill=f"url(#{gid})", stroke=GRID),
    ]
    for frac, value in ((0.0, -limit), (0.5, 0.0), (1.0, limit)):
        parts.append(_text(x + 160 * frac, y + 24, num(value, 2, sign=value != 0), text_anchor="middle",
                           fill=MUTED, font_size=10))
    parts.append(_text(x + 172, y + 9, "weight", fill=MUTED, font_size=10))
    return _el("g", "".join(parts), class_="legend")


# ---------------------------------------------------------------- explanation of one prediction
def waterfall(
    contributions: Sequence[tuple[str, float]],
    bias: float,
    predicted: str,
    top: int | None = None,
    concept_href: Callable[[str], str] | None = None,
    width: int = 640,
) -> Markup:
    """How the predicted class's logit is built: bias, then one step per concept, then the total.

    A negative step is labelled "NOT <concept>". With ``top``, the ``top`` largest steps are
    shown and the rest are summed into one "other concepts" step, so the total stays exact.
    Each concept step is a ``<g class="step" data-concept=...>``, linked when
    ``concept_href`` is given.
    """
    steps = [(_clean(name), _finite(c, f"contribution of {name!r}")) for name, c in contributions]
    bias = _finite(bias, "bias")
    rest: list[tuple[str, float]] = []
    if top is not None and len(steps) > top:
        order = sorted(range(len(steps)), key=lambda k: -abs(steps[k][1]))
        keep = set(order[:top])
        rest = [s for k, s in enumerate(steps) if k not in keep]
        steps = [s for k, s in enumerate(steps) if k in keep]
    # (label, start, end, kind, concept)
    bars: list[tuple[str, float, float, str, str | None]] = [("bias", 0.0, bias, "bias", None)]
    running = bias
    for name, value in steps:
        label = name if value >= 0 else f"NOT {name}"
        bars.append((label, running, running + value, "pos" if value >= 0 else "neg", name))
        running += value
    if rest:
        other = sum(v for _, v in rest)
        bars.append((f"other concepts ({len(rest)})", running, running + other, "other", None))
        running += other
    bars.append((f"logit for {_clean(predicted)}", 0.0, running, "total", None))

    row_h, top_y = 24, 34
    height = top_y + len(bars) * row_h + 14
    labels = [_clip(b[0], 36) for b in bars]
    label_w = min(width * 0.42, max(_text_width(lab, 12) for lab in labels) + 12)
    ends = [v for b in bars for v in (b[1], b[2])]
    scale = _Scale(min(0.0, *ends), max(0.0, *ends), label_w + 10, width - 62)
    colours = {"bias": BIAS, "pos": POSITIVE, "neg": NEGATIVE, "other": BIAS, "total": TOTAL}
    body = [_heading(f"Why {_clean(predicted)}?")]
    for i, ((label, start, end, kind, concept), short) in enumerate(zip(bars, labels, strict=False)):
        y = top_y + i * row_h
        x0, x1 = sorted((scale(start), scale(end)))
        x1 = max(x1, x0 + 1)
        delta = end - start
        value = num(end, 2) if kind in ("bias", "total") else num(delta, 2, sign=True)
        parts = [
            _tip(f"{label}: {value}"),
            _text(label_w, y + 16, short, text_anchor="end", font_weight="600" if kind == "total" else None),
            _el("rect", class_=f"bar {kind}", x=_n(x0), y=_n(y + 4), width=_n(x1 - x0), height=str(row_h - 8),
                rx="2", fill=colours[kind]),
            _text(x1 + 4, y + 16, value, fill=MUTED, font_size=11),
        ]
        group = _el("g", "".join(parts), class_=f"step {kind}", data_concept=concept)
        body.append(_link(group, concept, concept_href) if concept else group)
        if i + 1 < len(bars) and kind != "total":
            x = scale(end)
            body.append(_el("line", x1=_n(x), x2=_n(x), y1=_n(y + row_h - 4), y2=_n(y + row_h + 4),
                            stroke=MUTED, stroke_dasharray="2 2"))
    zero = scale(0.0)
    body.append(_el("line", class_="zero", x1=_n(zero), x2=_n(zero), y1=str(top_y - 2),
                    y2=_n(top_y + len(bars) * row_h), stroke=INK))
    return _svg(width, height, title=f"Contributions to the {_clean(predicted)} logit", body=body, kind="waterfall")


# ---------------------------------------------------------------- metrics across versions
def metric_lines(
    series: dict[str, Sequence[float | None]],
    x_labels: Sequence[str],
    title: str,
    width: int = 640,
    height: int = 280,
    percent: bool = True,
) -> Markup:
    """One line per split (``series``: split -> value per version); None/NaN leave a gap."""
    names = [_clean(k) for k in series]
    columns = [[None if v is None or not math.isfinite(float(v)) else float(v) for v in vals]
               for vals in series.values()]
    for name, vals in zip(names, columns, strict=False):
        if len(vals) != len(x_labels):
            raise ValueError(f"series {name!r} has {len(vals)} values for {len(x_labels)} versions")
    known = [v for vals in columns for v in vals if v is not None]
    low, high = min(known, default=0.0), max(known, default=1.0)
    pad = (high - low) * 0.05  # markers never sit on the frame
    ticks = _nice_ticks(low - pad, high + pad)
    if percent and min(known, default=0.0) >= 0 and max(known, default=1.0) <= 1:
        ticks = [t for t in ticks if -1e-9 <= t <= 1 + 1e-9] or [0.0, 1.0]
    lo, hi = ticks[0], ticks[-1]
    legend_w = min(170.0, max((_text_width(_clip(n, 20), 11) for n in names), default=0) + 34)
    left, right, top_y, bottom = 52.0, width - legend_w - 8, 34.0, height - 36.0
    xs = _Scale(0, max(len(x_labels) - 1, 1), left + 12, right - 12)
    ys = _Scale(lo, hi, bottom, top_y)
    fmt = (lambda v: pct(v, 1)) if percent else (lambda v: num(v, 3))
    body = [_heading(title)]
    digits = 0 if all(abs(t * 100 - round(t * 100)) < 1e-6 for t in ticks) else 1
    for value in ticks:
        y = ys(value)
        body.append(_el("line", x1=_n(left), x2=_n(right), y1=_n(y), y2=_n(y), stroke=GRID))
        body.append(_text(left - 6, y + 4, pct(value, digits) if percent else num(value, 2), text_anchor="end",
                          fill=MUTED, font_size=10))
    step = max(1, math.ceil(len(x_labels) / 12))  # at most about 12 x labels
    single = len(x_labels) == 1
    x_of = (lambda i: (left + right) / 2) if single else xs
    for i, label in enumerate(x_labels):
        if i % step == 0 or i == len(x_labels) - 1:
            body.append(_text(x_of(i), bottom + 16, _clip(_clean(label), 10), text_anchor="middle",
                              fill=MUTED, font_size=10))
    for s, (name, vals) in enumerate(zip(names, columns, strict=False)):
        colour = SERIES_COLOURS[s % len(SERIES_COLOURS)]
        path, pen_down, markers = [], False, []
        for i, v in enumerate(vals):
            if v is None:
                pen_down = False
                continue
            x, y = x_of(i), ys(v)
            path.append(f"{'L' if pen_down else 'M'}{_n(x)} {_n(y)}")
            pen_down = True
            markers.append(_el("circle", _tip(f"{name}, {_clean(x_labels[i])}: {fmt(v)}"), class_="marker",
                               cx=_n(x), cy=_n(y), r="3.5", fill=colour, stroke="#ffffff", stroke_width="1"))
        line = _el("path", class_="line", d=" ".join(path) or "M0 0", fill="none", stroke=colour,
                   stroke_width="2", stroke_dasharray=SERIES_DASHES[s % len(SERIES_DASHES)])
        body.append(_el("g", line + "".join(markers), class_="series", data_series=name))
        ly = top_y + 6 + s * 18
        body.append(_el("line", x1=_n(right + 12), x2=_n(right + 30), y1=_n(ly), y2=_n(ly), stroke=colour,
                        stroke_width="2", stroke_dasharray=SERIES_DASHES[s % len(SERIES_DASHES)]))
        body.append(_text(right + 34, ly + 4, _clip(name, 20), font_size=11, class_="legend-label"))
    return _svg(width, height, title, body, "lines")


def _nice_ticks(lo: float, hi: float, max_ticks: int = 6) -> list[float]:
    """Round tick values (steps of 1, 2, 2.5 or 5 times a power of ten) covering [lo, hi]."""
    if hi - lo < 1e-12:
        lo, hi = lo - 0.05 * (abs(lo) or 1), hi + 0.05 * (abs(hi) or 1)
    raw = (hi - lo) / (max_ticks - 1)
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= raw)
    first, last = math.floor(lo / step + 1e-9), math.ceil(hi / step - 1e-9)
    return [round(k * step, 12) for k in range(first, last + 1)]


# ---------------------------------------------------------------- edit preview
def delta_bars(
    rows: Sequence[tuple[str, float, float]],
    title: str,
    width: int = 640,
    highlight: Sequence[str] = (),
) -> Markup:
    """Accuracy before (grey) and after (blue) an edit, per split or group, with the change."""
    data = [(_clean(n), _finite(b, f"{n!r} before"), _finite(a, f"{n!r} after")) for n, b, a in rows]
    marked = {_clean(h) for h in highlight}
    row_h, top_y = 34, 44
    height = top_y + max(len(data), 1) * row_h + 10
    hi = max([1.0] + [max(b, a) for _, b, a in data])
    labels = [_clip(n, 28) for n, _, _ in data]
    label_w = min(width * 0.35, max((_text_width(lab, 12) for lab in labels), default=40) + 14)
    scale = _Scale(0.0, hi, label_w, width - 200)
    body = [_heading(title), _legend([(BEFORE, "before"), (POSITIVE, "after")], label_w, 34)]
    if not data:
        body.append(_text(width / 2, top_y + 16, "Nothing to compare", text_anchor="middle", fill=MUTED))
    for i, ((name, before, after), label) in enumerate(zip(data, labels, strict=False)):
        y = top_y + i * row_h
        change = after - before
        tone = sign_class(change)
        parts = [_tip(f"{name}: {pct(before)} \u2192 {pct(after)} ({signed(change)})")]
        if name in marked:
            parts.append(_el("rect", class_="highlight", x="0", y=_n(y), width=_n(width), height=str(row_h - 2),
                             fill="#fefcbf"))
        parts += [
            _text(label_w - 8, y + 21, label, text_anchor="end", font_weight="600" if name in marked else None),
            _el("rect", class_="bar before", x=_n(label_w), y=_n(y + 6), width=_n(scale(before) - label_w),
                height="10", fill=BEFORE),
            _el("rect", class_="bar after", x=_n(label_w), y=_n(y + 17), width=_n(scale(after) - label_w),
                height="10", fill=POSITIVE),
            _text(width - 192, y + 21, f"{pct(before)} \u2192 {pct(after)}", fill=MUTED, font_size=11),
            _text(width - 6, y + 21, signed(change), text_anchor="end", font_weight="600", class_=f"delta {tone}",
                  fill={"pos": GAIN, "neg": LOSS}.get(tone, MUTED)),
        ]
        body.append(_el("g", "".join(parts), class_="row", data_name=name))
    return _svg(width, height, title, body, "delta")


# ---------------------------------------------------------------- concept maps on images
# Perceptually uniform and colour-blind safe: viridis at ten evenly spaced points.
_VIRIDIS = ("#440154", "#482878", "#3e4989", "#31688e", "#26828e",
            "#1f9e89", "#35b779", "#6ece58", "#b5de2b", "#fde725")
_DIVERGING_HEX = ("#c05621", "#f6ad55", "#f7fafc", "#63b3ed", "#2b6cb0")
COLOUR_SCALES = {"viridis": _VIRIDIS, "diverging": _DIVERGING_HEX}


def _lookup_table(name: str) -> np.ndarray:
    """A (256, 3) uint8 table interpolated from the named scale's key colours."""
    if name == "viridis-like":
        name = "viridis"
    if name not in COLOUR_SCALES:
        raise ValueError(f"unknown colour scale {name!r}; choose from {sorted(COLOUR_SCALES)}")
    keys = np.array([[int(h[k:k + 2], 16) for k in (1, 3, 5)] for h in COLOUR_SCALES[name]], dtype=float)
    where = np.linspace(0, 1, len(keys))
    grid = np.linspace(0, 1, 256)
    return np.stack([np.interp(grid, where, keys[:, c]) for c in range(3)], axis=1).round().astype(np.uint8)


def _normalise(heat: np.ndarray, vmin: float | None, vmax: float | None, diverging: bool) -> np.ndarray:
    finite = heat[np.isfinite(heat)]
    if diverging:
        limit = max(abs(vmin or 0.0), abs(vmax or 0.0)) or (float(np.abs(finite).max()) if finite.size else 0.0)
        vmin, vmax = -limit, limit
    else:
        vmin = float(finite.min()) if vmin is None and finite.size else (vmin or 0.0)
        vmax = float(finite.max()) if vmax is None and finite.size else (vmax or 0.0)
    heat = np.where(np.isfinite(heat), heat, vmin)
    if vmax <= vmin:  # a flat map carries no location information
        return np.zeros_like(heat, dtype=np.float32)
    return np.clip((heat - vmin) / (vmax - vmin), 0.0, 1.0).astype(np.float32)


def overlay_png(
    image: Image.Image,
    heat,
    opacity: float = 0.5,
    cmap: str = "viridis",
    vmin: float | None = None,
    vmax: float | None = None,
) -> bytes:
    """Blend a concept map over ``image`` and return PNG bytes of the image's size.

    ``heat`` (h, w) is upsampled bilinearly, scaled to [vmin, vmax] (default: its own range;
    symmetric about 0 for ``cmap="diverging"``), coloured and alpha-blended with ``opacity``.
    """
    opacity = float(opacity)
    if not 0.0 <= opacity <= 1.0:
        raise ValueError(f"opacity must be between 0 and 1, got {opacity}")
    grid = np.asarray(heat, dtype=np.float32)
    if grid.ndim != 2 or 0 in grid.shape:
        raise ValueError(f"a concept map must be a non-empty 2-D array, got shape {grid.shape}")
    table = _lookup_table(cmap)
    base = image.convert("RGB")
    norm = _normalise(grid, vmin, vmax, diverging=cmap == "diverging")
    upsampled = np.asarray(Image.fromarray(norm).resize(base.size, Image.Resampling.BILINEAR))
    colours = table[np.clip(np.rint(upsampled * 255), 0, 255).astype(np.uint8)].astype(np.float32)
    pixels = np.asarray(base, dtype=np.float32)
    blended = (pixels * (1.0 - opacity) + colours * opacity).round().clip(0, 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(blended).save(out, format="PNG")
    return out.getvalue()


def colorbar_svg(vmin: float, vmax: float, cmap: str = "viridis", label: str = "concept score",
                 width: int = 240) -> Markup:
    """A horizontal colour bar for an overlay, ticked at vmin, the middle and vmax."""
    vmin, vmax = _finite(vmin, "vmin"), _finite(vmax, "vmax")
    table = _lookup_table(cmap)
    gid = "cb-" + _uid(cmap, vmin, vmax)
    stops = "".join(
        _el("stop", offset=f"{k * 10}%", stop_color="#{:02x}{:02x}{:02x}".format(*table[min(255, k * 255 // 10)]))
        for k in range(11)
    )
    bar_w = width - 48
    body = [
        _el("defs", _el("linearGradient", stops, id=gid)),
        _el("rect", x="24", y="6", width=str(bar_w), height="12", fill=f"url(#{gid})", stroke=GRID),
    ]
    for frac in (0.0, 0.5, 1.0):
        body.append(_text(24 + bar_w * frac, 32, num(vmin + (vmax - vmin) * frac, 2), text_anchor="middle",
                          fill=MUTED, font_size=10))
    body.append(_text(width / 2, 46, label, text_anchor="middle", fill=MUTED, font_size=10))
    return _svg(width, 52, f"Colour scale: {label} from {num(vmin, 2)} to {num(vmax, 2)}", body, "colorbar")


# ---------------------------------------------------------------- study results
def strip_plot(
    groups: Sequence[tuple[str, Sequence[float]]],
    title: str,
    references: Sequence[tuple[str, float]] = (),
    width: int = 640,
) -> Markup:
    """Accuracy of each participant as a dot, one row per condition, with each row's mean as a tick.

    ``references`` are labelled vertical lines across every row (e.g. the base model and the
    baselines). Values are fractions in [0, 1]; the axis runs from 0% to 100%.
    """
    rows = [(_clean(name), [_finite(v, f"a value of {name!r}") for v in values]) for name, values in groups]
    marks = [(_clean(name), _finite(v, f"reference {name!r}")) for name, v in references]
    row_h, top_y = 36, 40 + 16 * len(marks)
    height = top_y + max(len(rows), 1) * row_h + 40
    labels = [_clip(name, 24) for name, _ in rows]
    label_w = min(width * 0.3, max((_text_width(lab, 12) for lab in labels), default=40) + 14)
    scale = _Scale(0.0, 1.0, label_w + 8, width - 16)
    bottom = top_y + max(len(rows), 1) * row_h
    body = [_heading(title)]
    for tick in (0.0, 0.25, 0.5, 0.75, 1.0):
        x = scale(tick)
        body.append(_el("line", x1=_n(x), x2=_n(x), y1=_n(top_y - 4), y2=_n(bottom), stroke=GRID))
        body.append(_text(x, bottom + 16, pct(tick, 0), text_anchor="middle", fill=MUTED, font_size=10))
    for i, (name, value) in enumerate(marks):
        x = scale(min(1.0, max(0.0, value)))
        colour = SERIES_COLOURS[(i + 1) % len(SERIES_COLOURS)]
        dash = SERIES_DASHES[(i + 1) % len(SERIES_DASHES)]
        line = _el("line", x1=_n(x), x2=_n(x), y1=_n(top_y - 4), y2=_n(bottom), stroke=colour, stroke_width="1.5",
                   stroke_dasharray=dash)
        label = _text(x, 32 + 16 * i, f"{_clip(name, 28)} {pct(value)}", text_anchor="middle", fill=colour,
                      font_size=11)
        body.append(_el("g", _tip(f"{name}: {pct(value)}") + line + label, class_="reference", data_name=name))
    if not rows:
        body.append(_text(width / 2, top_y + 20, "No submissions yet", text_anchor="middle", fill=MUTED))
    for i, ((name, values), label) in enumerate(zip(rows, labels, strict=False)):
        y = top_y + i * row_h + row_h / 2
        parts = [_text(label_w, y + 4, label, text_anchor="end")]
        for j, value in enumerate(sorted(values)):
            jitter = (j % 3 - 1) * 5  # equal values side by side stay visible
            parts.append(_el("circle", _tip(f"{name}: {pct(value)}"), class_="dot", cx=_n(scale(value)),
                             cy=_n(y + jitter), r="4.5", fill=POSITIVE, fill_opacity="0.75", stroke="#ffffff"))
        if values:
            centre = math.fsum(values) / len(values)
            parts.append(_el("line", _tip(f"{name}: mean {pct(centre)} of {len(values)}"), class_="mean",
                             x1=_n(scale(centre)), x2=_n(scale(centre)), y1=_n(y - 12), y2=_n(y + 12), stroke=INK,
                             stroke_width="2.5"))
        body.append(_el("g", "".join(parts), class_="row", data_name=name, data_n=str(len(values))))
    return _svg(width, height, title, body, "strip")
