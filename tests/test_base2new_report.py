"""Base-to-new's generalised setting: the all-class accuracies of base and new test images and their harmonic mean,
in every result, in the seed summary and in the printed table, against hand-computed numbers."""

from __future__ import annotations

import pytest
import torch

from fewclip.protocols.protocol import BaseToNew, base_new_scores

# 4 classes: 0, 1 base; 2, 3 new. "within" = arg-max over the row's own group's columns, "all" = over all 4.
LOGITS = torch.tensor(
    [
        [5.0, 1.0, 9.0, 0.0],  # label 0: within base -> 0 (right); all -> 2 (wrong)
        [1.0, 2.0, 0.0, 0.0],  # label 1: within base -> 1 (right); all -> 1 (right)
        [1.0, 3.0, 0.0, 2.0],  # label 0: within base -> 1 (wrong); all -> 1 (wrong)
        [0.0, 0.0, 4.0, 1.0],  # label 2: within new -> 2 (right); all -> 2 (right)
        [6.0, 0.0, 1.0, 3.0],  # label 3: within new -> 3 (right); all -> 0 (wrong)
        [0.0, 0.0, 2.0, 1.0],  # label 3: within new -> 2 (wrong); all -> 2 (wrong)
        [0.0, 5.0, 3.0, 1.0],  # label 2: within new -> 2 (right); all -> 1 (wrong)
    ]
)
LABELS = torch.tensor([0, 1, 0, 2, 3, 3, 2])
# base rows: within 2/3, all 1/3; new rows: within 3/4, all 1/4
WITHIN_HM = 2 * (200 / 3) * 75 / (200 / 3 + 75)  # = 1200 / 17
ALL_HM = 2 * (100 / 3) * 25 / (100 / 3 + 25)  # = 200 / 7


def test_all_class_accuracies_and_their_hm_by_hand():
    scores = base_new_scores(LOGITS, LABELS, num_base=2)
    assert scores["base"] == pytest.approx(200 / 3) and scores["new"] == 75.0
    assert scores["harmonic_mean"] == pytest.approx(WITHIN_HM) == pytest.approx(1200 / 17)
    assert scores["base_all_classes"] == pytest.approx(100 / 3) and scores["new_all_classes"] == 25.0
    assert scores["all_classes_harmonic_mean"] == pytest.approx(ALL_HM) == pytest.approx(200 / 7)


def test_every_base2new_result_has_the_generalised_setting_under_both_base_scorings():
    default, _ = BaseToNew().evaluate(LOGITS, LABELS, 4)
    assert set(default) == {
        "base", "new", "harmonic_mean", "base_all_classes", "new_all_classes", "all_classes_harmonic_mean",
    }  # fmt: skip
    assert default["all_classes_harmonic_mean"] == pytest.approx(200 / 7)
    released, _ = BaseToNew(base_eval="all_classes").evaluate(LOGITS, LABELS, 4)
    # the headline base becomes the all-class one; the generalised setting does not change with it
    assert released["base"] == pytest.approx(100 / 3) and released["base_within_base"] == pytest.approx(200 / 3)
    assert released["harmonic_mean"] == pytest.approx(2 * (100 / 3) * 75 / (100 / 3 + 75))  # = 600 / 13
    assert released["all_classes_harmonic_mean"] == pytest.approx(200 / 7)


def test_odd_class_count_puts_the_middle_class_in_base():
    # 3 classes: base 0, 1 (ceil(3/2)); new 2. Drop class 3's column and rows from the case above.
    keep = LABELS < 3
    scores, _ = BaseToNew().evaluate(LOGITS[keep, :3], LABELS[keep], 3)
    # base rows as before (column 3 never won a base row); new rows 3 and 6: within -> 2, 2; all -> 2, 1
    assert scores["base"] == pytest.approx(200 / 3) and scores["base_all_classes"] == pytest.approx(100 / 3)
    assert scores["new"] == 100.0 and scores["new_all_classes"] == 50.0
    assert scores["all_classes_harmonic_mean"] == pytest.approx(2 * (100 / 3) * 50 / (100 / 3 + 50))  # = 40


def records() -> list[dict]:
    rows = [  # method, seed, base, new, base-all, new-all
        ("gda", 1, 80.0, 40.0, 60.0, 20.0),
        ("gda", 2, 60.0, 80.0, 40.0, 40.0),
        ("zero-shot", 1, 70.0, 70.0, 50.0, 50.0),
    ]
    return [
        {
            "method": m, "shots": 16, "seed": s,
            # the per-seed HMs are deliberately not the summary's: it takes the HM of the seed means
            "accuracy": {"base": b, "new": n, "harmonic_mean": -1.0, "base_all_classes": ba, "new_all_classes": na,
                         "all_classes_harmonic_mean": -1.0},
        }
        for m, s, b, n, ba, na in rows
    ]  # fmt: skip


def test_summary_has_seed_means_of_all_class_accuracies_and_the_hm_of_those_means():
    gda, zero = BaseToNew().summarize(records())
    assert (gda["method"], gda["shots"], gda["seeds"], gda["n"]) == ("gda", 16, [1, 2], 2)
    assert (gda["base"], gda["base_std"], gda["new"], gda["new_std"]) == (70.0, 10.0, 60.0, 20.0)
    assert (gda["base_all_classes"], gda["base_all_classes_std"]) == (50.0, 10.0)
    assert (gda["new_all_classes"], gda["new_all_classes_std"]) == (30.0, 10.0)
    assert gda["harmonic_mean"] == pytest.approx(2 * 70 * 60 / 130)
    # HM(50, 30) = 37.5; the mean of the per-seed all-class HMs would be (30 + 40) / 2 = 35
    assert gda["all_classes_harmonic_mean"] == pytest.approx(37.5)
    assert zero["all_classes_harmonic_mean"] == 50.0 and zero["n"] == 1


def test_table_shows_within_and_all_class_columns():
    rows = BaseToNew().summarize(records())
    lines = BaseToNew().format(rows, seeds_expected=2).splitlines()
    assert lines[0].split() == ["method", "shots", "base", "new", "HM", "base-all", "new-all", "HM-all"]
    gda = lines[2].split("  ")
    cells = [c.strip() for c in gda if c.strip()]
    assert cells == ["gda", "16", "70.00 ± 10.00", "60.00 ± 20.00", "64.62", "50.00 ± 10.00", "30.00 ± 10.00",
                     "37.50"]  # fmt: skip
    assert lines[3].split()[-3:] == ["50.00", "(1", "seeds)"]  # fewer seeds than expected: said after the row
    assert "all classes" in BaseToNew().describe()
