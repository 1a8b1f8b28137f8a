"""Learning-rate schedules."""

from __future__ import annotations

import math

import pytest

from mlp import MLPError, make_schedule


def test_constant():
    lr = make_schedule("constant", 0.1, 5)
    assert [lr(e) for e in range(1, 6)] == [0.1] * 5


def test_step():
    lr = make_schedule("step", 1.0, 9, step_size=3, gamma=0.5)
    values = [lr(e) for e in range(1, 10)]
    assert values == [1, 1, 1, 0.5, 0.5, 0.5, 0.25, 0.25, 0.25], f"step values {values}"


def test_cosine_starts_at_base_and_decreases_towards_min():
    lr = make_schedule("cosine", 0.2, 10, min_lr=0.01)
    values = [lr(e) for e in range(1, 11)]
    assert values[0] == pytest.approx(0.2)
    assert all(a > b for a, b in zip(values[:-1], values[1:], strict=True)), (
        f"not decreasing: {values}"
    )
    expected_last = 0.01 + 0.19 * 0.5 * (1 + math.cos(math.pi * 9 / 10))
    assert values[-1] == pytest.approx(expected_last) and values[-1] > 0.01


@pytest.mark.parametrize(
    ("args", "kwargs", "match"),
    [
        (("linear", 0.1, 5), {}, "unknown schedule"),
        (("step", 0.1, 5), {"min_lr": 0.0}, "does not accept"),
        (("cosine", 0.1, 0), {}, "epochs"),
        (("constant", -1.0, 5), {}, "learning rate"),
        (("step", 0.1, 5), {"step_size": 0}, "step_size"),
    ],
)
def test_bad_schedule_arguments(args, kwargs, match):
    with pytest.raises(MLPError, match=match):
        make_schedule(*args, **kwargs)
