"""Published numbers beside reproduced ones (celltype_bench.reproduction)."""

import pandas as pd
import pytest
import yaml

from celltype_bench.errors import InputError
from celltype_bench.reproduction import load_published, reproduction_html, reproduction_table

SUMMARY = pd.DataFrame(
    {
        "task": ["census", "census"],
        "method": ["sctab", "linear"],
        "balancing": ["class_weight", "class_weight"],
        "macro_f1_mean": [0.825, 0.70],
        "macro_f1_sd": [0.002, 0.001],
        "n_replicates": [5, 5],
    }
)
ENTRIES = [
    {"id": "a", "paper": "scTab", "source": "Fig. 1c", "metric": "macro_f1", "value": 0.8295,
     "sd": 0.0007, "task": "census", "method": "sctab", "tolerance": 0.01},
    {"id": "b", "paper": "scTab", "source": "Fig. 1c", "metric": "macro_f1", "value": 0.7848,
     "task": "census", "method": "linear", "tolerance": 0.01},
    {"id": "c", "paper": "scTab", "source": "Fig. 1c", "metric": "macro_f1", "value": 0.8127,
     "task": "census", "method": "xgboost"},
]  # fmt: skip


def test_within_outside_and_not_run():
    t = reproduction_table(ENTRIES, SUMMARY).set_index("id")
    assert t.loc["a", "status"] == "within tolerance"
    assert t.loc["a", "reproduced"] == "0.8250 ± 0.0020"
    assert t.loc["a", "difference"] == pytest.approx(0.825 - 0.8295)
    assert t.loc["b", "status"] == "outside tolerance"
    assert t.loc["c", "status"] == "not run" and t.loc["c", "reproduced"] == "not run"
    assert "xgboost" in t.loc["c", "note"]
    html = reproduction_html(t.reset_index(), "config/paper.yaml")
    assert html.count("<tr") == 4 and "not run" in html


def test_load_published_checks_entries(tmp_path):
    p = tmp_path / "p.yaml"
    p.write_text(yaml.safe_dump({"published": ENTRIES}))
    assert len(load_published(p)) == 3
    p.write_text(yaml.safe_dump({"published": [{"id": "x", "paper": "p"}]}))
    with pytest.raises(InputError, match="lacks"):
        load_published(p)
    bad = dict(ENTRIES[0], metric="f2")
    p.write_text(yaml.safe_dump({"published": [bad]}))
    with pytest.raises(InputError, match="unknown metric"):
        load_published(p)
