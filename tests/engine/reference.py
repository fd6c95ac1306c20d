"""Slow, plain-Python reference of the engine's valuation and scenario aggregation.

Written independently of the numba kernels (dicts and loops, scipy's normal CDF) so that the
kernels are checked against a second implementation of the same documented conventions.
"""
import math

from scipy.stats import norm

import engine as E


def black76_ref(f, k, t, vol, r, call):
    d1 = (math.log(f / k) + 0.5 * vol * vol * t) / (vol * math.sqrt(t))
    d2 = d1 - vol * math.sqrt(t)
    df = math.exp(-r * t)
    if call:
        return df * (f * norm.cdf(d1) - k * norm.cdf(d2))
    return df * (k * norm.cdf(-d2) - f * norm.cdf(-d1))


def risk_array_ref(mkt: E.Market, inst: E.Instrument, now_ms: int):
    """USD P&L per unit of ``inst`` in every scenario of its underlying's grid."""
    p = mkt.params.for_underlying(inst.underlying) if inst.underlying else None
    if inst.underlying is None:
        return None
    grid = E.preset(p.grid)
    s0 = mkt.index[inst.underlying]
    out = []
    for m, vs in zip(grid.moves(p.scan_range), grid.vol_sign):
        if inst.kind == E.Kind.SPOT:
            out.append(s0 * m)
        elif inst.kind in (E.Kind.PERPETUAL, E.Kind.FUTURE):
            f0 = mkt.mark[inst.id]
            if inst.settlement == E.Settlement.INVERSE:
                # USD value -mult*S/F with S and F moving together
                out.append(-inst.multiplier * s0 * (1 + m) / (f0 * (1 + m))
                           + inst.multiplier * s0 / f0)
            else:
                out.append(inst.multiplier * f0 * m)
        else:
            t = (inst.expiry_ms - now_ms) / E.instruments.MS_PER_YEAR
            dte = (inst.expiry_ms - now_ms) / 86_400_000
            shock = p.vol_shock_base * (30 / max(dte, p.dte_floor_days)) ** p.vol_shock_power
            iv = mkt.iv[inst.id]
            iv1 = max(iv * (1 + vs * shock), 0.01)
            f0 = s0 * math.exp(p.rate * t)
            call = inst.kind == E.Kind.CALL
            v0 = black76_ref(f0, inst.strike, t, iv, p.rate, call)
            v1 = black76_ref(f0 * (1 + m), inst.strike, t, iv1, p.rate, call)
            out.append(inst.multiplier * (v1 - v0))
    return out


def margin_ref(book: E.AccountBook, account: str, mkt: E.Market, rs: E.RiskSet):
    """(equity, im, mm) of one account from its positions, the reference risk arrays and the
    documented conventions."""
    uni = book.universe
    params = mkt.params
    now = rs.as_of_ms
    equity = 0.0
    pnl, som, dpos, lng, sht = {}, {}, {}, {}, {}
    for pos in book.positions(account):
        inst = uni.instruments[uni.row(pos.instrument)]
        u = inst.underlying
        q, c = pos.quantity, pos.cost
        if inst.kind == E.Kind.SPOT:
            price = mkt.index[u] if u else 1.0
            qe = q * (1 - params.haircut(inst.id)) if q > 0 else q
            equity += qe * price
        elif inst.kind in (E.Kind.PERPETUAL, E.Kind.FUTURE):
            f = mkt.mark[inst.id]
            qe = q
            if inst.settlement == E.Settlement.INVERSE:
                equity += (q * (-inst.multiplier / f) - c) * mkt.index[u]
            else:
                equity += q * inst.multiplier * f - c
        else:
            qe = q
            mark = mkt.mark[inst.id]
            usd = mark * mkt.index[u] if inst.settlement == E.Settlement.INVERSE else mark
            equity += q * inst.multiplier * usd
        if u is None:
            continue
        ra = risk_array_ref(mkt, inst, now)
        acc = pnl.setdefault(u, [0.0] * len(ra))
        for s, v in enumerate(ra):
            acc[s] += qe * v
        if inst.settlement == E.Settlement.INVERSE and c:
            spot = risk_array_ref(mkt, uni.instruments[uni.row(u)], now)
            for s, v in enumerate(spot):
                acc[s] -= c * v
        if inst.kind == E.Kind.SPOT:
            continue
        # position delta (USD-valued, in underlying units)
        s0 = mkt.index[u]
        if inst.kind in (E.Kind.PERPETUAL, E.Kind.FUTURE):
            if inst.settlement == E.Settlement.INVERSE:
                d = -c
                nd = q * inst.multiplier / mkt.mark[inst.id]
            else:
                d = q * inst.multiplier * mkt.mark[inst.id] / s0
                nd = d
            lng[u] = lng.get(u, 0.0) + max(nd, 0.0)
            sht[u] = sht.get(u, 0.0) + max(-nd, 0.0)
        else:
            t = (inst.expiry_ms - now) / E.instruments.MS_PER_YEAR
            p = params.for_underlying(u)
            g = math.exp(p.rate * t)
            h = s0 * 1e-6
            call = inst.kind == E.Kind.CALL
            iv = mkt.iv[inst.id]
            d = q * inst.multiplier * (black76_ref((s0 + h) * g, inst.strike, t, iv, p.rate, call)
                                       - black76_ref((s0 - h) * g, inst.strike, t, iv, p.rate,
                                                     call)) / (2 * h)
            if q < 0:
                som[u] = som.get(u, 0.0) - q * inst.multiplier * s0 * p.short_option_min
        dpos[u] = dpos.get(u, 0.0) + d
    im = mm = 0.0
    for u, arr in pnl.items():
        p = params.for_underlying(u)
        w = E.preset(p.grid).weight
        scan = max(0.0, -min(v * wt for v, wt in zip(arr, w)))
        s0 = mkt.index[u]
        notional = abs(dpos.get(u, 0.0)) * s0
        im_u = max(scan, som.get(u, 0.0))
        im_u += p.concentration_rate * notional * math.sqrt(notional / p.concentration_liquidity)
        im_u += p.basis_rate * s0 * min(lng.get(u, 0.0), sht.get(u, 0.0))
        im += im_u
        mm += im_u * p.mm_ratio
    return equity, im, mm
