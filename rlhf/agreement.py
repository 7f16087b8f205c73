"""Inter-annotator agreement, as pure functions of label lists (no database).

  cohen_kappa        two annotators, the same items (Cohen 1960)
  fleiss_kappa       many annotators, every item rated by the same number of them (Fleiss 1971)
  krippendorff_alpha any number of annotators, missing ratings allowed, nominal or ordinal (Krippendorff 2011,
                     "Computing Krippendorff's Alpha-Reliability", the coincidence-matrix form)
  kendall_tau        two rankings of the same items, ties allowed (Kendall's tau-b, Kendall 1945)
"""

from __future__ import annotations

from collections import Counter
from itertools import permutations


def cohen_kappa(labels_a: list, labels_b: list) -> float:
    """(p_o - p_e) / (1 - p_e) for two raters' labels of the same items; 1.0 when both always agree on one label."""
    if len(labels_a) != len(labels_b) or not labels_a:
        raise ValueError("need two equally long, non-empty label lists")
    n = len(labels_a)
    p_o = sum(a == b for a, b in zip(labels_a, labels_b)) / n
    count_a, count_b = Counter(labels_a), Counter(labels_b)
    p_e = sum(count_a[k] * count_b[k] for k in count_a) / (n * n)
    return 1.0 if p_e == 1 else (p_o - p_e) / (1 - p_e)


def fleiss_kappa(items: list[list]) -> float:
    """Fleiss' kappa; `items` holds each item's labels (one per rater), every item with the same count."""
    if not items or len({len(i) for i in items}) != 1 or len(items[0]) < 2:
        raise ValueError("every item needs the same number (>= 2) of labels")
    n_items, n_raters = len(items), len(items[0])
    categories = sorted({label for item in items for label in item}, key=str)
    counts = [Counter(item) for item in items]
    p_j = [sum(c[k] for c in counts) / (n_items * n_raters) for k in categories]
    p_i = [(sum(v * v for v in c.values()) - n_raters) / (n_raters * (n_raters - 1)) for c in counts]
    p_bar, p_e = sum(p_i) / n_items, sum(p * p for p in p_j)
    return 1.0 if p_e == 1 else (p_bar - p_e) / (1 - p_e)


def krippendorff_alpha(units: list[list], level: str = "nominal", order: list | None = None) -> float:
    """Krippendorff's alpha = 1 - D_o / D_e from the coincidence matrix.

    units: each unit's values (any number of raters; units with fewer than two values are not pairable and are
    ignored). level: "nominal", or "ordinal" with `order` listing the values from lowest to highest.
    """
    pairable = [u for u in units if len(u) >= 2]
    if not pairable:
        raise ValueError("no unit has two or more values")
    coincidence: Counter = Counter()
    for unit in pairable:
        for c, k in permutations(range(len(unit)), 2):
            coincidence[(unit[c], unit[k])] += 1 / (len(unit) - 1)
    values = sorted({v for pair in coincidence for v in pair}, key=(order.index if order else str))
    n_c = {v: sum(coincidence[(v, k)] for k in values) for v in values}
    n = sum(n_c.values())

    if level == "nominal":
        def delta(c, k):
            return 0.0 if c == k else 1.0
    elif level == "ordinal":
        if order is None:
            raise ValueError("ordinal alpha needs `order`, the values from lowest to highest")
        rank = {v: order.index(v) for v in values}

        def delta(c, k):
            # Squared sum of the marginal frequencies between c and k, halving both ends (Krippendorff 2011, eq. 9).
            lo, hi = sorted((rank[c], rank[k]))
            between = [v for v in values if lo <= rank[v] <= hi]
            return (sum(n_c[v] for v in between) - (n_c[c] + n_c[k]) / 2) ** 2
    else:
        raise ValueError("level must be nominal or ordinal")

    observed = sum(coincidence[(c, k)] * delta(c, k) for c in values for k in values)
    expected = sum(n_c[c] * n_c[k] * delta(c, k) for c in values for k in values) / (n - 1)
    return 1.0 if expected == 0 else 1.0 - observed / expected


def kendall_tau(ranks_a: list, ranks_b: list) -> float:
    """Kendall's tau-b of two rankings of the same items (rank values, lower = better; equal values are ties):
    (concordant - discordant) / sqrt((n0 - ties_a) (n0 - ties_b)), n0 the number of item pairs. 1: the same
    order, -1: reversed. Undefined (ValueError) when either ranking ties everything."""
    if len(ranks_a) != len(ranks_b) or len(ranks_a) < 2:
        raise ValueError("need two equally long rankings of two or more items")
    concordant = discordant = ties_a = ties_b = 0
    n = len(ranks_a)
    for i in range(n):
        for j in range(i + 1, n):
            da, db = ranks_a[i] - ranks_a[j], ranks_b[i] - ranks_b[j]
            ties_a += da == 0
            ties_b += db == 0
            if da * db > 0:
                concordant += 1
            elif da * db < 0:
                discordant += 1
    n0 = n * (n - 1) // 2
    if ties_a == n0 or ties_b == n0:
        raise ValueError("tau-b is undefined when a ranking ties every item")
    return (concordant - discordant) / ((n0 - ties_a) * (n0 - ties_b)) ** 0.5
