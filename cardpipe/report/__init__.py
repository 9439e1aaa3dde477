"""The run report: the run's facts (``results/run.json``) and a self-contained page of charts
(``results/report.html``, Vega-Lite, opens offline)."""

from cardpipe.report.facts import RunFacts, gather_facts
from cardpipe.report.html import render_report
from cardpipe.report.write import read_run_json, write_report, write_run_json, write_run_report

__all__ = [
    "RunFacts",
    "gather_facts",
    "read_run_json",
    "render_report",
    "write_report",
    "write_run_json",
    "write_run_report",
]
