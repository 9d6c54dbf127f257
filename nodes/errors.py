"""User-facing errors: every message names the node, the input to change and the fix.

Code below a node raises `InputError(input_name, message)`; the node's `execute` runs inside
`node_errors(node_name)`, the one place that puts the node's display name in front.
"""
from __future__ import annotations

from contextlib import contextmanager


class SineNodeError(ValueError):
    """A user-facing error: the message names the node and the input to fix."""


class InputError(ValueError):
    """An error a node input causes; `input_name` None when the fix is not one input (the message says it)."""

    def __init__(self, input_name: str | None, message: str):
        super().__init__(message)
        self.input_name = input_name


@contextmanager
def node_errors(node: str):
    """Turn InputError into SineNodeError '<node>: input '<name>': <message>'."""
    try:
        yield
    except InputError as e:
        where = f"input '{e.input_name}': " if e.input_name else ""
        raise SineNodeError(f"{node}: {where}{e}") from None
