"""Black-76 against published values, parity and finite differences."""
import math

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import engine as E


def test_textbook_values():
    # Hull, Options Futures and Other Derivatives, example 15.6: S=42, K=40, r=10%, sigma=20%,
    # T=0.5 gives c=4.76, p=0.81. Black-76 on the forward S*exp(rT) reproduces Black-Scholes.
    f = 42 * math.exp(0.1 * 0.5)
    c = E.option_greeks(f, 40, 0.5, 0.2, 0.1, True)[0]
    p = E.option_greeks(f, 40, 0.5, 0.2, 0.1, False)[0]
    assert c == pytest.approx(4.7594, abs=1e-4)
    assert p == pytest.approx(0.8086, abs=1e-4)
    # Hull example 18.6 (futures option): F=20, K=20, r=9%, T=4/12, sigma=25%: put = 1.12
    assert E.option_greeks(20, 20, 4 / 12, 0.25, 0.09, False)[0] == pytest.approx(1.1166, abs=1e-4)


finite = dict(allow_nan=False, allow_infinity=False)


@settings(max_examples=200, deadline=None)
@given(f=st.floats(10, 1e5, **finite), k_ratio=st.floats(0.5, 2.0, **finite),
       t=st.floats(1 / 365, 3, **finite), vol=st.floats(0.05, 2.0, **finite),
       r=st.floats(-0.02, 0.1, **finite))
def test_put_call_parity(f, k_ratio, t, vol, r):
    k = f * k_ratio
    c = E.option_greeks(f, k, t, vol, r, True)
    p = E.option_greeks(f, k, t, vol, r, False)
    df = math.exp(-r * t)
    assert c[0] - p[0] == pytest.approx(df * (f - k), abs=1e-9 * f)
    assert c[1] - p[1] == pytest.approx(df, abs=1e-12)
    assert c[2] == pytest.approx(p[2], rel=1e-9)
    assert c[3] == pytest.approx(p[3], rel=1e-9)


@settings(max_examples=100, deadline=None, derandomize=True)
@given(f=st.floats(100, 1e5, **finite), k_ratio=st.floats(0.7, 1.4, **finite),
       t=st.floats(7 / 365, 2, **finite), vol=st.floats(0.1, 1.5, **finite),
       r=st.floats(0.0, 0.08, **finite), call=st.booleans())
def test_greeks_match_finite_differences(f, k_ratio, t, vol, r, call):
    k = f * k_ratio

    def price(ff=f, tt=t, vv=vol):
        return float(E.option_greeks(ff, k, tt, vv, r, call)[0])

    _, delta, gamma, vega, theta = (float(x) for x in E.option_greeks(f, k, t, vol, r, call))
    hd = f * 1e-6  # central difference: truncation error ~ h^2 gamma' / 6
    assert delta == pytest.approx((price(ff=f + hd) - price(ff=f - hd)) / (2 * hd), abs=1e-6)
    h = f * 1e-4
    assert gamma == pytest.approx((price(ff=f + h) - 2 * price() + price(ff=f - h)) / h ** 2,
                                  rel=5e-3, abs=1e-9)
    hv = 1e-5
    assert vega == pytest.approx((price(vv=vol + hv) - price(vv=vol - hv)) / (2 * hv),
                                 rel=1e-5, abs=1e-6 * f)
    ht = 1e-6
    assert theta == pytest.approx(-(price(tt=t + ht) - price(tt=t - ht)) / (2 * ht),
                                  rel=1e-4, abs=1e-5 * f)


def test_vectorised_shapes_and_broadcast():
    out = E.option_greeks(np.array([100.0, 110.0]), 100.0, 0.5, 0.3, 0.0, np.array([True, False]))
    assert all(o.shape == (2,) for o in out)
    single = E.option_greeks(110.0, 100.0, 0.5, 0.3, 0.0, False)
    assert out[0][1] == single[0]


@pytest.mark.parametrize("kw,exc,bad", [
    (dict(forward=float("nan")), E.InvalidPrice, "forward"),
    (dict(forward=-1.0), E.InvalidPrice, "forward"),
    (dict(strike=0.0), E.InvalidPrice, "strike"),
    (dict(t_years=0.0), E.ExpiredInstrument, "t_years"),
    (dict(t_years=-0.1), E.ExpiredInstrument, "t_years"),
    (dict(vol=float("nan")), E.InvalidVolatility, "vol"),
    (dict(vol=0.0), E.InvalidVolatility, "vol"),
])
def test_bad_inputs_raise_named_errors(kw, exc, bad):
    args = dict(forward=100.0, strike=100.0, t_years=0.5, vol=0.3, rate=0.0, is_call=True)
    args.update(kw)
    with pytest.raises(exc) as ei:
        E.option_greeks(**args)
    assert ei.value.field == bad
    assert bad in str(ei.value)
