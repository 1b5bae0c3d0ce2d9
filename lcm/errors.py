"""The project's error types: each message is the whole story a user sees."""

from __future__ import annotations

from typing import Any


class LCMError(Exception):
    """Base class of every error this package raises on purpose."""


class InputError(LCMError, ValueError):
    """A request parameter is out of bounds: names the field, the value and what is allowed."""

    def __init__(self, field: str, value: Any, allowed: str) -> None:
        self.field = field
        self.value = value
        self.allowed = allowed
        shown = repr(value)
        if len(shown) > 80:
            shown = shown[:77] + "..."
        super().__init__(f"{field}={shown} is not allowed: {allowed}")


class WeightsError(LCMError):
    """The weights directory is missing, incomplete or corrupt."""
