"""`riskpipe bench kernel`: the engine's kernels against a plain numpy/scipy implementation of
the same math, timed in the same run on the same inputs.

Two workloads (the issue's targets on a 2-core machine):
* risk arrays for 20,000 options on the ``deribit`` grid (target: >= 3x the baseline);
* a full re-margin of 100,000 accounts x 20 positions (target: <= 50 ms).
Each baseline result is compared with the kernel's, so the ratio compares equal work.
"""
from __future__ import annotations

import json
import platform
import time

import numba
import numpy as np
from scipy.special import ndtr

import engine as E
from engine.instruments import MS_PER_DAY, MS_PER_YEAR

NOW = 1_767_225_600_000


def _best(fn, repeat):
    best = float("inf")
    out = None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def build_universe(n_options: int, seed: int = 1):
    rng = np.random.default_rng(seed)
    uni = E.Universe()
    mkt_px = {"BTC": 60_000.0, "ETH": 3_000.0}
    for u, s in mkt_px.items():
        uni.add(E.Instrument(f"{u}-PERP", E.Kind.PERPETUAL, u))
        uni.add(E.Instrument(f"{u}-INV-PERP", E.Kind.PERPETUAL, u, E.Settlement.INVERSE, 10.0))
        for d in (7, 30, 90, 180):
            uni.add(E.Instrument(f"{u}-F{d}", E.Kind.FUTURE, u, expiry_ms=NOW + d * MS_PER_DAY))
    for n in range(n_options):
        u = "BTC" if n % 2 == 0 else "ETH"
        s = mkt_px[u]
        dte = float(rng.choice([1, 2, 7, 14, 30, 60, 90, 180, 365]))
        k = float(np.round(s * np.exp(rng.normal(0, 0.25)), 0))
        kind = E.Kind.CALL if rng.random() < 0.5 else E.Kind.PUT
        settle = E.Settlement.INVERSE if rng.random() < 0.5 else E.Settlement.LINEAR
        uni.add(E.Instrument(f"{u}-{n}", kind, u, settle, 1.0, strike=k,
                             expiry_ms=NOW + int(dte * MS_PER_DAY)))
    mkt = E.Market(uni)
    for u, s in mkt_px.items():
        mkt.set_index(u, s)
    a = uni.arrays
    for i, inst in enumerate(uni.instruments):
        if inst.kind in (E.Kind.PERPETUAL, E.Kind.FUTURE):
            mkt.set_quote(inst.id, mkt.index[inst.underlying] * 1.001)
        elif inst.is_option:
            s = mkt.index[inst.underlying]
            iv = 0.5 + 0.3 * abs(np.log(inst.strike / s))
            t = (inst.expiry_ms - NOW) / MS_PER_YEAR
            p = float(E.option_greeks(s, inst.strike, t, iv, 0.0, inst.kind == E.Kind.CALL)[0])
            mkt.set_quote(inst.id, max(p / s if a.inverse[i] else p, 1e-9), iv=iv)
    return uni, mkt


def risk_arrays_numpy(uni, mkt, rs_like):
    """Baseline: the option risk arrays with numpy broadcasting and scipy's normal CDF."""
    a = uni.arrays
    opt = np.flatnonzero(a.kind >= 3)
    u = a.und[opt]
    names = uni.underlyings
    s0 = np.array([mkt.index[names[x]] for x in u])
    t = (a.expiry_ms[opt] - NOW) / MS_PER_YEAR
    k = a.strike[opt]
    vol = np.array([mkt.iv[uni.instruments[i].id] for i in opt])
    p = mkt.params.default
    shock = p.vol_shock_base * (30.0 / np.maximum(t * 365.0, p.dte_floor_days)) ** p.vol_shock_power
    moves = rs_like.moves[u]
    vsign = rs_like.vol_sign[u]
    call = (a.kind[opt] == 3)[:, None]

    def b76(f, sig):
        sd = sig * np.sqrt(t)[:, None] if np.ndim(sig) == 2 else (sig * np.sqrt(t))[:, None]
        kk = k[:, None]
        d1 = (np.log(f / kk) + 0.5 * sd * sd) / sd
        d2 = d1 - sd
        return np.where(call, f * ndtr(d1) - kk * ndtr(d2), kk * ndtr(-d2) - f * ndtr(-d1))

    f0 = s0[:, None]
    v0 = b76(f0, vol)
    sig1 = np.maximum(vol[:, None] * (1.0 + vsign * shock[:, None]), 0.01)
    v1 = b76(f0 * (1.0 + moves), sig1)
    return opt, a.mult[opt][:, None] * (v1 - v0)


def build_book(uni, n_accounts, n_positions, seed=2):
    rng = np.random.default_rng(seed)
    n_inst = len(uni)
    tradable = np.flatnonzero(uni.arrays.kind != 0)
    n = n_accounts
    inst = np.empty((n, n_positions), dtype=np.int64)
    inst[:, 0] = uni.row("USD")
    inst[:, 1] = uni.row("BTC")
    for r in range(n):
        inst[r, 2:] = rng.choice(tradable, n_positions - 2, replace=False)
    qty = rng.normal(0, 2, (n, n_positions))
    qty[:, 0] = rng.uniform(1e4, 1e6, n)
    qty[:, 1] = rng.uniform(0, 5, n)
    cost = np.zeros((n, n_positions))
    fut = np.isin(uni.arrays.kind[inst], (1, 2))
    cost[fut] = qty[fut] * 60_000 * 0.99
    book = E.AccountBook.from_dense(uni, [f"acct-{i}" for i in range(n)], inst, qty, cost)
    assert n_inst == len(uni)
    return book


def margin_numpy(book, uni, rs, chunk=4096):
    """Baseline: scan risk + short option minimum per account and underlying with numpy
    gathers and segment reductions (no add-ons), plus equity."""
    a = uni.arrays
    n = len(book.ids)
    cap = book.cap
    n_und = rs.weight.shape[0]
    scan_tot = np.empty(n)
    equity = np.empty(n)
    inst = book.inst.reshape(n, cap)
    qty = book.qty.reshape(n, cap)
    cost = book.cost.reshape(n, cap)
    hair = rs.haircut
    for lo in range(0, n, chunk):
        hi = min(n, lo + chunk)
        ii, q, c = inst[lo:hi], qty[lo:hi], cost[lo:hi]
        qe = np.where((a.kind[ii] == 0) & (q > 0), q * (1 - hair[ii]), q)
        u = a.und[ii]
        fx = np.where(a.inverse[ii], rs.index[np.maximum(u, 0)], 1.0)
        equity[lo:hi] = (qe * rs.value[ii] - c * fx).sum(axis=1)
        contrib = qe[..., None] * rs.risk[ii]
        inv_c = np.where(a.inverse[ii], c, 0.0)
        contrib -= inv_c[..., None] * rs.risk[a.spot_row[np.maximum(u, 0)]]
        tot = np.zeros(hi - lo)
        for uu in range(n_und):
            m = (u == uu)[..., None]
            pnl = (contrib * m).sum(axis=1) * rs.weight[uu]
            tot += np.maximum(0.0, -pnl.min(axis=1))
        scan_tot[lo:hi] = tot
    return equity, scan_tot


def run(n_options: int = 20_000, n_accounts: int = 100_000, n_positions: int = 20,
        repeat: int = 5) -> dict:
    uni, mkt = build_universe(n_options)
    rs = mkt.risk_set(NOW)  # also compiles / loads the kernels
    a = uni.arrays
    rows = np.flatnonzero(a.kind >= 3).astype(np.int64)
    n_scen = rs.risk.shape[1]

    def kernel_ra():
        value = np.zeros(len(uni)); risk = np.zeros((len(uni), n_scen))
        greeks = np.zeros((len(uni), 4)); nd = np.zeros(len(uni))
        t = np.maximum(a.expiry_ms - NOW, 0) / MS_PER_YEAR
        vol = np.array([mkt.iv.get(i.id, np.nan) for i in uni.instruments])
        p = mkt.params.default
        shock = p.vol_shock(np.maximum(t * 365.0, 1e-9))
        mark = np.array([mkt.mark.get(i.id, np.nan) for i in uni.instruments])
        E.risk_arrays(rows, a.kind, a.inverse, a.mult, a.strike, t, rs.index, mark, vol,
                      np.zeros(len(uni.underlyings)), shock, rs.moves, rs.vol_sign, a.und,
                      value, risk, greeks, nd)
        return risk

    kernel_ra()
    t_k, risk_k = _best(kernel_ra, repeat)
    t_np, (opt, risk_np) = _best(lambda: risk_arrays_numpy(uni, mkt, rs), max(2, repeat // 2))
    ra_err = float(np.max(np.abs(risk_k[opt] - risk_np)))

    book = build_book(uni, n_accounts, n_positions)
    book.margin(rs)  # warm
    t_m, res = _best(lambda: book.margin(rs), repeat)
    t_mnp, (eq_np, scan_np) = _best(lambda: margin_numpy(book, uni, rs), 1)
    eq_err = float(np.max(np.abs(res.equity - eq_np) / np.maximum(1.0, np.abs(eq_np))))
    one = np.array([12345], dtype=np.int64)
    book.margin(rs, one, parallel=False)
    t_one, _ = _best(lambda: book.margin(rs, one, parallel=False), 200)

    return {
        "benchmark": "kernel",
        "machine": {"cpus": __import__("os").cpu_count(), "numba_threads": numba.get_num_threads(),
                    "python": platform.python_version(), "numba": numba.__version__,
                    "numpy": np.__version__},
        "risk_arrays": {
            "options": int(rows.size), "scenarios": int(n_scen), "grid": "deribit",
            "kernel_ms": round(t_k * 1e3, 3), "numpy_scipy_ms": round(t_np * 1e3, 3),
            "speedup": round(t_np / t_k, 2), "target_speedup": 3.0,
            "max_abs_diff_usd": ra_err,
        },
        "remargin": {
            "accounts": n_accounts, "positions_per_account": n_positions,
            "kernel_ms": round(t_m * 1e3, 3), "target_ms": 50.0,
            "numpy_baseline_ms": round(t_mnp * 1e3, 3),
            "numpy_baseline_scope": "equity + scan risk only (no add-ons)",
            "speedup": round(t_mnp / t_m, 2),
            "equity_max_rel_diff": eq_err,
            "single_account_us": round(t_one * 1e6, 2),
        },
    }


if __name__ == "__main__":
    print(json.dumps(run(), indent=2))
