import numpy as np
import pandas as pd
import pytest

from celltype_bench.contract import (
    classes_of,
    make_predictions,
    read_predictions,
    validate_predictions,
    write_predictions,
)
from celltype_bench.errors import InputError


def _proba():
    return pd.DataFrame([[0.7, 0.3], [0.2, 0.8], [0.5, 0.5]], columns=["B cell", "T cell"])


def test_make_predictions_argmax_and_columns():
    df = make_predictions(["a", "b", "c"], ["B cell", "T cell", "T cell"], _proba())
    assert list(df["predicted_label"]) == ["B cell", "T cell", "B cell"]
    assert classes_of(df) == ["B cell", "T cell"]
    validate_predictions(df)


def test_round_trip_is_atomic(tmp_path):
    df = make_predictions(["a", "b", "c"], ["B cell", "T cell", "T cell"], _proba())
    path = tmp_path / "x" / "predictions.parquet"
    write_predictions(df, path)
    assert not list(path.parent.glob("*.tmp"))
    back = read_predictions(path)
    pd.testing.assert_frame_equal(back, df)


@pytest.mark.parametrize(
    "mutate, field",
    [
        (lambda d: d.drop(columns="true_label"), "true_label"),
        (lambda d: d.drop(columns=["proba:B cell", "proba:T cell"]), "proba:<class>"),
        (lambda d: d.assign(**{"proba:B cell": d["proba:B cell"] * 2}), "proba:*"),
        (lambda d: d.assign(cell_id=["a", "a", "c"]), "cell_id"),
        (lambda d: d.assign(predicted_label=["NK cell", "T cell", "B cell"]), "predicted_label"),
        (lambda d: d.assign(**{"proba:B cell": [np.nan, 0.2, 0.5]}), "proba:*"),
    ],
)
def test_contract_violations_name_the_field(mutate, field):
    df = mutate(make_predictions(["a", "b", "c"], ["B cell", "T cell", "T cell"], _proba()))
    with pytest.raises(InputError) as err:
        validate_predictions(df, "some/predictions.parquet")
    assert field in str(err.value)
    assert "some/predictions.parquet" in str(err.value)
    assert "Fix:" in str(err.value)


def test_corrupt_file_is_reported(tmp_path):
    path = tmp_path / "predictions.parquet"
    path.write_bytes(b"PAR1 not really")
    with pytest.raises(InputError, match="predictions.parquet"):
        read_predictions(path)
