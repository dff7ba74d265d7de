"""Data layer: raw sources, preprocessing and split tables.

Import the submodules directly (``celltype_bench.data.sources``, ``.preprocess``, ``.splits``);
this package file stays import-free so that ``import celltype_bench.data`` is cheap.
"""
