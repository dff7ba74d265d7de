import numpy as np
import pandas as pd
import pytest

from celltype_bench.errors import InputError
from celltype_bench.figures import (
    f1_vs_train_cells,
    figure_methods,
    method_comparison,
    method_order,
)
from celltype_bench.steps import summarise


def _scores():
    rows = []
    rng = np.random.default_rng(0)
    for method, level, control in [
        ("good", 0.9, False),
        ("ok", 0.6, False),
        ("majority", 0.05, True),
    ]:
        for r in range(3):
            f1 = level + rng.normal(0, 0.01)
            rows.append(
                dict(
                    task="t",
                    method=method,
                    balancing="none",
                    replicate=f"r{r}",
                    control=control,
                    uses_unlabeled=False,
                    accuracy=f1,
                    macro_f1=f1,
                    macro_f1_ontology=f1 + 0.02,
                    ece=0.1,
                    n_test=10,
                )
            )
    return pd.DataFrame(rows)


def test_method_order_puts_controls_last():
    assert method_order(_scores()) == ["good", "ok", "majority"]


def test_method_comparison_writes_png_listing_methods(tmp_path):
    path = tmp_path / "scores.csv"
    _scores().to_csv(path, index=False)
    out = tmp_path / "fig.png"
    method_comparison(str(path), "t", str(out))
    assert out.stat().st_size > 5000
    assert figure_methods(out) == ["good", "ok", "majority"]
    with pytest.raises(InputError, match="no rows for task 'other'"):
        method_comparison(str(path), "other", str(tmp_path / "x.png"))


def test_f1_vs_train_cells(tmp_path):
    rows = [
        dict(task="t", method=m, label=f"c{i}", f1=min(1, i / 5), n_train=10 * 2**i, replicate="r0")
        for m in ["a", "b"]
        for i in range(6)
    ]
    path = tmp_path / "per_class.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    out = tmp_path / "f.png"
    f1_vs_train_cells(str(path), "t", str(out))
    assert figure_methods(out) == ["a", "b"]


def test_summary_mean_and_sd():
    s = summarise(_scores())
    good = s[s.method == "good"].iloc[0]
    assert good["n_replicates"] == 3
    assert good["macro_f1_mean"] == pytest.approx(
        _scores().query("method == 'good'")["macro_f1"].mean()
    )
    assert good["macro_f1_sd"] > 0
    assert s.iloc[0]["method"] == "good"


def test_model_size_plots_parameter_counts_and_skips_controls(tmp_path):
    from celltype_bench.figures import model_size

    sc = _scores()
    rt = sc[["task", "method", "balancing", "replicate"]].copy()
    rt["model"] = rt["method"].map({"good": "net", "ok": "net", "majority": "majority"})
    rt["n_parameters"] = rt["method"].map({"good": 2_000_000, "ok": 50_000, "majority": None})
    sc.to_csv(tmp_path / "scores.csv", index=False)
    rt.to_csv(tmp_path / "runtime.csv", index=False)
    out = tmp_path / "size.png"
    model_size(str(tmp_path / "scores.csv"), str(tmp_path / "runtime.csv"), "t", str(out))
    assert figure_methods(out) == ["good", "ok"]


def test_count_parameters_of_a_torch_method():
    import torch

    from celltype_bench.steps import count_parameters

    class Est:
        module_ = torch.nn.Linear(10, 3)

    assert count_parameters(Est()) == 33
    assert count_parameters(object()) is None
