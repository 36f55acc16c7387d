"""Paired statistics on per-case scores of two models evaluated on the same cases.

Every function takes 1-D arrays ordered by case (index i is the same case in both) and returns plain numbers.

Choices, made once here so that every table states the same thing:
  - Differences are model minus reference, rounded to DECIMALS places before anything else: averaging
    replicates leaves float noise (1e-16) that would otherwise turn equal scores into tiny non-zero
    differences and break ties (scipy's wilcoxon documentation recommends this rounding).
  - Zero differences (a case scored the same by both, e.g. an absent organ with Dice 1 for both) carry no
    evidence either way and are dropped (zero_method="wilcox", Wilcoxon's original rule); the test runs on
    the n_nonzero remaining cases.
  - Method chosen explicitly, not by scipy's version-dependent "auto": with no tied |differences| the exact
    null distribution ("exact"); with ties the sign-flip permutation distribution, which scipy enumerates
    exactly for up to log2(N_PERMUTATIONS) = 14 differences and samples (seeded) beyond.
  - No test with fewer than MIN_CASES paired cases, or fewer than MIN_CASES non-zero differences (the
    exact two-sided p cannot go below 2 / 2**n, 0.0625 for n = 5), nor when every difference is zero:
    p is NaN and the note says why. Such comparisons are not part of a Holm family.
  - The bootstrap confidence interval is a percentile interval of the mean difference over cases.
"""
import numpy as np
from scipy import stats

MIN_CASES = 6
DECIMALS = 9
N_PERMUTATIONS = 2 ** 14
N_BOOTSTRAP = 10_000
BOOTSTRAP_SEED = 0
CONFIDENCE = 0.95


def paired_differences(scores, reference):
    """scores - reference per case, rounded to DECIMALS; both must be 1-D, equally long and finite."""
    a = np.asarray(scores, dtype=np.float64)
    b = np.asarray(reference, dtype=np.float64)
    if a.ndim != 1 or a.shape != b.shape:
        raise ValueError(f"paired scores must be two 1-D arrays of one length, got shapes {a.shape} and {b.shape}")
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
        raise ValueError("paired scores must be finite")
    return np.round(a - b, DECIMALS)


def _method(nonzero):
    """scipy's `method` for these non-zero differences: exact without ties, a permutation test with them."""
    _, counts = np.unique(np.abs(nonzero), return_counts=True)
    if np.all(counts == 1):
        return "exact"
    return stats.PermutationMethod(n_resamples=N_PERMUTATIONS, rng=np.random.default_rng(BOOTSTRAP_SEED))


def wilcoxon_test(scores, reference):
    """Paired two-sided Wilcoxon signed-rank test of scores against reference.

    Returns {"n", "n_nonzero", "statistic", "p", "method", "note"}: statistic is scipy's (the smaller of
    the positive and negative rank sums), p and statistic are NaN when no test was run, and note says why
    (or how many zero differences were dropped).
    """
    d = paired_differences(scores, reference)
    nonzero = d[d != 0]
    result = {"n": d.size, "n_nonzero": nonzero.size, "statistic": np.nan, "p": np.nan, "method": "", "note": ""}
    dropped = d.size - nonzero.size
    if d.size < MIN_CASES:
        result["note"] = f"no test: {d.size} paired cases, fewer than {MIN_CASES}"
    elif nonzero.size == 0:
        result["note"] = "no test: identical scores on every case"
    elif nonzero.size < MIN_CASES:
        result["note"] = (f"no test: only {nonzero.size} cases differ ({dropped} zero differences dropped), "
                          f"fewer than {MIN_CASES}")
    else:
        method = _method(nonzero)
        res = stats.wilcoxon(nonzero, zero_method="wilcox", alternative="two-sided", method=method)
        result.update(statistic=float(res.statistic), p=float(res.pvalue),
                      method=method if isinstance(method, str) else "permutation")
        if dropped:
            result["note"] = f"{dropped} zero differences dropped"
    return result


def holm(pvalues):
    """Holm's step-down adjusted p-values, in the input order; NaN entries (tests not run) stay NaN and are
    not counted in the family. Sorted ascending, p_(i) becomes max_{j<=i} min(1, (m - j + 1) p_(j))."""
    p = np.asarray(pvalues, dtype=np.float64)
    adjusted = np.full(p.shape, np.nan)
    ran = np.flatnonzero(~np.isnan(p))
    if ran.size == 0:
        return adjusted
    order = ran[np.argsort(p[ran], kind="stable")]
    m = order.size
    scaled = np.minimum(1.0, (m - np.arange(m)) * p[order])
    adjusted[order] = np.maximum.accumulate(scaled)
    return adjusted


def bootstrap_mean_ci(differences, n_resamples=N_BOOTSTRAP, seed=BOOTSTRAP_SEED, confidence=CONFIDENCE):
    """(low, high): percentile bootstrap interval of the mean of `differences`, resampling cases with
    replacement. All resamples are drawn as one (n_resamples, n) index array, as scipy.stats.bootstrap
    draws them, so equal seeds give equal intervals."""
    d = np.asarray(differences, dtype=np.float64)
    if d.ndim != 1 or d.size == 0:
        raise ValueError(f"bootstrap needs a non-empty 1-D array, got shape {d.shape}")
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, d.size, size=(n_resamples, d.size))].mean(axis=1)
    alpha = (1.0 - confidence) / 2.0
    low, high = np.quantile(means, [alpha, 1.0 - alpha])
    return float(low), float(high)


def wins_ties_losses(scores, reference, higher_is_better=True):
    """Cases where the model beats, equals (difference zero after rounding) or trails the reference."""
    d = paired_differences(scores, reference)
    if not higher_is_better:
        d = -d
    return int(np.sum(d > 0)), int(np.sum(d == 0)), int(np.sum(d < 0))


def compare_paired(scores, reference, higher_is_better=True):
    """Everything stats.csv reports for one comparison: the test, the mean difference (model minus
    reference) with its bootstrap interval, and wins/ties/losses. Below MIN_CASES paired cases there is
    no interval either (a percentile bootstrap over a handful of cases is not a confidence interval)."""
    d = paired_differences(scores, reference)
    result = wilcoxon_test(scores, reference)
    low, high = bootstrap_mean_ci(d) if d.size >= MIN_CASES else (np.nan, np.nan)
    wins, ties, losses = wins_ties_losses(scores, reference, higher_is_better)
    result.update(mean_diff=float(d.mean()), ci_low=low, ci_high=high, wins=wins, ties=ties, losses=losses)
    return result
