"""Comparison of evaluated runs: paired statistics, the paper's tables and figures, one HTML report."""
