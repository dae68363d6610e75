"""Where the experiments write: one CSV and one markdown file per experiment under results/."""

from __future__ import annotations

import csv
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def write_results(name: str, rows: list[dict], markdown: list[str]) -> None:
    """Write ``rows`` to results/NAME.csv (columns: the first row's keys) and ``markdown``
    (lines) to results/NAME.md."""
    RESULTS.mkdir(exist_ok=True)
    with open(RESULTS / f"{name}.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    (RESULTS / f"{name}.md").write_text("\n".join(markdown) + "\n")
