"""The Snakefile and rule files pass `snakemake --lint` (rules and helper functions kept apart,
log: on every rule, no absolute paths), as `make lint` checks."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SNAKEMAKE = str(Path(sys.executable).with_name("snakemake"))


def test_snakemake_lint_is_clean():
    res = subprocess.run(
        [SNAKEMAKE, "--lint"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    out = res.stdout + res.stderr
    assert res.returncode == 0, out
    assert "Lints for" not in out, out
