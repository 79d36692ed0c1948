"""The GPU check's result rows and their two renderings: the pass/fail table (stdout) and a JSON document."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

Status = Literal["PASS", "FAIL", "SKIP"]


@dataclass(frozen=True)
class Figure:
    """One measured number; unit "%" means value is a fraction (0.353 prints as 35.3%)."""
    name: str
    value: float | int | str
    unit: str = ""

    def text(self) -> str:
        if isinstance(self.value, str):
            return f"{self.name} {self.value}"
        if self.unit == "%":
            return f"{self.name} {self.value:.1%}"
        number = f"{self.value:,.0f}" if abs(self.value) >= 100 else f"{self.value:.3g}"
        return f"{self.name} {number}" + (f" {self.unit}" if self.unit else "")


@dataclass
class Row:
    name: str  # the --checks key
    title: str  # what the table shows
    status: Status
    seconds: float
    limit_s: float
    figures: list[Figure] = field(default_factory=list)
    detail: str = ""
    traceback: str | None = None  # JSON only: where an unexpected error came from


@dataclass
class Report:
    rows: list[Row]
    environment: dict[str, Any]  # device name, torch / CUDA versions, work dir ...
    standin: bool  # --device cpu: tiny stand-in workloads, not a GPU result
    budget_s: float

    @property
    def passed(self) -> bool:
        """Every row passed: a stand-in run may skip the GPU-only rows, a GPU run may not skip any."""
        allowed = ("PASS", "SKIP") if self.standin else ("PASS",)
        return bool(self.rows) and all(r.status in allowed for r in self.rows)

    @property
    def total_s(self) -> float:
        return sum(r.seconds for r in self.rows)


STANDIN_BANNER = ("CPU PLUMBING RUN (--device cpu): tiny stand-in workloads on the CPU to exercise this tool; "
                  "NOT a GPU result")


def render_table(report: Report) -> str:
    env = report.environment
    head = [f"neox GPU check: {env.get('device', '?')} · torch {env.get('torch', '?')}"
            + (f" · CUDA {env['cuda']}" if env.get("cuda") else "") + f" · work dir {env.get('work_dir', '?')}"]
    if report.standin:
        head.insert(0, STANDIN_BANNER)
    cells = [(r.title, r.status, f"{r.seconds:.0f}s / {r.limit_s:.0f}s", " · ".join(f.text() for f in r.figures))
             for r in report.rows]
    titles = ("check", "result", "time / limit", "figures")
    widths = [max(len(titles[i]), *(len(c[i]) for c in cells)) for i in range(3)]
    lines = [*head, "", "  ".join(t.ljust(w) for t, w in zip(titles, widths)) + "  " + titles[3]]
    lines.append("  ".join("-" * w for w in widths) + "  " + "-" * len(titles[3]))
    for row, cell in zip(report.rows, cells):
        lines.append("  ".join(c.ljust(w) for c, w in zip(cell, widths)) + "  " + cell[3])
        if row.detail:
            lines.append(" " * 4 + row.detail)
    counts = {s: sum(r.status == s for r in report.rows) for s in ("PASS", "FAIL", "SKIP")}
    lines += ["", f"{len(report.rows)} checks: {counts['PASS']} passed, {counts['FAIL']} failed, {counts['SKIP']} "
                  f"skipped in {report.total_s:.0f} s (budget {report.budget_s:.0f} s) -> "
                  + ("PASS" if report.passed else "FAIL") + (" (stand-in, not a GPU result)" if report.standin else "")]
    return "\n".join(lines)


def to_json(report: Report) -> str:
    document = {
        "passed": report.passed,
        "standin": report.standin,
        "note": STANDIN_BANNER if report.standin else "one CUDA GPU",
        "environment": report.environment,
        "budget_s": report.budget_s,
        "total_s": report.total_s,
        "rows": [asdict(r) for r in report.rows],
    }
    return json.dumps(document, indent=2)
