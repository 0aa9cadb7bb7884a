"""Chi-square tests for sampling tests: goodness of fit to known probabilities, and two samples alike."""

from __future__ import annotations

from collections import Counter
from collections.abc import Hashable, Mapping

import torch

MIN_EXPECTED = 5.0  # cells expected to hold fewer draws are pooled into one


def _p_value(statistic: float, dof: int) -> float:
    """Survival function of the chi-square distribution (the regularised upper incomplete gamma)."""
    if dof < 1:
        return 1.0
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64),
                                         torch.tensor(statistic / 2, dtype=torch.float64)))


def goodness_of_fit(counts: Mapping[Hashable, int], probs: Mapping[Hashable, float]) -> float:
    """p-value of ``counts`` being draws from ``probs`` (outcomes outside ``probs`` have probability 0)."""
    total = sum(counts.values())
    if any(key not in probs or probs[key] == 0 for key, n in counts.items() if n):
        return 0.0
    statistic, dof, pooled_expected, pooled_observed = 0.0, -1, 0.0, 0
    for key, p in probs.items():
        expected, observed = p * total, counts.get(key, 0)
        if expected < MIN_EXPECTED:
            pooled_expected, pooled_observed = pooled_expected + expected, pooled_observed + observed
            continue
        statistic += (observed - expected) ** 2 / expected
        dof += 1
    if pooled_expected > 0:
        statistic += (pooled_observed - pooled_expected) ** 2 / pooled_expected
        dof += 1
    return _p_value(statistic, dof)


def two_samples(a: Counter, b: Counter) -> float:
    """p-value of two samples of outcomes coming from one distribution (chi-square test of homogeneity)."""
    total_a, total_b = sum(a.values()), sum(b.values())
    total = total_a + total_b
    statistic, dof = 0.0, -1
    rare_a = rare_b = 0
    for key in set(a) | set(b):
        if (a[key] + b[key]) * min(total_a, total_b) / total < MIN_EXPECTED:
            rare_a, rare_b = rare_a + a[key], rare_b + b[key]
            continue
        statistic += _cell(a[key], b[key], total_a, total_b)
        dof += 1
    if rare_a + rare_b:
        statistic += _cell(rare_a, rare_b, total_a, total_b)
        dof += 1
    return _p_value(statistic, dof)


def _cell(count_a: int, count_b: int, total_a: int, total_b: int) -> float:
    both = count_a + count_b
    expected_a = both * total_a / (total_a + total_b)
    expected_b = both * total_b / (total_a + total_b)
    return (count_a - expected_a) ** 2 / expected_a + (count_b - expected_b) ** 2 / expected_b
