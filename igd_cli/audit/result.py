"""The outcome of one audit check: its figures, a one-line summary, the verdict and what it means."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

Verdict = Literal["ok", "flag", "n/a"]


@dataclass
class CheckResult:
    """One row of the audit table.

    Example::

        CheckResult(4, "attack steps", "ok", {"curve": [...]}, "FGSM 70 % → APGD-100 62 %", "more steps win")
    """

    id: int
    name: str
    verdict: Verdict
    figures: dict[str, Any] = field(default_factory=dict)
    summary: str = ""
    meaning: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name, "verdict": self.verdict, "summary": self.summary,
                "meaning": self.meaning, "figures": self.figures}
