"""Errors a retry cannot fix (bad settings, bad input) fail the step without using up retries."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import dagster as dg
from pydantic import ValidationError

#: Exceptions that mean "the input or the settings are wrong": the same run would fail again.
PERMANENT_ERRORS: tuple[type[BaseException], ...] = (ValueError, ValidationError, FileNotFoundError, KeyError)


@contextlib.contextmanager
def no_retry_for_bad_input() -> Iterator[None]:
    """Turn permanent errors into a ``dg.Failure(allow_retries=False)``: the RetryPolicy then skips them."""
    try:
        yield
    except PERMANENT_ERRORS as error:
        raise dg.Failure(description=f"{type(error).__name__}: {error}", allow_retries=False) from error
