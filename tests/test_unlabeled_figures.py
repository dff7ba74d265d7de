"""Labeled-cell tiers, the gain table (method vs its supervised control) and the figure."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from celltype_bench.data.splits import donor_split, stratified_kfold
from celltype_bench.data.tiers import (
    UNLABELED_ROLE,
    apply_tier,
    expand_labeled,
    expand_tiers,
    labeled_count_of,
    labeled_order,
    labeled_task_name,
    labeled_tasks,
)
from celltype_bench.errors import InputError
from celltype_bench.figures import figure_methods
from celltype_bench.figures_unlabeled import labeled_cells_figure, labeled_cells_table
from celltype_bench.methods import available, get
from celltype_bench.unlabeled_gain import control_pairs, gain_html, gain_table, pair_gain


# ---- the `labeled` tier ------------------------------------------------------------------
@pytest.fixture()
def obs():
    """2,000 cells of 40 donors, 12 classes of very different sizes (3 to ~700 cells)."""
    rng = np.random.default_rng(0)
    sizes = [700, 400, 300, 200, 150, 100, 60, 40, 25, 12, 8, 5]
    labels = np.repeat([f"T{i}" for i in range(len(sizes))], sizes)
    labels = rng.permutation(labels)
    n = len(labels)
    return pd.DataFrame(
        {"donor_id": rng.choice([f"d{i}" for i in range(40)], n), "cell_type": labels},
        index=[f"c{i}" for i in range(n)],
    )


def _ids(split, role="train", rep="r0"):
    return set(split.loc[(split.replicate == rep) & (split.role == role), "cell_id"])


def _labeled(split, obs, n, **kw):
    return apply_tier(split, obs, "labeled", count=n, **kw)


def test_labeled_tier_keeps_exactly_n_cells_nested_and_fixed_valid_test(obs):
    split = donor_split(obs, n_replicates=2)
    tiers = {n: _labeled(split, obs, n) for n in (5, 12, 50, 100, 500)}
    for n, t in tiers.items():
        for rep in ("r0", "r1"):
            assert len(_ids(t, rep=rep)) == n
            for role in ("valid", "test"):
                assert _ids(t, role, rep) == _ids(split, role, rep)
        assert set(t["role"]) == {"train", "valid", "test"}  # no unlabeled rows by default
        assert set(t.columns) == set(split.columns)
    sets = [_ids(tiers[n]) for n in (5, 12, 50, 100, 500)]
    assert all(a < b for a, b in zip(sets, sets[1:], strict=False))  # nested
    assert sets[-1] < _ids(split)


def test_labeled_tier_is_deterministic_and_seeded(obs):
    split = donor_split(obs)
    a = _labeled(split, obs, 100, seed=3)
    b = _labeled(split.sample(frac=1, random_state=1), obs, 100, seed=3)  # row order ignored
    assert _ids(a) == _ids(b)
    assert _ids(a) != _ids(_labeled(split, obs, 100, seed=4))


def test_labeled_tier_keeps_every_class_and_is_roughly_proportional(obs):
    split = donor_split(obs)
    train_labels = obs.loc[list(_ids(split)), "cell_type"]
    k = train_labels.nunique()
    kept = obs.loc[list(_ids(_labeled(split, obs, k))), "cell_type"]
    assert kept.nunique() == k  # one cell of every class as soon as n = number of classes
    kept = obs.loc[list(_ids(_labeled(split, obs, 500))), "cell_type"].value_counts()
    expected = train_labels.value_counts() / len(train_labels) * 500
    assert kept.index.nunique() == k
    assert (kept.reindex(expected.index) - expected).abs().max() <= 3  # stratified-ish
    few = obs.loc[list(_ids(_labeled(split, obs, 3))), "cell_type"]
    assert few.nunique() == 3  # fewer cells than classes: distinct classes


def test_labeled_order_puts_one_cell_per_class_first():
    rng = np.random.default_rng(0)
    labels = np.array(["a"] * 50 + ["b"] * 5 + ["c"])
    order = labeled_order(labels, rng)
    assert sorted(order.tolist()) == list(range(len(labels)))
    assert set(labels[order[:3]]) == {"a", "b", "c"}


def test_rest_unlabeled_keeps_left_out_training_cells_with_their_own_role(obs):
    split = donor_split(obs)
    t = _labeled(split, obs, 50, rest_unlabeled=True)
    assert len(_ids(t)) == 50
    assert _ids(t) | _ids(t, UNLABELED_ROLE) == _ids(split)
    assert not _ids(t) & _ids(t, UNLABELED_ROLE)
    assert len(t) == len(split)


def test_count_above_training_cells_or_none_keeps_all_and_kfold_works(obs):
    split = stratified_kfold(obs, n_folds=3)
    for n in (None, 10**6):
        t = _labeled(split, obs, n, rest_unlabeled=True)
        for rep in ("r0", "r1", "r2"):
            assert _ids(t, rep=rep) == _ids(split, rep=rep)
        assert UNLABELED_ROLE not in set(t["role"])
    for rep in ("r0", "r1", "r2"):
        assert len(_ids(_labeled(split, obs, 30), rep=rep)) == 30
    with pytest.raises(InputError, match="whole number"):
        _labeled(split, obs, 0)
    with pytest.raises(InputError, match="unknown tier kind"):
        apply_tier(split, obs, "labelled", count=5)


def test_expand_labeled_derives_tasks():
    tasks = {
        "c": {
            "dataset": "c",
            "split": {"kind": "donor"},
            "scaling": {"fractions": [0.5, 1.0], "kinds": ["donors"]},
            "labeled": {"counts": [100, 50], "methods": ["scpretrain"], "replicates": 2},
        },
        "p": {"dataset": "p", "split": {"kind": "stratified_kfold"}},
    }
    out = expand_tiers(tasks)
    assert set(out) == {
        "c", "p", "c-donors-50", "c-donors-100",
        "c-labeled-50", "c-labeled-100", "c-labeled-all",
    }  # fmt: skip
    assert "labeled" not in out["c-donors-50"]  # scaling tiers get no labeled tiers
    d = out["c-labeled-50"]
    assert d["tier"] == {"kind": "labeled", "count": 50, "seed": 1, "rest_unlabeled": True}
    assert d["labeled_of"] == "c" and "scaling_of" not in d
    assert d["methods"] == ["scpretrain"] and d["replicates"] == 2
    assert "labeled" not in d and "scaling" not in d
    assert out["c-labeled-all"]["tier"]["count"] is None
    assert labeled_tasks(out, "c") == ["c-labeled-50", "c-labeled-100", "c-labeled-all"]
    assert labeled_task_name("c", None) == "c-labeled-all"
    assert labeled_count_of("c-labeled-all") is None and labeled_count_of("c-labeled-50") == 50
    with pytest.raises(InputError, match="whole numbers"):
        expand_labeled({"k": {"dataset": "k", "split": {}, "labeled": {"counts": [0.5]}}})
    with pytest.raises(InputError, match="clashes"):
        expand_labeled(
            {
                "k": {"dataset": "k", "split": {}, "labeled": {"counts": [5]}},
                "k-labeled-5": {"dataset": "k", "split": {}},
            }
        )


# ---- the gain table ----------------------------------------------------------------------
METHODS = {
    key: {"method": key, "external": False}
    for key in [
        "majority",
        "linear",
        "scnym",
        "scnym_no_adversary",
        "scnym_supervised",
        "scpretrain",
        "scpretrain_nopretrain",
        "scpretrain_lr",
    ]
}


def test_supervised_controls_are_declared_by_the_classes():
    declared = {
        n: get(n).supervised_control
        for n in available()
        if getattr(get(n), "supervised_control", None)
    }
    assert declared == {
        "scnym": "scnym_supervised",
        "scnym_no_adversary": "scnym_supervised",
        "scpretrain": "scpretrain_nopretrain",
    }
    for method, control in declared.items():
        assert get(method).uses_unlabeled and not get(control).uses_unlabeled
        assert getattr(get(control), "supervised_control", None) is None


def test_control_pairs_resolve_to_config_keys():
    assert control_pairs(METHODS) == {
        "scnym": "scnym_supervised",
        "scnym_no_adversary": "scnym_supervised",
        "scpretrain": "scpretrain_nopretrain",
    }
    # a control configured under another key; an external method naming its control
    methods = {
        "fast_scnym": {"method": "scnym", "external": False},
        "plain": {"method": "scnym_supervised", "external": False},
        "tool": {"method": "tool", "external": True, "supervised_control": "plain"},
        "scpretrain": {"method": "scpretrain", "external": False},
    }
    assert control_pairs(methods) == {"fast_scnym": "plain", "tool": "plain"}
    with pytest.raises(InputError, match="unknown supervised control"):
        control_pairs({"tool": {"external": True, "supervised_control": "nope"}})


def test_control_pairs_use_the_table_for_methods_from_user_modules():
    """A method from a config ``module:`` is not registered in a rule's script process: the
    method table carries its class's control, so no registry lookup happens."""
    methods = {
        "my_semi": {"method": "my_semi", "external": False, "class_control": "my_plain"},
        "my_plain": {"method": "my_plain", "external": False, "class_control": None},
        "toy": {"method": "toy_not_registered", "external": False, "class_control": None},
    }
    assert control_pairs(methods) == {"my_semi": "my_plain"}


def test_method_table_carries_the_class_control():
    import yaml

    from celltype_bench.workflow_config import WorkflowConfig

    root = Path(__file__).resolve().parents[1]
    table = WorkflowConfig.from_dict(yaml.safe_load((root / "config.yaml").read_text()))
    table = table.method_table()
    assert table["scpretrain"]["class_control"] == "scpretrain_nopretrain"
    assert table["linear"]["class_control"] is None


def _score_rows(task, method, values, balancing="none", **extra):
    return [
        dict(task=task, method=method, balancing=balancing, replicate=f"r{i}", macro_f1=v, **extra)
        for i, v in enumerate(values)
        if v is not None
    ]


def test_gain_table_pairs_controls_and_computes_paired_gains():
    rows = [
        *_score_rows("query", "scnym", [0.80, 0.82, 0.84]),
        *_score_rows("query", "scnym_no_adversary", [0.70, 0.71, 0.72]),
        *_score_rows("query", "scnym_supervised", [0.70, 0.70, 0.70]),
        *_score_rows("query", "scpretrain", [0.60, None, 0.66]),  # r1 failed
        *_score_rows("query", "scpretrain_nopretrain", [0.62, 0.50, 0.60]),
        *_score_rows("query", "scpretrain_lr", [0.9, 0.9, 0.9]),
        *_score_rows("query", "linear", [0.9, 0.9, 0.9]),
        *_score_rows("intra", "scnym", [0.9, 0.9]),  # control missing: no row
        *_score_rows("other", "scpretrain", [0.5, 0.6], balancing="none"),
        *_score_rows("other", "scpretrain_nopretrain", [0.4], balancing="oversample"),
    ]
    table = gain_table(
        pd.DataFrame(rows),
        control_pairs(METHODS),
        splits={"query": "holdout_study", "other": "donor"},
    )
    got = {(r.task, r.method): r for r in table.itertuples()}
    assert set(got) == {
        ("query", "scnym"),
        ("query", "scnym_no_adversary"),
        ("query", "scpretrain"),
        ("other", "scpretrain"),
    }
    r = got[("query", "scnym")]
    assert r.control == "scnym_supervised" and r.split == "holdout_study"
    assert r.paired and r.n_pairs == 3 and r.wins == "3/3"
    assert r.gain == pytest.approx(0.12) and r.gain_sd == pytest.approx(0.02)
    assert r.method_mean - r.control_mean == pytest.approx(r.gain)
    assert 0 < r.p_ttest < 0.05
    r = got[("query", "scnym_no_adversary")]
    assert r.control == "scnym_supervised" and r.gain == pytest.approx(0.01)
    r = got[("query", "scpretrain")]  # paired over the two replicates both have
    assert r.control == "scpretrain_nopretrain" and r.n_pairs == 2 and r.n_control == 3
    assert r.gain == pytest.approx(((0.60 - 0.62) + (0.66 - 0.60)) / 2)
    assert r.control_mean == pytest.approx(0.61)
    r = got[("other", "scpretrain")]  # one strategy each: paired across them
    assert (r.balancing, r.control_balancing) == ("none", "oversample")
    assert r.paired and r.n_pairs == 1 and r.gain == pytest.approx(0.1)
    assert np.isnan(r.gain_sd) and np.isnan(r.p_ttest)


def test_unpaired_gain_when_replicates_do_not_align():
    m = pd.Series([0.8, 0.9], index=["r0", "r1"])
    c = pd.Series([0.5], index=["r2"])
    g = pair_gain(m, c)
    assert not g["paired"] and g["n_pairs"] == 0
    assert g["gain"] == pytest.approx(0.35) and np.isnan(g["p_ttest"])


def test_gain_html_puts_inter_dataset_tasks_first(tmp_path):
    rows = [
        *_score_rows("a_intra", "scnym", [0.8, 0.9]),
        *_score_rows("a_intra", "scnym_supervised", [0.7, 0.7]),
        *_score_rows("z_query", "scnym", [0.6, 0.7]),
        *_score_rows("z_query", "scnym_supervised", [0.5, 0.5]),
    ]
    splits = {"a_intra": "donor", "z_query": "holdout_study"}
    table = gain_table(pd.DataFrame(rows), control_pairs(METHODS), splits=splits)
    out = tmp_path / "gain.html"
    gain_html(table, str(out))
    html = out.read_text()
    assert html.index("Inter-dataset") < html.index("z_query") < html.index("Other tasks")
    assert html.index("Other tasks") < html.index("a_intra") and "+0.150" in html
    gain_html(table.iloc[0:0], str(out))
    assert "No task ran both" in out.read_text()


# ---- the figure --------------------------------------------------------------------------
def _labeled_scores():
    """scpretrain gains most with few labels; majority flat; scnym without its control."""
    rows = []
    level = {"50": 0.40, "100": 0.55, "500": 0.75, "all": 0.85}
    gain = {"50": 0.10, "100": 0.06, "500": 0.02, "all": 0.0}
    rng = np.random.default_rng(0)
    for tier in level:
        task = f"census-labeled-{tier}"
        for r in range(3):
            base = level[tier] + rng.normal(0, 0.01)
            for method, v, ctrl, unl in [
                ("scpretrain_nopretrain", base, False, False),
                ("scpretrain", base + gain[tier] + rng.normal(0, 0.005), False, True),
                ("majority", 0.05, True, False),
            ]:
                rows.append(
                    dict(task=task, method=method, balancing="none", replicate=f"r{r}",
                         macro_f1=v, control=ctrl, uses_unlabeled=unl)
                )  # fmt: skip
    rows.append(
        dict(
            task="census",
            method="scpretrain",
            balancing="none",
            replicate="r0",
            macro_f1=0.1,
            control=False,
            uses_unlabeled=True,
        )
    )  # fmt: skip  (the base task itself is not a tier)
    scores = pd.DataFrame(rows)
    runtime = scores[["task", "method", "balancing", "replicate"]].copy()
    runtime["n_train"] = runtime["task"].map(
        {"census-labeled-50": 50, "census-labeled-100": 100, "census-labeled-500": 500,
         "census-labeled-all": 7012, "census": 7012}
    )  # fmt: skip
    return scores, runtime


def test_labeled_cells_table_from_fabricated_scores():
    scores, runtime = _labeled_scores()
    pairs = control_pairs(METHODS)
    table = labeled_cells_table(scores, runtime, pairs, "census")
    assert table["tier"].drop_duplicates().tolist() == ["50", "100", "500", "all"]
    assert set(table["task"]) == {f"census-labeled-{t}" for t in ("50", "100", "500", "all")}
    sp = table[table.method == "scpretrain"].set_index("tier")
    assert sp.loc["all", "n_labeled"] == 7012 and sp.loc["50", "n_labeled"] == 50
    assert sp.loc["50", "gain"] > sp.loc["100", "gain"] > sp.loc["500", "gain"]
    assert sp.loc["50", "gain"] == pytest.approx(0.10, abs=0.01)
    assert (sp["supervised_control"] == "scpretrain_nopretrain").all()
    assert (sp["n_pairs"] == 3).all() and (sp["n_replicates"] == 3).all()
    assert table.loc[table.method == "majority", "gain"].isna().all()
    # without the runtime table the counts come from the task names ('all' unknown)
    no_rt = labeled_cells_table(scores, None, pairs, "census")
    assert no_rt.loc[no_rt.tier == "100", "n_labeled"].eq(100).all()
    assert no_rt.loc[no_rt.tier == "all", "n_labeled"].isna().all()


def test_labeled_cells_figure_renders(tmp_path):
    scores, runtime = _labeled_scores()
    paths, rt_paths = [], []
    for task, g in scores.groupby("task"):
        paths.append(tmp_path / f"{task}_scores.csv")
        g.to_csv(paths[-1], index=False)
        rt_paths.append(tmp_path / f"{task}_runtime.csv")
        runtime[runtime.task == task].to_csv(rt_paths[-1], index=False)
    out, table = tmp_path / "fig.png", tmp_path / "labeled_cells.csv"
    labeled_cells_figure(
        scores=[str(p) for p in paths],
        runtime=[str(p) for p in rt_paths],
        methods=METHODS,
        task="census",
        out=str(out),
        out_table=str(table),
    )
    assert out.stat().st_size > 5000
    assert figure_methods(out) == ["majority", "scpretrain", "scpretrain_nopretrain"]
    assert len(pd.read_csv(table)) == 12
    # no runtime tables, no pair at all: still renders ('all' placed after the largest count)
    only = scores[scores.method != "scpretrain_nopretrain"]
    only.to_csv(tmp_path / "only.csv", index=False)
    labeled_cells_figure(
        scores=[str(tmp_path / "only.csv")],
        pairs={},
        task="census",
        out=str(tmp_path / "fig2.png"),
        out_table=str(tmp_path / "t2.csv"),
    )
    assert figure_methods(tmp_path / "fig2.png") == ["majority", "scpretrain"]
    with pytest.raises(InputError, match="no scores for the labeled-cell tiers of 'other'"):
        labeled_cells_figure(
            scores=[str(tmp_path / "only.csv")],
            pairs={},
            task="other",
            out=str(tmp_path / "fig3.png"),
            out_table=str(tmp_path / "t3.csv"),
        )
