"""A run's report for a person: latency and throughput over time with the fault intervals
shaded (PNG), and an HTML page tying them to the verdict, the checkers and the faults."""

from __future__ import annotations

import html
import json
from collections import Counter
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: no display here or in CI
import matplotlib.pyplot as plt

from jepsen_like.history import History

COLORS = {"ok": "#2a9d8f", "fail": "#e76f51", "info": "#f4a261"}
FAULT_COLORS = {"kill": "#d62828", "pause": "#6a4c93", "partition": "#1d3557"}


def _completed(history: History) -> list[tuple[float, float, str, str]]:
    """(completion time s, latency ms, kind, f) for every completed operation."""
    invoked: dict[int, Any] = {}
    rows = []
    for op in history:
        if op.kind == "invoke":
            invoked[op.process] = op
        elif op.process in invoked:
            start = invoked.pop(op.process)
            rows.append((op.time_ns, (op.time_ns - start.time_ns) / 1e6, op.kind, op.f))
    if not rows:
        return []
    origin = min(op.time_ns for op in history)
    return [((t - origin) / 1e9, latency, kind, f) for t, latency, kind, f in rows]


def _shade(axis: Any, summary: dict[str, Any], origin_ns: int) -> None:
    seen: set[str] = set()
    for fault in summary.get("faults", []):
        kind = fault["kind"]
        start = (fault["started_ns"] - origin_ns) / 1e9
        end = ((fault["ended_ns"] or fault["started_ns"]) - origin_ns) / 1e9
        axis.axvspan(
            start,
            max(end, start + 0.1),
            color=FAULT_COLORS.get(kind, "#888888"),
            alpha=0.15,
            label=kind if kind not in seen else None,
        )
        seen.add(kind)


def write_report(out: Path, history: History, summary: dict[str, Any]) -> None:
    rows = _completed(history)
    origin = min((op.time_ns for op in history), default=0)
    figure, axis = plt.subplots(figsize=(11, 4))
    for kind, color in COLORS.items():
        points = [(t, latency) for t, latency, k, _ in rows if k == kind]
        if points:
            xs, ys = zip(*points, strict=True)
            axis.scatter(xs, ys, s=4, color=color, label=kind, alpha=0.7)
    _shade(axis, summary, origin)
    axis.set_yscale("log")
    axis.set_xlabel("time (s)")
    axis.set_ylabel("latency (ms)")
    axis.set_title(f"{summary['workload']}: latency of each operation")
    axis.legend(loc="upper right", fontsize=8)
    figure.tight_layout()
    figure.savefig(out / "latency.png", dpi=100)
    plt.close(figure)

    figure, axis = plt.subplots(figsize=(11, 3.5))
    for kind, color in COLORS.items():
        per_second = Counter(int(t) for t, _, k, _ in rows if k == kind)
        if per_second:
            seconds = range(0, max(per_second) + 1)
            axis.plot(seconds, [per_second.get(s, 0) for s in seconds], color=color, label=kind)
    _shade(axis, summary, origin)
    axis.set_xlabel("time (s)")
    axis.set_ylabel("operations / s")
    axis.set_title("throughput")
    axis.legend(loc="upper right", fontsize=8)
    figure.tight_layout()
    figure.savefig(out / "throughput.png", dpi=100)
    plt.close(figure)

    checkers = "".join(
        f"<tr><td>{html.escape(name)}</td><td class='{_css(c['valid'])}'>{_word(c['valid'])}"
        f"</td><td><pre>{html.escape(json.dumps(c['details'], indent=1, default=str)[:4000])}"
        "</pre></td></tr>"
        for name, c in summary["checkers"].items()
    )
    faults = "".join(
        f"<tr><td>{html.escape(f['kind'])}</td><td>{html.escape(json.dumps(f['detail']))}</td>"
        f"<td>{(f['started_ns'] - origin) / 1e9:.1f}s</td>"
        f"<td>{((f['ended_ns'] or f['started_ns']) - origin) / 1e9:.1f}s</td></tr>"
        for f in summary["faults"]
    )
    ops = ", ".join(f"{k}: {v}" for k, v in sorted(summary["ops"].items()))
    page = f"""<!doctype html><meta charset="utf-8"><title>jepsen_like: {summary["verdict"]}</title>
<style>body{{font-family:sans-serif;max-width:1150px;margin:2em auto}}td,th{{padding:4px 8px;
vertical-align:top;border-bottom:1px solid #ddd}}.valid{{color:#2a9d8f}}.invalid{{color:#d62828;
font-weight:bold}}.unknown{{color:#f4a261}}pre{{margin:0;font-size:11px}}</style>
<h1>Verdict: <span class="{summary["verdict"]}">{summary["verdict"]}</span></h1>
<p>workload <b>{html.escape(summary["workload"])}</b>, nemesis
{html.escape(", ".join(summary["nemeses"]) or "none")}, {summary["time_s"]:.0f}s,
{summary["nodes"]} nodes, {summary["shards"]} shards, concurrency {summary["concurrency"]},
seed {summary["seed"]}{
        ", <b>broken mode " + html.escape(str(summary["broken"])) + "</b>"
        if summary["broken"]
        else ""
    }</p><p>operations: {html.escape(ops)}</p>
<img src="latency.png" width="1100"><img src="throughput.png" width="1100">
<h2>Checkers</h2><table>{checkers}</table>
<h2>Faults</h2><table><tr><th>kind</th><th>detail</th><th>from</th><th>to</th></tr>{faults}</table>
<p><a href="history.jsonl">history.jsonl</a> · <a href="summary.json">summary.json</a></p>
"""
    (out / "index.html").write_text(page)


def _word(valid: bool | None) -> str:
    return "valid" if valid else "invalid" if valid is False else "unknown"


def _css(valid: bool | None) -> str:
    return _word(valid)
