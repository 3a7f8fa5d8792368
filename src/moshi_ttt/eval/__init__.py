"""Evaluation: does the memory help? Each ``moshi-ttt eval ...`` command writes a report
(``report.md`` + ``report.json`` + PNG plots) with ``eval.report``."""
