"""Experiments: grids of runs over models and seeds or folds, their launchers, and the comparison report."""
