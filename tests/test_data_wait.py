"""`data_wait`: the fraction of wall time spent waiting for input, on a scripted clock."""

from __future__ import annotations

import pytest

from jest_jax.metrics import DataWait


class _Clock:
    """A clock that moves only when told to."""

    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class _SlowInput:
    """An iterator whose every item takes `seconds` of the scripted clock."""

    def __init__(self, clock: _Clock, seconds: float):
        self.clock, self.seconds = clock, seconds

    def __iter__(self):
        return self

    def __next__(self) -> int:
        self.clock.now += self.seconds
        return 7


def test_fraction_is_waiting_over_elapsed_per_interval():
    clock = _Clock()
    wait = DataWait(clock)
    data = _SlowInput(clock, 0.25)
    for _ in range(4):           # 4 steps: 0.25 s waiting + 0.75 s computing each
        assert wait.next(data) == 7
        clock.now += 0.75
    assert wait.fraction() == pytest.approx(0.25)
    clock.now += 2.0              # the next interval: computing only
    assert wait.fraction() == 0.0
    data.seconds = 3.0
    wait.next(data)               # input-bound: all waiting
    assert wait.fraction() == 1.0


def test_restart_leaves_out_evaluations_and_failed_reads():
    clock = _Clock()
    wait = DataWait(clock)
    wait.next(_SlowInput(clock, 1.0))
    clock.now += 50.0             # an evaluation: not part of any interval
    wait.restart()
    wait.next(_SlowInput(clock, 1.0))
    clock.now += 1.0
    assert wait.fraction() == pytest.approx(0.5)

    class _Broken:
        def __next__(self):
            clock.now += 2.0
            raise StopIteration

    with pytest.raises(StopIteration):
        wait.next(_Broken())
    clock.now += 2.0
    assert wait.fraction() == pytest.approx(0.5)  # time in a failed read counts as waiting
