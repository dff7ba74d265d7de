"""celltype-bench: a reproducible benchmark of automatic cell-type annotation."""

__version__ = "0.1.0"
