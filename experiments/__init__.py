"""Experiments: grids of runs, their launchers and the comparison report."""
