"""Margin states: thresholds, hysteresis, no flapping."""
import numpy as np

import engine as E
from engine.states import MarginState as S

TH = E.StateThresholds(warning_level=1.2, hysteresis=0.05)


def step(prev, equity, im=100.0, mm=75.0):
    return int(E.classify(np.array([prev]), np.array([equity]), np.array([im]),
                          np.array([mm]), TH)[0])


def test_thresholds_enter_immediately():
    assert step(S.HEALTHY, 200) == S.HEALTHY
    assert step(S.HEALTHY, 119) == S.WARNING
    assert step(S.HEALTHY, 99) == S.MARGIN_CALL
    assert step(S.HEALTHY, 74) == S.LIQUIDATION
    assert step(S.HEALTHY, -1, im=0, mm=0) == S.LIQUIDATION  # negative equity, no positions


def test_leaving_requires_the_band():
    assert step(S.LIQUIDATION, 76) == S.LIQUIDATION          # above MM, inside the 5% band
    assert step(S.LIQUIDATION, 78.75) == S.MARGIN_CALL       # cleared MM x 1.05
    assert step(S.MARGIN_CALL, 101) == S.MARGIN_CALL
    assert step(S.MARGIN_CALL, 121) == S.WARNING             # cleared IM x 1.05 but not 1.26
    assert step(S.WARNING, 122) == S.WARNING
    assert step(S.WARNING, 126.1) == S.HEALTHY
    assert step(S.LIQUIDATION, 500) == S.HEALTHY             # a big deposit jumps straight back


def test_no_flapping_on_oscillating_price():
    # equity oscillates +-2% around the MM threshold 300 times: one entry, no exits
    eq = 75.0 * (1 + 0.02 * np.sin(np.arange(300)))
    states, prev = [], S.HEALTHY
    for e in eq:
        prev = step(prev, e)
        states.append(prev)
    changes = sum(1 for a, b in zip(states, states[1:]) if a != b)
    assert states[-1] == S.LIQUIDATION
    assert changes <= 1


def test_vectorised_matches_scalar():
    rng = np.random.default_rng(7)
    prev = rng.integers(0, 4, 1000).astype(np.int8)
    eq = rng.uniform(0, 200, 1000)
    out = E.classify(prev, eq, np.full(1000, 100.0), np.full(1000, 75.0), TH)
    assert [step(p, e) for p, e in zip(prev, eq)] == out.tolist()
