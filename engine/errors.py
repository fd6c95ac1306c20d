"""Engine exceptions.

Every rejection of bad input is a subclass of :class:`EngineError` that carries the offending
value, so that a caller (a notebook, or the streaming pipeline turning it into a dead letter)
can say exactly what was wrong instead of propagating a silent NaN through margin numbers.
"""
from __future__ import annotations


class EngineError(ValueError):
    """Root of all engine input errors."""

    def __init__(self, message: str, *, field: str | None = None, value: object = None,
                 instrument: str | None = None):
        super().__init__(message)
        self.field = field
        self.value = value
        self.instrument = instrument


class InvalidPrice(EngineError):
    """A price, index or forward that is NaN, infinite, zero or negative."""


class InvalidVolatility(EngineError):
    """An implied volatility that is NaN, infinite, non-positive or absurd (> 10 = 1000%)."""


class InvalidQuantity(EngineError):
    """A position or trade quantity that is NaN, infinite or beyond the absurd-size limit."""


class ExpiredInstrument(EngineError):
    """An option or dated future at or past its expiry cannot be priced or margined."""


class UnknownInstrument(EngineError):
    """An instrument id that is not in the universe (no reference data received yet)."""


class MissingMarketData(EngineError):
    """An instrument or underlying that has reference data but no quote yet."""


class InvalidParameter(EngineError):
    """A risk parameter outside its domain (negative scan range, haircut above 1, ...)."""
