"""Black-76 pricing and greeks.

Options on crypto exchanges are quoted against a forward (the future of the same expiry, or the
index carried at a rate), so Black-76 on the forward is the natural model: it needs no dividend or
borrow assumption and makes delta-one instruments exact (their value is linear in the forward).

Two layers: ``black76`` is a numba kernel with no checks that the risk-array kernel calls in its
inner loop; :func:`option_greeks` is the public, validated, vectorised entry point.
"""
from __future__ import annotations

import math

import numba as nb
import numpy as np

from .errors import ExpiredInstrument, InvalidPrice, InvalidVolatility

_SQRT2 = math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


@nb.njit(cache=True, inline="always")
def norm_cdf(x):
    return 0.5 * math.erfc(-x / _SQRT2)


@nb.njit(cache=True, inline="always")
def norm_pdf(x):
    return _INV_SQRT_2PI * math.exp(-0.5 * x * x)


@nb.njit(cache=True, inline="always")
def black76_price(forward, strike, t, vol, rate, is_call):
    """Discounted Black-76 price per unit of underlying (no argument checks)."""
    df = math.exp(-rate * t)
    sd = vol * math.sqrt(t)
    d1 = (math.log(forward / strike) + 0.5 * sd * sd) / sd
    d2 = d1 - sd
    if is_call:
        return df * (forward * norm_cdf(d1) - strike * norm_cdf(d2))
    return df * (strike * norm_cdf(-d2) - forward * norm_cdf(-d1))


@nb.njit(cache=True)
def black76(forward, strike, t, vol, rate, is_call):
    """Price, delta, gamma, vega, theta of one option (no argument checks).

    delta and gamma are with respect to the forward, vega per 1.00 of vol, theta is
    -dPrice/dt with the forward held fixed (so it includes the discounting term r*P).
    """
    df = math.exp(-rate * t)
    sqt = math.sqrt(t)
    sd = vol * sqt
    d1 = (math.log(forward / strike) + 0.5 * sd * sd) / sd
    d2 = d1 - sd
    pdf1 = norm_pdf(d1)
    if is_call:
        price = df * (forward * norm_cdf(d1) - strike * norm_cdf(d2))
        delta = df * norm_cdf(d1)
    else:
        price = df * (strike * norm_cdf(-d2) - forward * norm_cdf(-d1))
        delta = -df * norm_cdf(-d1)
    gamma = df * pdf1 / (forward * sd)
    vega = df * forward * pdf1 * sqt
    theta = rate * price - df * forward * pdf1 * vol / (2.0 * sqt)
    return price, delta, gamma, vega, theta


@nb.njit(cache=True, parallel=False)
def _greeks_batch(forward, strike, t, vol, rate, is_call, out):
    for i in range(forward.shape[0]):
        p, d, g, v, th = black76(forward[i], strike[i], t[i], vol[i], rate[i], is_call[i])
        out[0, i] = p
        out[1, i] = d
        out[2, i] = g
        out[3, i] = v
        out[4, i] = th


def _check_positive(name, arr, exc):
    bad = ~(np.isfinite(arr) & (arr > 0))
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise exc(f"{name} must be finite and > 0, got {arr[i]!r} at index {i}",
                  field=name, value=float(arr[i]))


def option_greeks(forward, strike, t_years, vol, rate, is_call):
    """Black-76 price and greeks for a batch of European options.

    All arguments broadcast against each other (scalars or 1-d arrays). Returns five float64
    numpy arrays ``(price, delta, gamma, vega, theta)``, all linear (in the currency of the
    forward and strike) and per unit of underlying:

    * price discounted with ``exp(-rate * t_years)``;
    * delta and gamma with respect to the forward;
    * vega per 1.00 (100 vol points) of volatility;
    * theta = -d(price)/d(t_years) with the forward held fixed, per year.

    Raises :class:`InvalidPrice` for a non-finite or non-positive forward or strike,
    :class:`InvalidVolatility` for a non-finite, non-positive or > 10 vol, and
    :class:`ExpiredInstrument` for ``t_years <= 0``; the error names the offending value.
    """
    f, k, t, v, r, c = np.broadcast_arrays(
        np.asarray(forward, dtype=np.float64), np.asarray(strike, dtype=np.float64),
        np.asarray(t_years, dtype=np.float64), np.asarray(vol, dtype=np.float64),
        np.asarray(rate, dtype=np.float64), np.asarray(is_call, dtype=np.bool_))
    shape = f.shape
    f, k, t, v, r, c = (np.ascontiguousarray(a).ravel() for a in (f, k, t, v, r, c))
    _check_positive("forward", f, InvalidPrice)
    _check_positive("strike", k, InvalidPrice)
    bad_t = ~(np.isfinite(t) & (t > 0))
    if bad_t.any():
        i = int(np.flatnonzero(bad_t)[0])
        raise ExpiredInstrument(f"t_years must be > 0 (option expired), got {t[i]!r} at index {i}",
                                field="t_years", value=float(t[i]))
    bad_v = ~(np.isfinite(v) & (v > 0) & (v <= 10.0))
    if bad_v.any():
        i = int(np.flatnonzero(bad_v)[0])
        raise InvalidVolatility(f"vol must be in (0, 10], got {v[i]!r} at index {i}",
                                field="vol", value=float(v[i]))
    if not np.isfinite(r).all():
        raise InvalidPrice("rate must be finite", field="rate", value=float(r[~np.isfinite(r)][0]))
    out = np.empty((5, f.shape[0]), dtype=np.float64)
    _greeks_batch(f, k, t, v, r, c, out)
    return tuple(out[j].reshape(shape) for j in range(5))
