"""Evaluation reports: ``report.json`` (machine-readable) + ``report.md`` in an output folder, and small
table formatters (markdown for the report, aligned plain text for a CLI's final summary)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from mgfm.files import atomic_path, write_atomic


def jsonable(value: Any) -> Any:
    """``value`` with numpy scalars/arrays, paths and tuples turned into JSON types; NaN/inf -> None; any other
    object (a dtype, a device) -> its text."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def write_report(out_dir: str | Path, report: dict, markdown: str, title: str) -> tuple[Path, Path]:
    """Write ``out_dir/report.json`` (``report`` plus ``"title"``) and ``out_dir/report.md`` (``# title``
    then ``markdown``), each atomically, JSON last. Returns ``(json_path, md_path)``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    md_path, json_path = out / "report.md", out / "report.json"
    write_atomic(md_path, f"# {title}\n\n{markdown.rstrip()}\n")
    payload = {"title": title, **jsonable(report)}
    write_atomic(json_path, json.dumps(payload, indent=2, allow_nan=False) + "\n")
    return json_path, md_path


def plus_minus(value: float, interval: Sequence[float] | None, scale: float = 1.0, digits: int = 3) -> str:
    """``value ± b`` with ``b`` the half-width of ``interval`` ([low, high]), both times ``scale`` (100 for
    per cent); just the value when there is no interval."""
    if interval is None:
        return f"{scale * value:.{digits}f}"
    return f"{scale * value:.{digits}f} ± {scale * (interval[1] - interval[0]) / 2:.{digits}f}"


def _cell(value: Any, floatfmt: str) -> str:
    if value is None:
        return "-"
    if isinstance(value, (float, np.floating)):
        return format(float(value), floatfmt) if math.isfinite(value) else str(float(value))
    return str(value)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], floatfmt: str = ".4f") -> str:
    """A GitHub markdown table; floats formatted with ``floatfmt``, None as ``-``, ``|`` escaped."""
    if any(len(r) != len(headers) for r in rows):
        raise ValueError(f"every row needs {len(headers)} cells (one per header)")

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    out = [line([str(h) for h in headers]), "| " + " | ".join("---" for _ in headers) + " |"]
    out += [line([_cell(v, floatfmt) for v in r]) for r in rows]
    return "\n".join(out) + "\n"


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], floatfmt: str = ".4f") -> str:
    """Aligned plain-text table (text left-aligned, numbers right-aligned) for a CLI's final print."""
    if any(len(r) != len(headers) for r in rows):
        raise ValueError(f"every row needs {len(headers)} cells (one per header)")
    cells = [[str(h) for h in headers]] + [[_cell(v, floatfmt) for v in r] for r in rows]
    def is_number(v: Any) -> bool:
        return isinstance(v, (int, float, np.number)) and not isinstance(v, (bool, np.bool_))

    numeric = [all(v is None or is_number(v) for v in (r[j] for r in rows)) for j in range(len(headers))]
    widths = [max(len(row[j]) for row in cells) for j in range(len(headers))]

    def line(row: list[str]) -> str:
        return "  ".join(c.rjust(w) if num else c.ljust(w) for c, w, num in zip(row, widths, numeric)).rstrip()

    return "\n".join([line(cells[0]), "  ".join("-" * w for w in widths)] + [line(r) for r in cells[1:]]) + "\n"


def save_figure(fig, path: str | Path) -> Path:
    """Write a matplotlib figure as PNG atomically (temp file + rename); returns the path."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return Path(path)
