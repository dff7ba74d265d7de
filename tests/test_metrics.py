"""Tests of the scoring: ontology correction, F1, ECE and the per-class table."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import f1_score

from celltype_bench import ontology as ont
from celltype_bench.contract import make_predictions
from celltype_bench.metrics import (
    expected_calibration_error,
    ontology_corrected,
    score_predictions,
)

T, CD4, B = "T cell", "CD4 T", "B cell"
L2C = {T: "CL:0000084", CD4: "CL:0000624", B: "CL:0000236"}


@pytest.fixture(scope="module")
def onto(tmp_path_factory):
    """The ontology, cached in a temporary directory instead of $HOME."""
    cache = tmp_path_factory.mktemp("cl-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(ont.CACHE_ENV, str(cache))
        ont.load_ontology.cache_clear()
        yield ont.load_ontology()


def one_hot(pred: list[str], classes: list[str]) -> pd.DataFrame:
    return pd.DataFrame([[1.0 if p == c else 0.0 for c in classes] for p in pred], columns=classes)


def table(true: list[str], pred: list[str], classes: list[str] | None = None) -> pd.DataFrame:
    classes = classes or [T, CD4, B]
    ids = [f"c{i}" for i in range(len(true))]
    return make_predictions(ids, true, one_hot(pred, classes))


def test_child_prediction_counts_right_parent_stays_wrong(onto):
    true = [T, CD4, T, B]
    pred = [CD4, T, B, B]
    got = ontology_corrected(true, pred, L2C, onto)
    # predicting the child CD4 T for a T cell is right; the parent for CD4 T stays wrong
    assert list(got) == [T, T, B, B]


def test_labels_without_cl_left_unchanged(onto):
    got = ontology_corrected(["weird", T], ["CD4 T", "other"], L2C, onto)
    assert list(got) == ["CD4 T", "other"]


def test_ontology_corrected_f1(onto):
    true = [T, T, CD4, CD4, B, B]
    pred = [CD4, T, T, CD4, B, B]
    s = score_predictions(table(true, pred), L2C, {}, onto)
    assert s["macro_f1"] < s["macro_f1_ontology"]
    by = {r["label"]: r for r in s["per_class"]}
    # T: both T cells counted right after correction (one was predicted CD4 T)
    corrected = [T, T, T, CD4, B, B]
    expected = f1_score(true, corrected, labels=[B, CD4, T], average=None, zero_division=0)
    assert by[B]["f1_ontology"] == pytest.approx(expected[0])
    assert by[CD4]["f1_ontology"] == pytest.approx(expected[1])
    assert by[T]["f1_ontology"] == pytest.approx(expected[2])
    assert by[T]["recall"] == pytest.approx(0.5)
    assert by[B]["f1"] == by[B]["f1_ontology"] == 1.0
    # CD4 T predicted as its parent stays wrong: recall of CD4 T remains 1/2
    assert by[CD4]["f1_ontology"] < 1.0


def test_macro_f1_matches_sklearn_hand_case(onto):
    true = [T, T, T, CD4, B, B]
    pred = [T, B, T, T, B, CD4]
    s = score_predictions(table(true, pred), L2C, {}, onto)
    # by hand: T p=2/3 r=2/3 f=2/3; CD4 p=0 r=0 f=0; B p=1/2 r=1/2 f=1/2
    assert s["macro_f1"] == pytest.approx((2 / 3 + 0 + 1 / 2) / 3)
    assert s["macro_f1"] == pytest.approx(f1_score(true, pred, average="macro"))
    assert s["weighted_f1"] == pytest.approx(f1_score(true, pred, average="weighted"))
    assert s["accuracy"] == pytest.approx(3 / 6)
    assert s["n_test"] == 6


def test_macro_f1_only_over_test_classes(onto):
    # the method knows B cell but no test cell is a B cell: B is not averaged in as 0
    true = [T, T, CD4]
    pred = [T, B, CD4]
    s = score_predictions(table(true, pred), L2C, {}, onto)
    assert [r["label"] for r in s["per_class"]] == [CD4, T]
    assert s["macro_f1"] == pytest.approx(
        f1_score(true, pred, labels=[CD4, T], average="macro", zero_division=0)
    )
    assert s["macro_f1"] > f1_score(true, pred, average="macro", zero_division=0)


def test_unseen_true_label_counts_wrong(onto):
    true = [T, "NK cell", B]
    pred = [T, T, B]
    s = score_predictions(table(true, pred, [T, B]), L2C, {}, onto)
    by = {r["label"]: r for r in s["per_class"]}
    assert by["NK cell"]["f1"] == 0.0 and by["NK cell"]["cl_id"] is None
    assert s["accuracy"] == pytest.approx(2 / 3)
    # the wrong cell is confidently wrong (conf 1, acc 0) -> ECE = 1/3
    assert s["ece"] == pytest.approx(1 / 3)


def test_ece_perfect_and_confidently_wrong():
    y = np.array([0, 1, 2, 1])
    assert expected_calibration_error(np.eye(3)[y], y) == pytest.approx(0.0)
    wrong = np.eye(3)[(y + 1) % 3]
    assert expected_calibration_error(wrong, y) == pytest.approx(1.0)
    confident = np.full((4, 3), 0.0025)
    confident[np.arange(4), (y + 1) % 3] = 0.995
    assert expected_calibration_error(confident, y) > 0.9


def test_ece_calibrated_bin():
    # 10 cells at confidence 0.7, 7 of them correct: calibrated -> ECE 0
    proba = np.tile([0.7, 0.3], (10, 1))
    y = np.array([0] * 7 + [1] * 3)
    assert expected_calibration_error(proba, y) == pytest.approx(0.0, abs=1e-12)
    # same confidence, only 2 correct -> |0.2 - 0.7| = 0.5
    y2 = np.array([0] * 2 + [1] * 8)
    assert expected_calibration_error(proba, y2) == pytest.approx(0.5)
    # missing class (-1) is always wrong
    assert expected_calibration_error(proba[:1], np.array([-1])) == pytest.approx(0.7)


def test_score_dict_json_and_train_counts(onto):
    true = [T, CD4, B, B]
    pred = [T, CD4, B, T]
    s = score_predictions(table(true, pred), L2C, {T: 100, B: 7}, onto)
    json.dumps(s, allow_nan=False)
    assert set(s) == {
        "n_test",
        "accuracy",
        "macro_f1",
        "macro_f1_ontology",
        "weighted_f1",
        "ece",
        "per_class",
    }
    by = {r["label"]: r for r in s["per_class"]}
    assert by[T]["n_train"] == 100 and by[B]["n_train"] == 7 and by[CD4]["n_train"] == 0
    assert by[B]["support_test"] == 2 and by[B]["cl_id"] == "CL:0000236"
    assert by[B]["precision"] == 1.0 and by[B]["recall"] == 0.5
    assert set(by[T]) == {
        "label",
        "cl_id",
        "f1",
        "f1_ontology",
        "precision",
        "recall",
        "support_test",
        "n_train",
    }
