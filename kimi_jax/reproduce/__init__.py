"""Reproduction of the report's claims at toy scale (`python -m launch.reproduce`).

suites.py    which arms (ablations) and seeds a suite runs
runner.py    runs them, resuming, and rewrites the report after each
runs.py      what a claim reads from one run's metrics.jsonl
claims.py    the claims, each a set of effects over seeds
verdicts.py  the one rule that turns an effect into a verdict
figures.py   a figure per claim: mean over seeds and the min-max band
report.py    REPORT.md and report.json
"""
