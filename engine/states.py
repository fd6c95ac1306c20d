"""Margin states with hysteresis.

States are ordered by severity. Entering a worse state is immediate; leaving it requires equity to
clear that state's threshold by the hysteresis band, so an account whose equity oscillates around
a threshold does not flap between states (Mango v4's liquidation-end health uses the same idea).
"""
from __future__ import annotations

from enum import IntEnum

import numba as nb
import numpy as np

from .params import StateThresholds


class MarginState(IntEnum):
    HEALTHY = 0
    WARNING = 1
    MARGIN_CALL = 2
    LIQUIDATION = 3


@nb.njit(cache=True, inline="always")
def _raw_state(equity, im, mm, warning_level, f):
    if equity < mm * f:
        return 3
    if equity < im * f:
        return 2
    if equity < im * warning_level * f:
        return 1
    return 0


@nb.njit(cache=True)
def next_states(prev, equity, im, mm, warning_level, hysteresis, out):
    for a in range(prev.shape[0]):
        raw = _raw_state(equity[a], im[a], mm[a], warning_level, 1.0)
        if raw >= prev[a]:
            out[a] = raw
        else:
            banded = _raw_state(equity[a], im[a], mm[a], warning_level, 1.0 + hysteresis)
            out[a] = max(raw, min(prev[a], banded))


def classify(prev, equity, im, mm, thresholds: StateThresholds) -> np.ndarray:
    """New states (int8 array of MarginState values) given previous states and margin."""
    prev = np.ascontiguousarray(prev, dtype=np.int8)
    out = np.empty_like(prev)
    next_states(prev, np.ascontiguousarray(equity, dtype=np.float64),
                np.ascontiguousarray(im, dtype=np.float64),
                np.ascontiguousarray(mm, dtype=np.float64),
                thresholds.warning_level, thresholds.hysteresis, out)
    return out
