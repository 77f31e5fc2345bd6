"""Plain-text tables for benchmark and CLI output."""

from __future__ import annotations


def text_table(rows: list[dict], cols: list[str], digits: int = 4) -> str:
    """Rows of dicts as an aligned plain-text table.

    Args:
        rows: One dict per row; missing keys print empty.
        cols: Column names, in order.
        digits: Decimals for floats.

    Returns:
        Header, separator and body lines.
    """

    def fmt(v: object) -> str:
        if isinstance(v, bool):
            return "yes" if v else "NO"
        if isinstance(v, float):
            return f"{v:.{digits}f}"
        return "" if v is None else str(v)

    widths = [max(len(c), *(len(fmt(r.get(c))) for r in rows)) for c in cols]
    head = " | ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True))
    sep = "-+-".join("-" * w for w in widths)
    body = "\n".join(" | ".join(fmt(r.get(c)).ljust(w) for c, w in zip(cols, widths, strict=True)) for r in rows)
    return f"{head}\n{sep}\n{body}"
