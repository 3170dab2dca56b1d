"""The ``diffalign evidence FAMILY`` families: where each one's runner, report formatter and acceptance checks live.

A new evidence family adds one row here (and its name to ``diffalign.cli.EVIDENCE_FAMILIES``, kept copied there so
that ``diffalign --help`` imports no torch; tests/test_cli_errors.py checks the two agree)."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class EvidenceCommand:
    """One family: ``module``'s ``run(output_dir, *, methods, n_per_prompt, overrides, ...) -> report``, its
    ``format_report(report) -> str`` and, where it has acceptance criteria, ``checks(report) -> dict``."""

    module: str
    run: str
    format_report: str
    checks: str | None = None
    segmented: bool = False  # trains in segments, judged after each (takes --segments)
    paired: bool = False  # trains on toy preference pairs (takes --pairs KIND)

    def load(self, attr: str | None) -> Callable | None:
        return getattr(importlib.import_module(self.module), attr) if attr else None


COMMANDS: dict[str, EvidenceCommand] = {
    "offline": EvidenceCommand(
        "diffalign.toy.evidence", "run_offline_evidence", "format_report", "gain_checks", paired=True
    ),
    "flow": EvidenceCommand("diffalign.toy.evidence", "run_flow_evidence", "format_report", "gain_checks", paired=True),
    "llm": EvidenceCommand("diffalign.toy.llm_evidence", "run_llm_evidence", "format_llm_report"),
    "online": EvidenceCommand(
        "diffalign.toy.online_evidence", "run_online_evidence", "format_online_report", "issue_checks", True
    ),
    "soar": EvidenceCommand(
        "diffalign.toy.soar_evidence", "run_soar_evidence", "format_soar_report", "soar_checks", True
    ),
    "sail": EvidenceCommand("diffalign.toy.sail_evidence", "run_sail_evidence", "format_sail_report", "sail_checks"),
    "flux": EvidenceCommand("diffalign.toy.flux_evidence", "run_flux_evidence", "format_flux_report"),
    "nft": EvidenceCommand("diffalign.toy.nft_evidence", "run_nft_evidence", "format_nft_report", "issue_checks", True),
}
