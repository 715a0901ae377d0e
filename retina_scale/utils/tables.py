"""Fixed-width text tables and Markdown tables for people, and the number formats they share.

Example:
    >>> print(text_table(("stage", "kappa"), [("tiny", "0.61"), ("median", "0.8")], right=(1,)))
    stage   kappa
    ------  -----
    tiny     0.61
    median    0.8
    >>> number(None), number(0.12345), number(3e-4, ".3g")
    ('-', '0.1235', '0.0003')
"""

from __future__ import annotations

from typing import Iterable, Sequence


def number(value, spec: str = ".4f", missing: str = "-") -> str:
    """``value`` formatted with ``spec``, or ``missing`` for None."""
    return missing if value is None else format(value, spec)


def text_table(header: Sequence[str], rows: Iterable[Sequence[str]], right: Iterable[int] = (),
               title: str | None = None) -> str:
    """A table with columns padded to their widest cell and a dashed line under the header.

    Args:
        header: the column names.
        rows: the cells, already formatted as strings.
        right: indices of the columns to right-align (numbers); the others are left-aligned.
        title: an optional first line.
    """
    rows = [tuple(header)] + [tuple(r) for r in rows]
    right = set(right)
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]

    def line(cells):
        return "  ".join(c.rjust(w) if i in right else c.ljust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    lines = [line(r) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(([title] if title else []) + lines)


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    """The lines of a Markdown table (a header, its rule, a line per row)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
