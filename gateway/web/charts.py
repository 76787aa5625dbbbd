"""The sessions page's charts, drawn by pygal as SVG on the server (no script, no CDN).

Line time and cost per day, bytes each way per session, and line efficiency: the
payload a session moved against what the line could carry at its connect rate in the
time it was up, which shows protocol overhead and idle time on the bill.  A modem line
is full duplex (sending and fetching run at once, each at the connect rate), so the
busier direction is measured against the rate.
"""
from __future__ import annotations

import datetime as dt
from collections import defaultdict

import pygal
from pygal.style import CleanStyle

from spool.sessions import SessionRecord

# js=[]: pygal's tooltips script comes from its CDN, which an office behind a dial-up
# link (or a test browser without Internet) would wait for.
_STYLE = CleanStyle(font_family="system-ui, sans-serif", title_font_size=16, label_font_size=11,
                    major_label_font_size=11, legend_font_size=12, background="white", plot_background="white")
_COMMON = dict(style=_STYLE, js=[], disable_xml_declaration=True, height=280, width=800, legend_at_bottom=True,
               x_label_rotation=30, print_values=False, y_labels_major_count=5, show_minor_y_labels=False,
               value_formatter=lambda v: _number(v))


def _number(v: float) -> str:
    """Axis labels a person reads: 5,000 and 0.013, not 5000.0 and 0.0133333."""
    return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.2g}"


def _svg(chart) -> str:
    return chart.render(is_unicode=True)


def line_time_per_day(records: list[SessionRecord], currency: str, days: int = 30) -> str:
    today = dt.date.today()
    span = [today - dt.timedelta(days=n) for n in range(days - 1, -1, -1)]
    minutes: dict[dt.date, float] = defaultdict(float)
    cost: dict[dt.date, float] = defaultdict(float)
    for r in records:
        day = dt.date.fromtimestamp(r.started)
        minutes[day] += r.connected_seconds / 60
        cost[day] += r.cost
    chart = pygal.Bar(title="Line time and cost per day", **_COMMON)
    chart.x_labels = [d.strftime("%m-%d") for d in span]
    chart.add("minutes online", [round(minutes[d], 2) for d in span])
    chart.add(f"cost ({currency})" if currency else "cost", [round(cost[d], 2) for d in span], secondary=True)
    return _svg(chart)


def bytes_per_session(rows: list[tuple[int, SessionRecord]]) -> str:
    chart = pygal.Bar(title="Bytes per session", **_COMMON)
    chart.x_labels = [str(sid) for sid, _ in rows]
    chart.add("up (sent)", [r.bytes_up for _, r in rows])
    chart.add("down (fetched)", [r.bytes_down for _, r in rows])
    return _svg(chart)


def efficiency(r: SessionRecord) -> float | None:
    """Percent of the line's capacity (connect rate x time up) that was payload, in the
    busier direction."""
    if not r.connect_rate or r.connected_seconds <= 0:
        return None
    return round(100 * 8 * max(r.bytes_up, r.bytes_down) / (r.connect_rate * r.connected_seconds), 1)


def efficiency_per_session(rows: list[tuple[int, SessionRecord]]) -> str:
    chart = pygal.Bar(title="Line efficiency per session (payload of the busier direction "
                            "/ connect rate x time up, %)", **_COMMON)
    chart.x_labels = [str(sid) for sid, _ in rows]
    chart.add("efficiency %", [efficiency(r) for _, r in rows])
    return _svg(chart)
