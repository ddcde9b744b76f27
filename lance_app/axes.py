"""What every chart of the app shares: one colour per method, log-axis ticks, short layer names, mode names.

No Streamlit and no plotly figure building here (only ``fig.update_*`` calls on a figure handed in), so
``figures``, ``continual_view`` and ``sweep_view`` draw a method in the same colour and label a log axis
the same way.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

# One scheme for the whole app (fine-tune, continual, runs, sweep).
METHOD_COLOURS = {"vanilla": "#444444", "gradient_filter": "#8c564b", "hosvd": "#1f77b4", "asi": "#2ca02c",
                  "lance": "#d62728", "gpm": "#9467bd", "finetune": "#7f7f7f"}
_EXTRA = ("#17becf", "#bcbd22", "#e377c2", "#ff7f0e", "#aec7e8", "#98df8a")
# Activation modes as the Spectra page names them (engine.calibration.spectra.mode_names).
MODE_COLOURS = {"B": "#7f7f7f", "C": "#1f77b4", "H": "#2ca02c", "W": "#ff7f0e", "F": "#9467bd", "L": "#8c564b"}
_MODES_BY_COUNT = {4: ("B", "C", "H", "W"), 3: ("B", "L", "F"), 2: ("B", "F")}
DASHES = ("solid", "dash", "dot", "dashdot", "longdash", "longdashdot")


def method_of(label: str) -> str:
    """'asi #a1b2c3' or 'asi #a1b2c3 · layer' -> 'asi' (a run label's method)."""
    return str(label).split(" · ")[0].split(" #")[0].strip()


def method_colour(label: str) -> str:
    """The method's colour (from a method name or a run label); unknown methods get a stable extra colour."""
    method = method_of(label)
    if method in METHOD_COLOURS:
        return METHOD_COLOURS[method]
    return _EXTRA[sum(map(ord, method)) % len(_EXTRA)]


def mode_names(modes: Sequence[str]) -> list[str]:
    """A layer's rank-key modes ('0'..'3', as the engine logs ``rank/<layer>/<i>``) -> B/C/H/W names.

    Four modes are a conv input (B, C, H, W); three a sequence (B, L, F); two a linear input (B, F).
    Modes that are already names pass through.
    """
    modes = [str(m) for m in modes]
    if not all(m.isdigit() for m in modes):
        return modes
    names = _MODES_BY_COUNT.get(max(int(m) for m in modes) + 1)
    return [names[int(m)] if names else m for m in modes]


def short_layer_names(names: Sequence[str], max_len: int = 22) -> dict[str, str]:
    """Layer path -> a short unique name: dotted parts that every name shares are dropped.

    'blocks.14.mobile_inverted_conv.point_linear.conv' beside 'blocks.15.mobile_inverted_conv.depth_conv.conv'
    -> '14.point_linear' and '15.depth_conv'. Falls back to the full names where shortening would merge
    two layers; a part longer than ``max_len`` is cut with '…'.
    """
    names = list(dict.fromkeys(str(n) for n in names))
    if len(names) < 2:
        return {n: _cut(n, max_len) for n in names}
    parts = [n.split(".") for n in names]
    shared = set(parts[0]).intersection(*parts[1:])
    short = {n: ".".join(p for p in ps if p not in shared) or n for n, ps in zip(names, parts)}
    short = {n: _cut(s, max_len) for n, s in short.items()}
    return short if len(set(short.values())) == len(names) else {n: n for n in names}


def _cut(text: str, max_len: int) -> str:
    return text if len(text) <= max_len else text[: max_len - 1] + "…"


def _si(value: float, unit: str) -> str:
    """1e3 -> '1e3' (no unit) or '1 kB' (unit 'B'); 2e5 -> '2e5' / '200 kB'."""
    if not unit:
        exponent = int(math.floor(math.log10(value) + 1e-9))
        mantissa = value / 10 ** exponent
        if -2 <= exponent <= 2:
            return f"{value:g}"
        return f"{mantissa:g}e{exponent}"
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k"), (1, "")):
        if value >= scale:
            return f"{value / scale:g} {prefix}{unit}"
    return f"{value:g} {unit}"


def log_ticks(values: Iterable[float], unit: str = "") -> tuple[list[float], list[str]]:
    """Tick values and labels for a log axis over ``values``: powers of ten only (1e3, 1e4 …), no minor
    digits; over less than two decades also 2× and 5× (so a narrow range still has labels).

    ``unit``: 'B' labels bytes as '10 kB', '1 MB' (decimal prefixes, the ticks are powers of ten);
    'ms' -> '10 ms'; '' -> '1e3' (and plain numbers between 0.01 and 100).
    """
    finite = [float(v) for v in values if v is not None and math.isfinite(float(v)) and float(v) > 0]
    if not finite:
        return [], []
    lo = math.floor(math.log10(min(finite)) + 1e-9)
    hi = math.ceil(math.log10(max(finite)) - 1e-9)
    hi = max(hi, lo + 1)
    steps = (1,) if hi - lo >= 3 else (1, 2, 5)
    ticks = [m * 10.0 ** e for e in range(lo, hi + 1) for m in steps if m * 10.0 ** e <= 10.0 ** hi]
    return ticks, [_si(t, unit) for t in ticks]


def set_log_axis(fig, axis: str, values: Iterable[float], unit: str = "", **axis_kw) -> None:
    """Make ``fig``'s x or y axis logarithmic with :func:`log_ticks` (no minor tick labels)."""
    tickvals, ticktext = log_ticks(values, unit)
    update = fig.update_yaxes if axis == "y" else fig.update_xaxes
    kw = dict(type="log", minor=dict(ticks="", showgrid=False), **axis_kw)
    if tickvals:
        kw.update(tickmode="array", tickvals=tickvals, ticktext=ticktext)
    update(**kw)


def set_integer_axis(fig, axis: str, values: Iterable[float], **axis_kw) -> None:
    """Whole-number ticks (tasks, epochs): every integer up to 12 of them, else every k-th; no 0.5."""
    ints = [int(v) for v in values if v is not None and math.isfinite(float(v))]
    update = fig.update_xaxes if axis == "x" else fig.update_yaxes
    span = (max(ints) - min(ints) + 1) if ints else 1
    update(tickmode="linear", tick0=0, dtick=max(1, math.ceil(span / 12)), tickformat="d", **axis_kw)
