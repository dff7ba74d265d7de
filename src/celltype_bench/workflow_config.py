"""The validated workflow config, as the Snakefile sees it: runs, targets, per-method settings.

Snakemake validates the shape with config/schema.yaml; this class checks what a schema cannot
(method names against the registry, task -> dataset references) and derives the DAG's targets.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, ClassVar

from .errors import InputError

NAME_REGEX = r"[A-Za-z0-9][A-Za-z0-9_-]*"
DEFAULT_RESOURCES = {"mem_mb": 4000, "runtime": 60}
TRAIN_RESOURCES = ("mem_mb", "runtime", "cpus_per_task", "gpu")
"""Resources every training job declares (rules/train.smk); the config may name more."""


@dataclass
class WorkflowConfig:
    """Derived view of a workflow config dict."""

    raw: dict[str, Any]
    source: str = "config.yaml"
    name_regex: str = NAME_REGEX
    datasets: dict[str, dict] = field(init=False)
    tasks: dict[str, dict] = field(init=False)
    methods: dict[str, dict] = field(init=False)

    @classmethod
    def from_dict(cls, config: dict[str, Any], source: str = "config.yaml") -> WorkflowConfig:
        """Build and cross-check; raises InputError naming the offending key."""
        if not isinstance(config, dict):
            raise InputError("the config is not a mapping", file=str(source), fix="see config.yaml")
        for key in ("datasets", "tasks", "methods"):
            if not isinstance(config.get(key), dict) or not config[key]:
                raise InputError(
                    f"the config has no '{key}' section (or it is empty)",
                    file=str(source),
                    field=key,
                    fix=f"add a '{key}:' mapping (see config.yaml and config/schema.yaml)",
                )
        self = cls(raw=config, source=str(source))
        self._check()
        return self

    def __post_init__(self) -> None:
        self.datasets = self.raw["datasets"]
        from .data.tiers import expand_tiers

        self.tasks = expand_tiers(self.raw["tasks"])
        self.methods = {k: dict(v or {}) for k, v in self.raw["methods"].items()}

    # ---- checks ---------------------------------------------------------------------------
    def _check(self) -> None:
        from .methods import available

        self._check_names()
        for key, spec in self.methods.items():
            if spec.get("module"):
                import_method_module(spec["module"], where=f"{self.source}: methods.{key}.module")
        registry = set(available())
        for key, spec in self.methods.items():
            if spec.get("external"):
                continue
            name = spec.get("method", key)
            if name not in registry:
                raise InputError(
                    f"unknown method '{name}'",
                    file=self.source,
                    field=f"methods.{key}" + (".method" if "method" in spec else ""),
                    fix=f"use one of {sorted(registry)}, or set 'external: true' and add rules/methods/{key}.smk",
                )
            from .methods import get

            get(name).check_params(
                spec.get("params", {}), where=f"{self.source}: methods.{key}.params"
            )
        self._check_balancing()
        from .unlabeled_gain import control_pairs

        try:
            control_pairs(self.method_table())
        except InputError as exc:
            raise InputError(exc.problem, file=self.source, field=exc.field, fix=exc.fix) from None
        for task, spec in self.tasks.items():
            if spec["dataset"] not in self.datasets:
                raise InputError(
                    f"task '{task}' uses unknown dataset '{spec['dataset']}'",
                    file=self.source,
                    field=f"tasks.{task}.dataset",
                    fix=f"use one of {sorted(self.datasets)}",
                )
            for m in spec.get("methods", []):
                if m not in self.methods:
                    raise InputError(
                        f"task '{task}' lists unknown method '{m}'",
                        file=self.source,
                        field=f"tasks.{task}.methods",
                        fix=f"use one of {sorted(self.methods)}",
                    )
            for d in spec.get("unlabeled", []):
                if d not in self.datasets:
                    raise InputError(
                        f"task '{task}' lists unknown unlabeled dataset '{d}'",
                        file=self.source,
                        field=f"tasks.{task}.unlabeled",
                        fix=f"use one of {sorted(self.datasets)}",
                    )

    def _check_names(self) -> None:
        """Names that become wildcards (file paths, shell words) must match ``name_regex``.

        config/schema.yaml enforces the same pattern; this repeats it for configs built without
        schema validation, so a name like '../x', 'a b', 'a;rm' or '$(x)' never reaches a path.
        """
        pattern = re.compile(self.name_regex)
        bal = self.balancing
        named: list[tuple[str, object]] = [
            *((f"datasets.{k}", k) for k in self.datasets),
            *((f"tasks.{k}", k) for k in self.raw["tasks"]),
            *((f"methods.{k}", k) for k in self.methods),
            *(("balancing.default", n) for n in bal.get("default", [])),
            *((f"balancing.external.{k}", k) for k in bal.get("external", {})),
        ]
        for key, names in bal.get("per_method", {}).items():
            named += [(f"balancing.per_method.{key}", key)]
            named += [(f"balancing.per_method.{key}", n) for n in names]
        for where, name in named:
            if not isinstance(name, str) or not pattern.fullmatch(name):
                raise InputError(
                    f"name {name!r} is not allowed: names become file paths and wildcards",
                    file=self.source,
                    field=where,
                    fix="use letters, digits, '_' and '-' only, starting with a letter or digit",
                )

    def _check_balancing(self) -> None:
        from . import balancing

        bal = self.balancing
        for key in bal.get("per_method", {}):
            if key not in self.methods:
                raise InputError(
                    f"balancing set for unknown method '{key}'",
                    file=self.source,
                    field=f"balancing.per_method.{key}",
                    fix=f"use one of {sorted(self.methods)}",
                )
        externals = bal.get("external", {})
        for name in externals:
            if name in balancing.STRATEGIES or name == "native":
                raise InputError(
                    f"external balancer '{name}' shadows a built-in strategy",
                    file=self.source,
                    field=f"balancing.external.{name}",
                    fix="give the external balancer another name",
                )
        for key in self.python_methods:
            for strategy in self.balancings_for(key, resolve=False):
                where = (
                    f"balancing.per_method.{key}"
                    if key in bal.get("per_method", {})
                    else "balancing.default"
                )
                if (
                    strategy != "native"
                    and strategy not in balancing.STRATEGIES
                    and strategy not in externals
                ):
                    raise InputError(
                        f"unknown balancing strategy '{strategy}'",
                        file=self.source,
                        field=where,
                        fix=f"use one of {['native', *balancing.STRATEGIES, *externals]}",
                    )
                concrete = self.resolve_balancing(key, strategy)
                try:
                    balancing.configure(
                        self.method_spec(key)["name"],
                        self.method_spec(key)["params"],
                        "external" if concrete in externals else concrete,
                    )
                except InputError as exc:
                    raise InputError(
                        exc.problem, file=self.source, field=where, fix=exc.fix
                    ) from None

    @property
    def balancing(self) -> dict[str, Any]:
        return dict(self.raw.get("balancing") or {"default": ["native"]})

    def resolve_balancing(self, key: str, strategy: str) -> str:
        """'native' becomes the method's own published setting; other names stay."""
        if strategy != "native":
            return strategy
        spec = self.methods[key]
        if spec.get("external"):
            return "none"
        from .balancing import resolve

        return resolve("native", self.method_spec(key)["name"])

    def balancings_for(self, key: str, resolve: bool = True) -> list[str]:
        """Balancing strategies a method runs with (resolved to concrete names)."""
        bal = self.balancing
        names = bal.get("per_method", {}).get(key, bal.get("default", ["native"]))
        if self.methods[key].get("external"):
            names = ["native"]
        if not resolve:
            return list(names)
        out: list[str] = []
        for n in names:
            c = self.resolve_balancing(key, n)
            if c not in out:
                out.append(c)
        return out

    def balancing_spec(self, name: str) -> dict[str, Any]:
        """What the train step needs to apply a strategy (external ones carry their class)."""
        ext = self.balancing.get("external", {})
        if name in ext:
            return {
                "strategy": "external",
                "name": name,
                "class": ext[name]["class"],
                "params": dict(ext[name].get("params", {})),
            }
        return {"strategy": name, "name": name}

    @property
    def crossed_methods(self) -> list[str]:
        """Methods run with more than one balancing strategy (they get balancing figures)."""
        return [k for k in self.methods if len(self.balancings_for(k)) > 1]

    # ---- per-run settings -----------------------------------------------------------------
    @property
    def python_methods(self) -> list[str]:
        return [k for k, v in self.methods.items() if not v.get("external")]

    @property
    def python_method_regex(self) -> str:
        names = sorted(self.python_methods, key=len, reverse=True)
        return "(?:" + "|".join(re.escape(n) for n in names) + ")" if names else "(?!)"

    def method_spec(self, key: str) -> dict[str, Any]:
        spec = self.methods[key]
        return {
            "name": spec.get("method", key),
            "params": dict(spec.get("params", {})),
            "module": spec.get("module"),
        }

    def method_threads(self, key: str) -> int:
        return int(self.methods.get(key, {}).get("threads", 1))

    def method_resources(self, key: str) -> dict[str, Any]:
        """Snakemake resources of a method's training jobs (one place: the workflow config).

        Defaults: ``DEFAULT_RESOURCES`` (mem_mb, runtime in minutes), ``cpus_per_task`` = the
        method's ``threads``, and ``gpu``: 1 for torch methods (registry classes subclassing
        :class:`~celltype_bench.methods.base.TorchMethod`), 0 for the others. Config
        ``methods.<key>.resources`` overrides any of them (``gpu: 0`` keeps a torch method off
        GPUs) and may add more (:meth:`train_resources`, e.g. ``slurm_partition``). The SLURM
        executor turns ``gpu: N`` into ``--gpus=N``; the local executor ignores ``gpu`` unless
        ``--resources gpu=N`` declares a pool.
        """
        from .methods.base import TorchMethod

        cls = self.method_class(key) if key in self.methods else None
        if cls is not None and hasattr(cls, "augments"):  # an ensemble: its member decides
            from .methods import get

            member = self.methods[key].get("params", {}).get("member")
            cls = get(member or cls.default_params["member"])
        torch_method = isinstance(cls, type) and issubclass(cls, TorchMethod)
        res: dict[str, Any] = {
            **DEFAULT_RESOURCES,
            "cpus_per_task": self.method_threads(key),
            "gpu": 1 if torch_method else 0,
        }
        res.update(self.methods.get(key, {}).get("resources") or {})
        return res

    def method_resource(self, key: str, name: str) -> Any:
        """One resource of :meth:`method_resources` (None when neither set nor defaulted)."""
        return self.method_resources(key).get(name)

    def extra_resource_names(self) -> list[str]:
        """Resource names some method's config sets beyond :data:`TRAIN_RESOURCES`, sorted.

        E.g. ``slurm_partition``, ``slurm_account``, ``qos``, ``constraint``, ``gpu_model`` or
        ``slurm_extra`` for the SLURM executor: the training rule declares each of them.
        """
        names = {
            str(name)
            for spec in self.methods.values()
            for name in (spec.get("resources") or {})
            if name not in TRAIN_RESOURCES
        }
        return sorted(names)

    def train_resources(self) -> dict[str, Any]:
        """The training rule's resources: ``name -> f(wildcards)`` for :data:`TRAIN_RESOURCES`
        and :meth:`extra_resource_names`.

        Each function returns the job's method's value (:meth:`method_resource`), or None for
        a method that neither sets nor defaults it; Snakemake then leaves that resource out of
        the job. Such a job therefore does not get a profile's ``default-resources`` value of
        it either: where one method sets ``slurm_partition``, set it for the methods that need
        another partition than SLURM's default too.
        """
        return {
            name: (lambda wildcards, _name=name: self.method_resource(wildcards.method, _name))
            for name in (*TRAIN_RESOURCES, *self.extra_resource_names())
        }

    def method_class(self, key: str) -> Any:
        """The registry class of a Python method key (None for external methods)."""
        from .methods import get

        spec = self.methods[key]
        return None if spec.get("external") else get(spec.get("method", key))

    def method_augments(self, key: str) -> bool:
        """Whether a method trains with augmentation vectors (its ``augment`` parameter)."""
        cls = self.method_class(key)
        if cls is None:
            return False
        if hasattr(cls, "augments"):  # e.g. an ensemble asks its member
            return bool(cls.augments(self.methods[key].get("params", {})))
        if "augment" not in cls.default_params:
            return False
        return bool(
            self.methods[key].get("params", {}).get("augment", cls.default_params["augment"])
        )

    def method_uses_unlabeled(self, key: str) -> bool:
        """Whether a method learns from unlabeled cells (class attribute, or config for externals)."""
        cls = self.method_class(key)
        if cls is None:
            return bool(self.methods[key].get("uses_unlabeled", False))
        return bool(getattr(cls, "uses_unlabeled", False))

    def unlabeled_paths(self, task: str, key: str) -> list[str]:
        """Processed datasets handed to a ``uses_unlabeled`` method as extra unlabeled cells."""
        if not self.method_uses_unlabeled(key):
            return []
        return [f"data/processed/{d}.h5ad" for d in self.tasks[task].get("unlabeled", [])]

    def augmentation_params(self) -> dict[str, Any]:
        """Parameters of the augmentation-vector step (config ``augmentation``)."""
        return dict(self.raw.get("augmentation", {}))

    def seed_for(self, replicate: str) -> int:
        return int(self.raw.get("seed", 0)) + int(replicate.lstrip("r"))

    def split_spec(self, task: str) -> dict[str, Any]:
        spec = dict(self.tasks[task]["split"])
        spec["n_replicates"] = self.n_replicates(task)
        if "tier" in self.tasks[task]:
            spec["tier"] = dict(self.tasks[task]["tier"])
        return spec

    def scaling_tasks(self, base: str) -> list[str]:
        """The derived tier tasks of a task with a ``scaling`` block."""
        return [t for t, s in self.tasks.items() if s.get("scaling_of") == base]

    @property
    def scaled_tasks(self) -> list[str]:
        """Tasks with a ``scaling`` block (each gets a scaling figure)."""
        return [t for t, s in self.tasks.items() if s.get("scaling") is not None]

    def labeled_tasks(self, base: str) -> list[str]:
        """The derived labeled-cell tasks of a task with a ``labeled`` block (fewest first)."""
        from .data.tiers import labeled_tasks

        return labeled_tasks(self.tasks, base)

    @property
    def labeled_bases(self) -> list[str]:
        """Tasks with a ``labeled`` block (each gets a labeled-cells figure)."""
        return [t for t, s in self.tasks.items() if s.get("labeled") is not None]

    def is_derived(self, task: str) -> bool:
        """A derived tier task (scaling or labeled-cell tier), not a task of the config."""
        spec = self.tasks[task]
        return "scaling_of" in spec or "labeled_of" in spec

    @property
    def gain_tasks(self) -> list[str]:
        """Tasks running a method that learns from unlabeled cells and its supervised control."""
        from .unlabeled_gain import control_pairs

        pairs = control_pairs(self.method_table())
        return [
            t
            for t in self.tasks
            if any(m in self.methods_for(t) and c in self.methods_for(t) for m, c in pairs.items())
        ]

    def n_replicates(self, task: str) -> int:
        spec = self.tasks[task]
        if spec["split"]["kind"] == "stratified_kfold":
            return int(spec["split"].get("n_folds", 5))
        return int(spec.get("replicates", 1))

    def methods_for(self, task: str) -> list[str]:
        """Methods run on ``task``: the task's ``methods`` list (default all), kept where a
        method's ``tasks`` patterns (default all) match the task name."""
        from fnmatch import fnmatchcase

        out = []
        for m in self.tasks[task].get("methods", self.methods):
            patterns = self.methods.get(m, {}).get("tasks")
            if patterns is None or any(fnmatchcase(task, p) for p in patterns):
                out.append(m)
        return out

    # ---- targets --------------------------------------------------------------------------
    def all_runs(self) -> list[dict[str, str]]:
        """Every (task, method, balancing, replicate) the config asks for."""
        runs = []
        for task in self.tasks:
            derived = self.is_derived(task)
            for method in self.methods_for(task):
                # tier tasks (scaling curves) run each method with its native balancing only
                strategies = self.balancings_for(method)
                if derived:
                    strategies = [self.resolve_balancing(method, "native")]
                n_rep = self.n_replicates(task)
                n_rep = min(n_rep, int(self.methods.get(method, {}).get("replicates", n_rep)))
                for balancing in strategies:
                    for i in range(n_rep):
                        runs.append(
                            {
                                "task": task,
                                "method": method,
                                "balancing": balancing,
                                "replicate": f"r{i}",
                            }
                        )
        return runs

    def task_runs(self, task: str) -> list[dict[str, str]]:
        """The runs of one task."""
        return [r for r in self.all_runs() if r["task"] == task]

    @property
    def primary_tasks(self) -> list[str]:
        """Tasks of the config (not the derived scaling or labeled-cell tiers)."""
        return [t for t in self.tasks if not self.is_derived(t)]

    @property
    def crossed_tasks(self) -> list[str]:
        """Tasks on which some method is crossed with several balancing strategies."""
        return [
            t
            for t in self.primary_tasks
            if any(m in self.crossed_methods for m in self.methods_for(t))
        ]

    def run_paths(self, task: str, filename: str) -> list[str]:
        return [
            f"results/{r['task']}/{r['method']}/{r['balancing']}/{r['replicate']}/{filename}"
            for r in self.all_runs()
            if r["task"] == task
        ]

    def all_run_paths(self, filename: str) -> list[str]:
        return [p for task in self.tasks for p in self.run_paths(task, filename)]

    def method_table(self) -> dict[str, dict[str, Any]]:
        """Per method key: registry name, whether it is a control, whether it saw unlabeled cells."""
        from .methods import get

        out = {}
        for key, spec in self.methods.items():
            if spec.get("external"):
                out[key] = {
                    "method": key,
                    "control": False,
                    "external": True,
                    "uses_unlabeled": bool(spec.get("uses_unlabeled", False)),
                    "placeholder": bool(spec.get("placeholder", False)),
                    "supervised_control": spec.get("supervised_control"),
                }
                continue
            cls = get(spec.get("method", key))
            out[key] = {
                "method": spec.get("method", key),
                "control": bool(getattr(cls, "is_control", False)),
                "external": False,
                "uses_unlabeled": bool(getattr(cls, "uses_unlabeled", False)),
                "placeholder": bool(getattr(cls, "is_placeholder", False)),
                "supervised_control": spec.get("supervised_control"),
                "class_control": getattr(cls, "supervised_control", None),
            }
        return out

    # ---- paper figures and the reproduction section --------------------------------------
    FIGURE_FILES: ClassVar[dict[str, str]] = {
        "method_comparison": "results/figures/{task}_method_comparison.png",
        "f1_vs_train_cells": "results/figures/{task}_f1_vs_train_cells.png",
        "training_curves": "results/figures/{task}_training_curves.png",
        "uncertainty": "results/figures/{task}_uncertainty.png",
        "balancing": "results/figures/{task}_balancing.png",
        "balancing_per_class": "results/figures/{task}_balancing_per_class.png",
        "balancing_runtime": "results/figures/balancing_runtime.png",
        "scaling": "results/figures/{task}_scaling.png",
        "model_size": "results/figures/{task}_model_size.png",
        "labeled_cells": "results/figures/{task}_labeled_cells.png",
        "unlabeled_gain": "results/tables/unlabeled_gain.html",
        "reproduction": "results/tables/reproduction.html",
    }

    @property
    def published_file(self) -> str | None:
        """The YAML file whose ``published:`` list the reproduction section compares with."""
        return self.raw.get("reproduction", {}).get("published", "config/paper.yaml")

    def figure_targets(self) -> dict[str, list[str]]:
        """Snakemake target per paper figure (config ``paper_figures``): name -> files.

        A figure whose tasks are all missing from this config is left out.
        """
        out: dict[str, list[str]] = {}
        for name, spec in self.raw.get("paper_figures", {}).items():
            pattern = self.FIGURE_FILES[spec["figure"]]
            if "{task}" in pattern:
                tasks = [t for t in spec.get("tasks", []) if t in self.tasks]
                files = [pattern.format(task=t) for t in tasks]
            else:
                files = [pattern]
            if files:
                out[name] = files
        return out

    def all_targets(self) -> list[str]:
        targets = ["results/tables/scores.csv", "results/tables/summary.html"]
        for task in self.primary_tasks:
            targets.append(f"results/figures/{task}_method_comparison.png")
            targets.append(f"results/figures/{task}_f1_vs_train_cells.png")
            targets.append(f"results/figures/{task}_training_curves.png")
            targets.append(f"results/figures/{task}_uncertainty.png")
            if task in self.crossed_tasks:
                targets.append(f"results/figures/{task}_balancing.png")
                targets.append(f"results/figures/{task}_balancing_per_class.png")
        if self.crossed_methods:
            targets.append("results/tables/balancing_tests.csv")
        if self.balancing.get("runtime_sweep"):
            targets.append("results/figures/balancing_runtime.png")
        if self.published_file:
            targets.append("results/tables/reproduction.html")
        for task in self.scaled_tasks:
            targets.append(f"results/figures/{task}_scaling.png")
        for task in self.model_size_tasks:
            targets.append(f"results/figures/{task}_model_size.png")
        for task in self.labeled_bases:
            targets.append(f"results/figures/{task}_labeled_cells.png")
        if self.gain_tasks:
            targets.append("results/tables/unlabeled_gain.html")
        return targets

    @property
    def model_size_tasks(self) -> list[str]:
        """Primary tasks running one registry model under several config keys (e.g. widths)."""
        out = []
        for task in self.primary_tasks:
            models = [
                self.methods[m].get("method", m)
                for m in self.methods_for(task)
                if not self.methods[m].get("external")
            ]
            if any(models.count(x) > 1 for x in set(models)):
                out.append(task)
        return out


def import_method_module(module: str, where: str = "config") -> None:
    """Import a user's method module (a .py file path or a dotted name) so it registers itself."""
    import importlib
    import importlib.util
    import sys
    from pathlib import Path

    try:
        if module.endswith(".py"):
            path = Path(module).resolve()
            name = "celltype_bench_user_" + re.sub(r"\W", "_", path.stem)
            if name in sys.modules:
                return
            spec = importlib.util.spec_from_file_location(name, path)
            if spec is None or spec.loader is None or not path.exists():
                raise FileNotFoundError(str(path))
            mod = importlib.util.module_from_spec(spec)
            sys.modules[name] = mod
            spec.loader.exec_module(mod)
        else:
            importlib.import_module(module)
    except Exception as exc:
        raise InputError(
            f"cannot import method module '{module}' ({type(exc).__name__}: {exc})",
            file=where.split(":")[0],
            field=where.split(": ")[-1],
            fix="give a .py file path relative to the working directory, or an importable dotted module name",
        ) from exc
