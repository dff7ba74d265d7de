# celltype-bench: wiring only. Stages live in rules/, code in src/celltype_bench/.
from snakemake.utils import min_version, validate

min_version("9.0")


# config.yaml is the embedded default; a --configfile on the command line replaces it whole.
if not workflow.overwrite_configfiles:

    configfile: "config.yaml"


validate(config, "config/schema.yaml")


report: "report/workflow.rst"


include: "rules/common.smk"
include: "rules/data.smk"
include: "rules/preprocess.smk"
include: "rules/split.smk"
include: "rules/augmentation.smk"
include: "rules/train.smk"
include: "rules/balancing.smk"
include: "rules/score.smk"
include: "rules/figures.smk"
include: "rules/report.smk"
include: "rules/reproduction.smk"
include: "rules/unlabeled.smk"


for _method_rules in sorted(Path(workflow.basedir, "rules", "methods").glob("*.smk")):

    include: _method_rules


rule all:
    input:
        all_targets(),
    default_target: True
