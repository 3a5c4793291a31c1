"""The benches' one text-table printer: right-aligned columns in groups split by "|".

    COLS = (Col("turn", 4), "|", Col("TTFT ms kvreuse", 15, ".1f"), Col("ratio", 6, ".2f"))
    print_table(COLS, [[1, 140.6, 1.0], [2, 59.8, None]])
    # turn | TTFT ms kvreuse  ratio
    #    1 |           140.6   1.00
    #    2 |            59.8      -
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Sequence

SEP = "|"


@dataclass(frozen=True)
class Col:
    """One column: its header, the width its cells are right-aligned to, the format spec of its numbers."""

    head: str
    width: int = 0
    spec: str = ""


def cell(value: Any, spec: str = "") -> str:
    """A value as a table shows it: None as "-", text as given, a number through `spec`."""
    if value is None:
        return "-"
    return value if isinstance(value, str) else format(value, spec)


def table_line(cols: Sequence[Col | str], cells: Sequence[str]) -> str:
    """One line of `cells` (already text) under `cols`; a line shorter than `cols` ends after its last cell's
    group separator, as a ratio row under the first groups does."""
    parts, i = [], 0
    for c in cols:
        if c == SEP:
            parts.append(SEP)
            continue
        if i >= len(cells):
            break
        parts.append(format(cells[i], f">{c.width}"))
        i += 1
    return " ".join(parts)


def print_table(cols: Sequence[Col | str], rows: Iterable[Sequence[Any]]) -> None:
    """Print the header of `cols` and one line per row (one value per column, formatted by `cell`)."""
    heads = [c for c in cols if c != SEP]
    print(table_line(cols, [c.head for c in heads]))
    for row in rows:
        print(table_line(cols, [cell(v, c.spec) for v, c in zip(row, heads)]))
