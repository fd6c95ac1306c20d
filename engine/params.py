"""Risk parameters as data.

Risk managers change these at run time (a ``RiskParams`` record on the risk-params topic), so
they are plain frozen dataclasses with validation, a version number, and defaults close to the
public parameters of Deribit / OKX / CME summarised in the methodology notes.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Mapping

import numpy as np

from .errors import InvalidParameter


@dataclass(frozen=True)
class UnderlyingParams:
    """Per-underlying parameters.

    * ``scan_range``: price scan range as a fraction (0.15 = +-15%).
    * ``grid``: scenario grid preset (``deribit`` or ``span16``).
    * vol shock (relative to the option's IV): ``vol_shock_base * (30 / max(DTE, dte_floor_days))
      ** vol_shock_power``, so short-dated options get larger shocks.
    * ``short_option_min``: floor per short option, as a fraction of the underlying notional.
    * concentration add-on: ``concentration_rate * N * sqrt(N / concentration_liquidity)`` on
      the position delta notional N (USD), so the rate grows with sqrt(size).
    * ``basis_rate``: charge on the offset part of futures/perpetual deltas (calendar spreads
      have ~zero scan risk but real basis risk).
    * ``mm_ratio``: MM = IM x mm_ratio.
    * ``rate``: the interest rate carrying the index to option forwards.
    """

    scan_range: float = 0.15
    grid: str = "deribit"
    vol_shock_base: float = 0.38
    vol_shock_power: float = 0.30
    dte_floor_days: float = 3.0
    short_option_min: float = 0.01
    concentration_rate: float = 0.02
    concentration_liquidity: float = 5e6
    basis_rate: float = 0.01
    mm_ratio: float = 0.75
    rate: float = 0.0

    def __post_init__(self):
        checks = {
            "scan_range": 0 < self.scan_range <= 2,
            "vol_shock_base": 0 <= self.vol_shock_base <= 5,
            "vol_shock_power": 0 <= self.vol_shock_power <= 2,
            "dte_floor_days": self.dte_floor_days > 0,
            "short_option_min": 0 <= self.short_option_min <= 1,
            "concentration_rate": self.concentration_rate >= 0,
            "concentration_liquidity": self.concentration_liquidity > 0,
            "basis_rate": 0 <= self.basis_rate <= 1,
            "mm_ratio": 0 < self.mm_ratio <= 1,
            "rate": -1 < self.rate < 1,
        }
        for name, ok in checks.items():
            v = getattr(self, name)
            if not ok or not np.isfinite(v):
                raise InvalidParameter(f"risk parameter {name}={v!r} is out of range",
                                       field=name, value=v)
        from .scenarios import PRESETS
        if self.grid not in PRESETS:
            raise InvalidParameter(f"unknown grid {self.grid!r}", field="grid", value=self.grid)

    def vol_shock(self, dte_days):
        return self.vol_shock_base * (30.0 / np.maximum(dte_days, self.dte_floor_days)) \
            ** self.vol_shock_power


@dataclass(frozen=True)
class StateThresholds:
    """Margin-state thresholds.

    LIQUIDATION when equity < MM; MARGIN_CALL when equity < IM; WARNING when equity <
    IM x ``warning_level``; otherwise HEALTHY. An account leaves a worse state only once equity
    clears that state's threshold by ``hysteresis`` (5% = must reach 1.05 x the level), so a
    price oscillating around a threshold cannot make it flap. A liquidation plan closes enough to
    reach MM x (1 + ``liquidation_buffer``).
    """

    warning_level: float = 1.2
    hysteresis: float = 0.05
    liquidation_buffer: float = 0.10

    def __post_init__(self):
        if not self.warning_level >= 1:
            raise InvalidParameter("warning_level must be >= 1", value=self.warning_level)
        if not 0 <= self.hysteresis < 1:
            raise InvalidParameter("hysteresis must be in [0, 1)", value=self.hysteresis)
        if not 0 <= self.liquidation_buffer < 1:
            raise InvalidParameter("liquidation_buffer must be in [0, 1)",
                                   value=self.liquidation_buffer)


DEFAULT_HAIRCUTS = {"USD": 0.0, "USDC": 0.0, "USDT": 0.02, "BTC": 0.05, "ETH": 0.07, "SOL": 0.15}


@dataclass(frozen=True)
class RiskParams:
    """All risk parameters. ``underlyings`` overrides ``default`` per underlying.

    ``joint_scenarios``: by default each underlying is an independent risk unit (scan risks add
    up, no diversification credit between BTC and ETH: conservative, and what OKX's risk units and
    Deribit's per-currency standard portfolio margin do). With ``joint_scenarios=True`` scenario
    ``s`` is applied to every underlying at once (perfect correlation) and the worst *sum* is
    taken, which credits cross-underlying hedges; all underlyings must then share one grid.
    """

    version: int = 1
    default: UnderlyingParams = field(default_factory=UnderlyingParams)
    underlyings: Mapping[str, UnderlyingParams] = field(default_factory=dict)
    haircuts: Mapping[str, float] = field(default_factory=lambda: dict(DEFAULT_HAIRCUTS))
    default_haircut: float = 0.10
    thresholds: StateThresholds = field(default_factory=StateThresholds)
    joint_scenarios: bool = False

    def __post_init__(self):
        for asset, h in self.haircuts.items():
            if not (np.isfinite(h) and 0 <= h < 1):
                raise InvalidParameter(f"haircut for {asset} must be in [0, 1), got {h!r}",
                                       field="haircut", value=h)
        if self.joint_scenarios:
            grids = {p.grid for p in self.underlyings.values()} | {self.default.grid}
            if len(grids) > 1:
                raise InvalidParameter("joint_scenarios needs one grid for all underlyings, "
                                       f"got {sorted(grids)}", field="grid", value=sorted(grids))

    def for_underlying(self, name: str) -> UnderlyingParams:
        return self.underlyings.get(name, self.default)

    def haircut(self, asset: str) -> float:
        return self.haircuts.get(asset, self.default_haircut)

    def with_underlying(self, name: str, params: UnderlyingParams) -> "RiskParams":
        ups = dict(self.underlyings)
        ups[name] = params
        return replace(self, underlyings=ups, version=self.version + 1)
