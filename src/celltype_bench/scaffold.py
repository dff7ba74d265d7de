"""``celltype-bench new-method NAME [--external]``: a working skeleton of a new method.

Python path: ``user_methods/NAME.py`` (a registered ``Method`` that returns the training
class frequencies until filled in), a config block in the config file, and
``tests/test_method_NAME.py``. External path: ``rules/methods/NAME.smk`` + its script
``rules/methods/NAME.py`` writing the predictions file, a config block
(``external: true``) and a test. Either runs through the DAG as is; the scores table marks
it ``placeholder`` until the marker is removed.
"""

from __future__ import annotations

import re
from pathlib import Path

from .errors import InputError

NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")

PY_TEMPLATE = '''"""{name}: a new annotation method (scaffold written by `celltype-bench new-method`).

Until you fill in `_fit` and `_predict_proba`, it predicts the training class frequencies for
every cell (a control-like placeholder; `is_placeholder = True` marks it in the scores table).
Contract: docs/method-contract.md; guide: docs/adding-a-method.md.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import scipy.sparse as sp

from celltype_bench.methods import Method, register


@register("{name}")
class {cls}(Method):
    """Describe the method here (paper, recipe, defaults)."""

    is_placeholder = True  # TODO: delete this line once the method is real
    uses_unlabeled = False  # True if the method learns from the (unlabeled) test cells
    default_params: dict[str, Any] = {{"seed": 0}}  # every accepted parameter, with its default

    def _fit(
        self,
        X: sp.csr_matrix,
        y: np.ndarray,
        X_valid: sp.csr_matrix | None,
        y_valid: np.ndarray | None,
    ) -> None:
        # X: cells x genes, CSR, log1p(CP10k); y: integer codes into self.classes_
        counts = np.bincount(y, minlength=len(self.classes_)).astype(np.float64)
        self.freq_ = counts / counts.sum()

    def _predict_proba(self, X: sp.csr_matrix) -> np.ndarray:
        # return an array (cells, len(self.classes_)) whose rows sum to 1
        return np.tile(self.freq_, (X.shape[0], 1))

    def _state(self) -> dict[str, Any]:  # small JSON-able state saved in method.json
        return {{"freq": self.freq_.tolist()}}

    def _set_state(self, state: dict[str, Any]) -> None:
        self.freq_ = np.asarray(state["freq"], dtype=np.float64)
'''

PY_TEST = '''"""Tests of the {name} method (scaffold; extend with tests of its own mechanism)."""

import importlib.util
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

ROOT = Path(__file__).resolve().parents[1]


def _load():
    spec = importlib.util.spec_from_file_location("{name}", ROOT / "user_methods" / "{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.{cls}


def _adata(n=60, seed=0):
    rng = np.random.default_rng(seed)
    X = sp.csr_matrix(np.log1p(rng.poisson(1.0, size=(n, 10))).astype(np.float32))
    obs = pd.DataFrame({{"cell_type": rng.choice(list("ABC"), n)}}, index=[f"c{{i}}" for i in range(n)])
    return ad.AnnData(X, obs=obs, var=pd.DataFrame(index=[f"g{{j}}" for j in range(10)]))


def test_{name}_fits_and_predicts_valid_probabilities(tmp_path):
    method = _load()().fit(_adata())
    proba = method.predict_proba(_adata(seed=1))
    assert proba.shape == (60, 3)
    assert np.allclose(proba.sum(axis=1), 1.0)
    method.save(tmp_path / "m")
    again = type(method).load(tmp_path / "m").predict_proba(_adata(seed=1))
    pd.testing.assert_frame_equal(proba, again)
'''

SMK_TEMPLATE = """# {name}: an external method (scaffold written by `celltype-bench new-method --external`).
# Replace the script (or this rule's `script:` / `shell:`) with your tool; it must write the
# predictions file of docs/method-contract.md. Config: `{name}: {{external: true}}`.
rule {name}:
    input:
        data=dataset_of,
        split="data/splits/{{task}}.parquet",
    output:
        predictions="results/{{task}}/{name}/{{balancing}}/{{replicate}}/predictions.parquet",
    log:
        "logs/train/{{task}}/{name}/{{balancing}}/{{replicate}}.log",
    benchmark:
        "results/benchmarks/train/{{task}}/{name}/{{balancing}}/{{replicate}}.tsv"
    conda:
        "../../envs/bench.yaml"
    script:
        "{name}.py"
"""

SMK_SCRIPT = '''"""{name} (external scaffold): predicts the training class frequencies for every test cell.

Replace the marked part with a call to your tool. Inputs: the processed h5ad (X =
log1p(CP10k), layers["counts"]) and the split table; never read the test cells' labels except
to copy them into `true_label`.
"""

import anndata as ad
import numpy as np
import pandas as pd

from celltype_bench.contract import make_predictions, write_predictions

sm = snakemake  # noqa: F821  (injected by Snakemake)
adata = ad.read_h5ad(sm.input.data)
split = pd.read_parquet(sm.input.split)
split = split[split["replicate"] == sm.wildcards.replicate].set_index("cell_id")
train = adata[split.index[split["role"] == "train"]]
test = adata[split.index[split["role"] == "test"]]

# ---- replace from here: fit on `train` (obs["cell_type"]), predict `test` ----
freq = train.obs["cell_type"].astype(str).value_counts(normalize=True).sort_index()
proba = pd.DataFrame(np.tile(freq.to_numpy(), (test.n_obs, 1)), columns=freq.index)
# ---- to here ----

write_predictions(
    make_predictions(test.obs_names, test.obs["cell_type"].astype(str), proba),
    sm.output.predictions,
)
'''

EXT_TEST = '''"""Tests of the external method {name} (scaffold): its rule is part of the DAG."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_{name}_rule_is_planned():
    snakemake = str(Path(sys.executable).with_name("snakemake"))
    res = subprocess.run(
        [snakemake, "-n", "--quiet", "rules"], cwd=ROOT, capture_output=True, text=True
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert "{name}" in res.stdout + res.stderr
'''


def _config_block(name: str, external: bool) -> str:
    if external:
        return (
            f"  {name}:\n"
            f"    # scaffold: rules/methods/{name}.smk (remove `placeholder` once it is real)\n"
            f"    external: true\n    placeholder: true\n"
        )
    return (
        f"  {name}:\n"
        f"    # scaffold: user_methods/{name}.py\n"
        f"    module: user_methods/{name}.py\n    params: {{}}\n"
    )


def add_to_config(config: Path, name: str, external: bool) -> None:
    """Insert the method's block right under the top-level ``methods:`` key of ``config``."""
    text = config.read_text()
    if re.search(rf"^  {re.escape(name)}:", text, flags=re.M):
        raise InputError(
            f"method '{name}' is already in the config",
            file=str(config),
            field=f"methods.{name}",
            fix="choose another name or remove the existing block",
        )
    m = re.search(r"^methods:[ \t]*(#.*)?\n", text, flags=re.M)
    if m is None:
        raise InputError(
            "no top-level 'methods:' block",
            file=str(config),
            field="methods",
            fix="add a 'methods:' section (see config.yaml)",
        )
    new = text[: m.end()] + _config_block(name, external) + text[m.end() :]
    tmp = config.with_name(config.name + ".tmp")
    tmp.write_text(new)
    tmp.replace(config)


def new_method(
    name: str, external: bool = False, root: str | Path = ".", config: str = "config.yaml"
) -> list[Path]:
    """Write the skeleton of method ``name`` under ``root``; return the files written."""
    from .methods import available

    if not NAME_RE.match(name):
        raise InputError(
            f"invalid method name '{name}'",
            field="NAME",
            fix="use letters, digits and underscores, starting with a letter",
        )
    if name in available():
        raise InputError(
            f"'{name}' is already a registered method",
            field="NAME",
            fix="choose another name",
        )
    root = Path(root)
    cls = "".join(p.capitalize() or "_" for p in name.split("_"))
    if external:
        files = {
            root / "rules" / "methods" / f"{name}.smk": SMK_TEMPLATE.format(name=name),
            root / "rules" / "methods" / f"{name}.py": SMK_SCRIPT.format(name=name),
            root / "tests" / f"test_method_{name}.py": EXT_TEST.format(name=name),
        }
    else:
        files = {
            root / "user_methods" / f"{name}.py": PY_TEMPLATE.format(name=name, cls=cls),
            root / "tests" / f"test_method_{name}.py": PY_TEST.format(name=name, cls=cls),
        }
    clash = [str(p) for p in files if p.exists()]
    if clash:
        raise InputError(
            f"would overwrite {clash}", field="NAME", fix="choose another name or move the files"
        )
    add_to_config(root / config, name, external)
    for path, text in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return list(files)
