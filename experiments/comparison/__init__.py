"""`main.py compare`: runs of several models side by side (tables.py), paired statistics against a reference
model (stats.py), figures (figures.py) and one self-contained HTML report (report.py); compare.py ties them
together."""
from .compare import RunResult, compare

__all__ = ["RunResult", "compare"]
