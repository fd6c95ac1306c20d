"""Instruments and the instrument universe.

The universe keeps instruments as a struct of numpy arrays so the kernels can index them by row.
Every risky underlying (BTC, ETH, ...) automatically gets a SPOT row named after the asset: that
row *is* the collateral asset, so a BTC balance is a position in the ``BTC`` spot row and is
shocked by the same scenarios as BTC derivatives (BTC collateral loses value when BTC falls).
Stablecoins are spot rows with no underlying (``und == -1``): valued at 1, never shocked.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from enum import IntEnum

import numpy as np

from .errors import InvalidParameter, InvalidQuantity, UnknownInstrument

MS_PER_YEAR = 365.0 * 24 * 3600 * 1000
MS_PER_DAY = 24 * 3600 * 1000
#: Quantities above this (in contracts) are rejected as absurd rather than margined.
MAX_ABS_QUANTITY = 1e9


class Kind(IntEnum):
    SPOT = 0
    PERPETUAL = 1
    FUTURE = 2
    CALL = 3
    PUT = 4


class Settlement(IntEnum):
    LINEAR = 0   # settled in a stablecoin / USD: P&L = qty * multiplier * (price change)
    INVERSE = 1  # settled in the underlying coin (Deribit style): multiplier is USD face value
                 # for futures; options are quoted in coin per 1 unit of underlying


@dataclass(frozen=True)
class Instrument:
    """Reference data of one tradable instrument.

    ``multiplier``: units of underlying per contract for linear instruments and options; USD face
    value per contract for inverse futures and perpetuals. ``expiry_ms`` is epoch milliseconds
    (None for spot and perpetuals). ``lot_size`` is the smallest quantity step, used to round
    liquidation plans.
    """

    id: str
    kind: Kind
    underlying: str | None
    settlement: Settlement = Settlement.LINEAR
    multiplier: float = 1.0
    strike: float | None = None
    expiry_ms: int | None = None
    lot_size: float = 0.0

    def __post_init__(self):
        if not self.id:
            raise InvalidParameter("instrument id must not be empty", field="id", value=self.id)
        if not (np.isfinite(self.multiplier) and self.multiplier > 0):
            raise InvalidParameter(f"{self.id}: multiplier must be > 0, got {self.multiplier!r}",
                                   field="multiplier", value=self.multiplier, instrument=self.id)
        if self.kind in (Kind.CALL, Kind.PUT):
            if self.strike is None or not (np.isfinite(self.strike) and self.strike > 0):
                raise InvalidParameter(f"{self.id}: option strike must be > 0, got {self.strike!r}",
                                       field="strike", value=self.strike, instrument=self.id)
        if self.kind in (Kind.CALL, Kind.PUT, Kind.FUTURE) and self.expiry_ms is None:
            raise InvalidParameter(f"{self.id}: {self.kind.name} needs an expiry",
                                   field="expiry_ms", value=None, instrument=self.id)
        if self.kind != Kind.SPOT and self.underlying is None:
            raise InvalidParameter(f"{self.id}: derivatives need an underlying",
                                   field="underlying", value=None, instrument=self.id)

    @property
    def is_option(self) -> bool:
        return self.kind in (Kind.CALL, Kind.PUT)

    @property
    def settle_asset(self) -> str:
        """Asset whose balance pays premiums and receives realised P&L."""
        return self.underlying if self.settlement == Settlement.INVERSE else "USD"


@dataclass
class Universe:
    """All known instruments and underlyings, as kernel-ready arrays.

    Instruments can be added at run time (reference data arrives on a topic); rows are never
    reordered, so row numbers held by account books stay valid.
    """

    stablecoins: tuple[str, ...] = ("USD", "USDC", "USDT")
    instruments: list[Instrument] = field(default_factory=list)
    underlyings: list[str] = field(default_factory=list)

    def __post_init__(self):
        self._index: dict[str, int] = {}
        self.ids: list[str] = []  # instrument id by row (ids never change: they are the key)
        self._und_index: dict[str, int] = {}
        self.spot_row: list[int] = []
        existing, self.instruments = self.instruments, []
        for s in self.stablecoins:
            self.add(Instrument(s, Kind.SPOT, None))
        for u in list(self.underlyings):
            self.underlyings.remove(u)
            self.add_underlying(u)
        for inst in existing:
            self.add(inst)

    # -- building -------------------------------------------------------------------------
    def add_underlying(self, name: str) -> int:
        if name in self._und_index:
            return self._und_index[name]
        if name in self.stablecoins:
            raise InvalidParameter(f"{name} is a stablecoin, not a risky underlying", value=name)
        u = len(self.underlyings)
        self.underlyings.append(name)
        self._und_index[name] = u
        self.spot_row.append(-1)
        self.spot_row[u] = self.add(Instrument(name, Kind.SPOT, name))
        return u

    def add(self, inst: Instrument) -> int:
        """Add or update an instrument; returns its row."""
        if inst.underlying is not None and inst.underlying not in self._und_index:
            self.add_underlying(inst.underlying)
        if inst.id in self._index:
            row = self._index[inst.id]
            old = self.instruments[row]
            if old.underlying != inst.underlying or old.kind != inst.kind:
                raise InvalidParameter(f"{inst.id}: kind/underlying of an existing instrument "
                                       "cannot change", instrument=inst.id)
            self.instruments[row] = inst
        else:
            row = len(self.instruments)
            self.instruments.append(inst)
            self.ids.append(inst.id)
            self._index[inst.id] = row
        self._arrays = None
        return row

    # -- lookup ---------------------------------------------------------------------------
    def row(self, instrument_id: str) -> int:
        try:
            return self._index[instrument_id]
        except KeyError:
            raise UnknownInstrument(f"unknown instrument {instrument_id!r}", field="instrument",
                                    value=instrument_id, instrument=instrument_id) from None

    def find(self, instrument_id: str, default: int = -1) -> int:
        """Row of an instrument, or ``default`` (no exception: for batch paths that set the
        unknown ones aside)."""
        return self._index.get(instrument_id, default)

    def rows(self, instrument_ids: list[str]) -> list[int]:
        """:meth:`row` of each id, in one lookup in C for the lot (a recovered account's
        instruments at a restart); UnknownInstrument names the first unknown one."""
        if not instrument_ids:
            return []
        try:
            got = operator.itemgetter(*instrument_ids)(self._index)
        except KeyError:
            return [self.row(i) for i in instrument_ids]  # raises for the first unknown
        return [got] if len(instrument_ids) == 1 else list(got)

    def __contains__(self, instrument_id: str) -> bool:
        return instrument_id in self._index

    def __len__(self) -> int:
        return len(self.instruments)

    def underlying_index(self, name: str) -> int:
        try:
            return self._und_index[name]
        except KeyError:
            raise UnknownInstrument(f"unknown underlying {name!r}", field="underlying",
                                    value=name) from None

    def is_stablecoin(self, asset: str) -> bool:
        return asset in self.stablecoins

    @property
    def arrays(self) -> "UniverseArrays":
        if self._arrays is None:
            n = len(self.instruments)
            ins = self.instruments
            self._arrays = UniverseArrays(
                kind=np.array([i.kind for i in ins], dtype=np.int8).reshape(n),
                und=np.array([-1 if i.underlying is None else self._und_index[i.underlying]
                              for i in ins], dtype=np.int32).reshape(n),
                inverse=np.array([i.settlement == Settlement.INVERSE for i in ins],
                                 dtype=np.bool_).reshape(n),
                mult=np.array([i.multiplier for i in ins], dtype=np.float64).reshape(n),
                strike=np.array([i.strike or 0.0 for i in ins], dtype=np.float64).reshape(n),
                expiry_ms=np.array([i.expiry_ms or 0 for i in ins], dtype=np.int64).reshape(n),
                spot_row=np.array(self.spot_row, dtype=np.int64),
            )
        return self._arrays


@dataclass(frozen=True)
class UniverseArrays:
    kind: np.ndarray
    und: np.ndarray
    inverse: np.ndarray
    mult: np.ndarray
    strike: np.ndarray
    expiry_ms: np.ndarray
    spot_row: np.ndarray


def check_quantity(qty: float, instrument: str = "") -> float:
    q = float(qty)
    if not math.isfinite(q) or abs(q) > MAX_ABS_QUANTITY:
        raise InvalidQuantity(f"quantity {qty!r} for {instrument or 'position'} is not finite or "
                              f"exceeds {MAX_ABS_QUANTITY:g}", field="quantity", value=qty,
                              instrument=instrument or None)
    return q
