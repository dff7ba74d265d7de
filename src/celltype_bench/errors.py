"""The project's own error type: every message names the file, the field and the fix."""

from __future__ import annotations


class CellTypeBenchError(Exception):
    """Base class for errors raised deliberately by celltype-bench."""


class InputError(CellTypeBenchError, ValueError):
    """Bad input data or configuration.

    The message always says what is wrong, and where known the file, the field and the fix.
    """

    def __init__(
        self,
        problem: str,
        *,
        file: str | None = None,
        field: str | None = None,
        fix: str | None = None,
    ) -> None:
        self.problem = problem
        self.file = None if file is None else str(file)
        self.field = field
        self.fix = fix
        parts = []
        if self.file:
            parts.append(f"in {self.file}")
        if field:
            parts.append(f"field '{field}'")
        where = (" (" + ", ".join(parts) + ")") if parts else ""
        msg = f"{problem}{where}"
        if fix:
            msg += f". Fix: {fix}"
        super().__init__(msg)
