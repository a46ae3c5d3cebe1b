"""Bad settings or input fail a step once; errors a retry can fix still get the RetryPolicy."""

from __future__ import annotations

import dagster as dg
import pytest

from seg_pipeline.defs.failures import no_retry_for_bad_input


def _attempts(error: Exception) -> tuple[int, str]:
    calls: list[int] = []

    @dg.asset(retry_policy=dg.RetryPolicy(max_retries=2))
    def flaky() -> None:
        calls.append(1)
        with no_retry_for_bad_input():
            raise error

    result = dg.materialize([flaky], raise_on_error=False)
    assert not result.success
    failure = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE")
    return len(calls), str(failure.event_specific_data)


@pytest.mark.parametrize(
    "error", [ValueError("batch_size=0"), FileNotFoundError("tile.tif"), KeyError("class")]
)
def test_bad_input_fails_once_with_its_message(error: Exception) -> None:
    attempts, failure = _attempts(error)
    assert attempts == 1 and type(error).__name__ in failure


def test_a_transient_error_is_retried_by_the_policy() -> None:
    attempts, _ = _attempts(RuntimeError("CUDA out of memory"))
    assert attempts == 3  # the first try and max_retries=2
