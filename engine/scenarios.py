"""Scenario grids as data.

A grid is a list of scenarios; scenario ``s`` moves the underlying by
``range_mult[s] * scan_range + abs_move[s]`` (a fraction of price), shocks implied volatility in
direction ``vol_sign[s]`` (+1 up, 0 unchanged, -1 down) by the expiry-scaled vol shock, and counts
its P&L with ``weight[s]`` (1 for regular scenarios, a fraction for extreme moves).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import InvalidParameter


@dataclass(frozen=True, eq=False)
class ScenarioGrid:
    name: str
    range_mult: np.ndarray
    abs_move: np.ndarray
    vol_sign: np.ndarray
    weight: np.ndarray

    def __post_init__(self):
        n = len(self.range_mult)
        for f in ("abs_move", "vol_sign", "weight"):
            if len(getattr(self, f)) != n:
                raise InvalidParameter(f"grid {self.name}: {f} has {len(getattr(self, f))} "
                                       f"entries, expected {n}")
        if np.any(self.weight < 0) or np.any(self.weight > 1):
            raise InvalidParameter(f"grid {self.name}: weights must be in [0, 1]")

    def __len__(self) -> int:
        return len(self.range_mult)

    def moves(self, scan_range: float) -> np.ndarray:
        """Price moves as fractions of price for a given scan range."""
        return self.range_mult * scan_range + self.abs_move


def _grid(name, rows):
    a = np.array(rows, dtype=np.float64)
    return ScenarioGrid(name, a[:, 0].copy(), a[:, 1].copy(), a[:, 2].copy(), a[:, 3].copy())


def span16(extreme_multiple: float = 2.0, extreme_weight: float = 0.35) -> ScenarioGrid:
    """CME SPAN's 16 scenarios, in the order of the CME risk-array documentation.

    1-2 unchanged price, vol up/down; 3-14 +-1/3, +-2/3, +-3/3 of the scan range with vol up/down;
    15-16 +-2x the scan range (vol unchanged) of which 35% of the loss counts.
    """
    rows = [(0.0, 0, +1, 1), (0.0, 0, -1, 1)]
    for frac in (1 / 3, 2 / 3, 1.0):
        rows += [(frac, 0, +1, 1), (frac, 0, -1, 1), (-frac, 0, +1, 1), (-frac, 0, -1, 1)]
    rows += [(extreme_multiple, 0, 0, extreme_weight), (-extreme_multiple, 0, 0, extreme_weight)]
    return _grid("span16", rows)


DERIBIT_EXTENDED_MOVES = (-0.66, -0.33, 0.5, 1.0, 2.0, 3.0, 4.0, 5.0)


def deribit(points: int = 9, extended_moves=DERIBIT_EXTENDED_MOVES,
            extended_weight: float = 0.10) -> ScenarioGrid:
    """Deribit-style grid: ``points`` evenly spaced moves over +-scan range (0 included), each
    with vol up, unchanged and down; then an extended table of absolute moves (vol unchanged)
    counted at ``extended_weight``."""
    if points < 3 or points % 2 == 0:
        raise InvalidParameter(f"deribit grid needs an odd number >= 3 of points, got {points}")
    rows = []
    for m in np.linspace(-1.0, 1.0, points):
        for v in (+1, 0, -1):
            rows.append((float(m), 0.0, v, 1.0))
    for m in extended_moves:
        rows.append((0.0, float(m), 0, extended_weight))
    return _grid("deribit", rows)


PRESETS = {"span16": span16, "deribit": deribit}


def preset(name: str) -> ScenarioGrid:
    try:
        return PRESETS[name]()
    except KeyError:
        raise InvalidParameter(f"unknown scenario grid {name!r}; presets: {sorted(PRESETS)}",
                               field="grid", value=name) from None
