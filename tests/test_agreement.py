"""Agreement figures against hand-worked numbers and published worked examples."""

from __future__ import annotations

import pytest

from rlhf.agreement import cohen_kappa, fleiss_kappa, krippendorff_alpha


def test_cohen_kappa_worked_example():
    # 50 items: both yes 20, A yes/B no 5, A no/B yes 10, both no 15 -> p_o = .7, p_e = .5, kappa = .4
    a = ["y"] * 20 + ["y"] * 5 + ["n"] * 10 + ["n"] * 15
    b = ["y"] * 20 + ["n"] * 5 + ["y"] * 10 + ["n"] * 15
    assert cohen_kappa(a, b) == pytest.approx(0.4)
    assert cohen_kappa(["A", "B"], ["A", "B"]) == 1.0


def test_fleiss_kappa_published_example():
    # Fleiss (1971)-style table as worked on Wikipedia: 10 items, 14 raters, 5 categories -> kappa = 0.210
    table = [[0, 0, 0, 0, 14], [0, 2, 6, 4, 2], [0, 0, 3, 5, 6], [0, 3, 9, 2, 0], [2, 2, 8, 1, 1],
             [7, 7, 0, 0, 0], [3, 2, 6, 3, 0], [2, 5, 3, 2, 2], [6, 5, 2, 1, 0], [0, 2, 2, 3, 7]]
    items = [[cat for cat, n in enumerate(row) for _ in range(n)] for row in table]
    assert fleiss_kappa(items) == pytest.approx(0.210, abs=5e-4)


KRIPPENDORFF_2011 = [  # Krippendorff (2011), the 4-observer, 12-unit reliability data with missing values
    [1, 1, 1], [2, 2, 3, 2], [3, 3, 3, 3], [3, 3, 3, 3], [2, 2, 2, 2], [1, 2, 3, 4],
    [4, 4, 4, 4], [1, 1, 2, 1], [2, 2, 2, 2], [5, 5, 5], [1, 1], [3],
]


def test_krippendorff_alpha_published_example():
    assert krippendorff_alpha(KRIPPENDORFF_2011, "nominal") == pytest.approx(0.743, abs=5e-4)
    assert krippendorff_alpha(KRIPPENDORFF_2011, "ordinal", order=[1, 2, 3, 4, 5]) == pytest.approx(0.815, abs=5e-4)


def test_krippendorff_alpha_by_hand():
    # Units (A, A) and (A, B): coincidences AA 2, AB 1, BA 1; n_A = 3, n_B = 1, n = 4.
    # D_o = (1 + 1) / 4 = 0.5; D_e = (3 * 1 + 1 * 3) / (4 * 3) = 0.5; alpha = 1 - D_o / D_e = 0.
    assert krippendorff_alpha([["A", "A"], ["A", "B"]]) == pytest.approx(0.0)
    assert krippendorff_alpha([["A", "A"], ["B", "B"]]) == pytest.approx(1.0)


def test_kendall_tau_b_by_hand():
    from rlhf.agreement import kendall_tau

    assert kendall_tau([1, 2, 3, 4], [1, 2, 3, 4]) == pytest.approx(1.0)
    assert kendall_tau([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # One swapped neighbour: 6 pairs, 5 concordant, 1 discordant -> (5 - 1) / 6.
    assert kendall_tau([1, 2, 3, 4], [2, 1, 3, 4]) == pytest.approx(4 / 6)
    # A tie in the first ranking: 5 concordant, the tied pair neither; tau-b = 5 / sqrt((6 - 1) * (6 - 0)).
    assert kendall_tau([1, 1, 2, 3], [1, 2, 3, 4]) == pytest.approx(5 / 30 ** 0.5)
    with pytest.raises(ValueError):
        kendall_tau([1, 1, 1], [1, 2, 3])
