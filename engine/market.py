"""Market state and instrument risk arrays.

A :class:`Market` holds the latest index price per underlying and mark / implied vol per
instrument. :meth:`Market.risk_set` turns them into a :class:`RiskSet`: for every instrument its
USD value per unit at mark, its unit greeks, and its *risk array* (USD P&L per unit in each
scenario of its underlying's grid) computed by full Black-76 revaluation. Risk arrays are computed
once per market update and shared by every account (the SPAN idea), so re-margining an account is
a sparse dot product.

Values are in USD. For an inverse (coin-settled) instrument the USD value of one unit is
``mark_in_coin x index``; a coin-denominated cost basis is carried by the account as exposure to
the underlying's spot row (see engine.margin).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numba as nb
import numpy as np

from .errors import ExpiredInstrument, InvalidPrice, InvalidVolatility, MissingMarketData
from .instruments import MS_PER_DAY, MS_PER_YEAR, Kind, Universe
from .params import RiskParams
from .pricing import black76, norm_cdf
from .scenarios import preset

MIN_SHOCKED_VOL = 0.01


@dataclass(frozen=True, eq=False)
class RiskSet:
    """Everything the margin kernel needs about the market, as arrays.

    Per instrument row: ``value`` (USD per unit at mark), ``risk`` (n_inst x n_scen USD P&L per
    unit), ``greeks`` (n_inst x 4: delta in underlying units, gamma per USD, vega per 1.00 vol,
    theta per year, all USD-valued), ``notional_delta`` (coin delta of futures, for the basis
    add-on). Per underlying: ``index``, ``weight`` (n_und x n_scen), ``moves`` and the add-on
    parameters. ``version`` counts updates so consumers can tell stale sets apart.
    """

    value: np.ndarray
    risk: np.ndarray
    greeks: np.ndarray
    notional_delta: np.ndarray
    index: np.ndarray
    moves: np.ndarray
    vol_sign: np.ndarray
    weight: np.ndarray
    short_option_min: np.ndarray
    concentration_rate: np.ndarray
    concentration_liquidity: np.ndarray
    basis_rate: np.ndarray
    mm_ratio: np.ndarray
    haircut: np.ndarray
    joint: bool
    params_version: int
    as_of_ms: int

    def packed(self, universe_arrays) -> np.ndarray:
        """The packed instrument table for the margin kernel, built once per RiskSet."""
        tab = self.__dict__.get("_packed")
        if tab is None or tab.shape[0] != self.value.shape[0]:
            from .margin import pack_instruments
            tab = pack_instruments(self, universe_arrays)
            object.__setattr__(self, "_packed", tab)
        return tab


#: Instruments below which risk arrays are computed by the calling thread alone: for a few
#: hundred instruments the arithmetic takes well under a millisecond, while waking the other
#: worker thread and waiting for it took ~7 ms per call (a market tick, ten a second).
RISK_PARALLEL_MIN = 2048


@nb.njit(cache=True, parallel=True, fastmath={"contract", "nsz"})
def risk_arrays(rows, kind, inverse, mult, strike, t_years, spot, mark, vol, rate, vol_shock,
                moves, vol_sign, und, value, risk, greeks, notional_delta):
    """Fill value / risk / greeks / notional_delta for ``rows`` (no argument checks).

    ``spot``, ``rate`` are per underlying; ``moves``/``vol_sign`` are per underlying x scenario.
    """
    n_scen = moves.shape[1]
    log_move = np.log(np.maximum(1.0 + moves, 1e-300))
    for r in nb.prange(rows.shape[0]):
        i = rows[r]
        u = und[i]
        k = kind[i]
        s0 = spot[u] if u >= 0 else 1.0
        if k == 0:  # spot / collateral asset
            value[i] = s0
            greeks[i, 0] = 1.0 if u >= 0 else 0.0
            greeks[i, 1] = 0.0
            greeks[i, 2] = 0.0
            greeks[i, 3] = 0.0
            notional_delta[i] = 0.0
            for s in range(n_scen):
                risk[i, s] = s0 * moves[u, s] if u >= 0 else 0.0
        elif k == 1 or k == 2:  # perpetual / dated future, priced at its own mark (forward)
            f0 = mark[i]
            if inverse[i]:
                # USD value of a coin-settled contract is -mult * S / F: invariant under the
                # proportional scenario moves, so its price risk lives in the coin cost basis.
                value[i] = -mult[i] * s0 / f0
                greeks[i, 0] = 0.0
                notional_delta[i] = mult[i] / f0
                for s in range(n_scen):
                    risk[i, s] = 0.0
            else:
                value[i] = mult[i] * f0
                greeks[i, 0] = mult[i] * f0 / s0
                notional_delta[i] = mult[i] * f0 / s0
                for s in range(n_scen):
                    risk[i, s] = mult[i] * f0 * moves[u, s]
            greeks[i, 1] = 0.0
            greeks[i, 2] = 0.0
            greeks[i, 3] = 0.0
        else:  # European option on the forward S * exp(r t)
            t = t_years[i]
            g = math.exp(rate[u] * t)
            f0 = s0 * g
            is_call = k == 3
            sig = vol[i]
            p0, d, gm, vg, th = black76(f0, strike[i], t, sig, rate[u], is_call)
            m = mult[i]
            value[i] = m * mark[i] * s0 if inverse[i] else m * mark[i]
            greeks[i, 0] = m * d * g
            greeks[i, 1] = m * gm * g * g
            greeks[i, 2] = m * vg
            greeks[i, 3] = m * th
            notional_delta[i] = 0.0
            shock = vol_shock[i]
            kk = strike[i]
            df = math.exp(-rate[u] * t)
            sqt = math.sqrt(t)
            ln_fk = math.log(f0 / kk)
            for s in range(n_scen):
                sig1 = sig * (1.0 + vol_sign[u, s] * shock)
                if sig1 < MIN_SHOCKED_VOL:
                    sig1 = MIN_SHOCKED_VOL
                g1 = 1.0 + moves[u, s]
                if g1 <= 0.0:
                    # a -100% move: calls worthless, puts worth their discounted strike
                    p1 = 0.0 if is_call else kk * df
                else:
                    # Black-76 written out with the per-instrument terms hoisted: only the
                    # scenario's log-move, vol and two normal CDFs are evaluated per cell
                    f1 = f0 * g1
                    sd = sig1 * sqt
                    d1 = (ln_fk + log_move[u, s] + 0.5 * sd * sd) / sd
                    call = df * (f1 * norm_cdf(d1) - kk * norm_cdf(d1 - sd))
                    p1 = call if is_call else call - df * (f1 - kk)
                risk[i, s] = m * (p1 - p0)


_NO_QUOTE, _EXPIRED = 1, 2


@nb.njit(cache=True)
def _pricing_inputs(und, kind, has_expiry, expiry_ms, marks, ivs, spot, now_ms, vs_base,
                    vs_power, vs_floor, strict, mark, vol, t_years, shock, priced):
    """Per instrument row: whether it can be priced now (its underlying has an index, it has
    a quote, it has not expired), and if so its mark, implied vol, time to expiry in years
    and vol shock. Returns -1, or with ``strict`` the first row that cannot be priced as
    ``row * 4 + reason`` (:data:`_NO_QUOTE`, :data:`_EXPIRED`) for the caller to name.

    Why compiled: this pass ran as a Python loop over the instruments, ~0.2 ms of a 0.36 ms
    risk set of 157 instruments, and the account path computes a risk set after every quote
    it has not seen. The arithmetic is the loop's, operation for operation (the vol shock is
    :meth:`UnderlyingParams.vol_shock`: ``base * (30 / max(days, floor)) ** power``), so the
    risk sets are bit-identical (tested against that loop)."""
    for i in range(und.shape[0]):
        u = und[i]
        if u >= 0 and not math.isfinite(spot[u]):
            continue
        k = kind[i]
        if k == 0:  # spot / collateral asset (Kind.SPOT, as in risk_arrays)
            priced[i] = True
            continue
        m = marks[i]
        if math.isnan(m):
            if strict:
                return i * 4 + _NO_QUOTE
            continue
        if has_expiry[i]:
            dt = expiry_ms[i] - now_ms
            if dt <= 0:
                if strict:
                    return i * 4 + _EXPIRED
                continue
            t_years[i] = dt / MS_PER_YEAR
            days = dt / MS_PER_DAY
            floor = vs_floor[u]
            shock[i] = vs_base[u] * (30.0 / (days if days >= floor else floor)) ** vs_power[u]
        mark[i] = m
        if k >= 3:  # Kind.CALL, Kind.PUT
            vol[i] = ivs[i]
        priced[i] = True
    return -1


class Market:
    """Latest market data for a universe; produces :class:`RiskSet` snapshots.

    Updates are validated as they arrive (a NaN or non-positive price raises
    :class:`~engine.errors.InvalidPrice` naming the instrument), so a RiskSet never contains NaN.
    """

    def __init__(self, universe: Universe, params: RiskParams | None = None):
        self.universe = universe
        self.params = params or RiskParams()
        self.index: dict[str, float] = {}
        self.mark: dict[str, float] = {}
        self.iv: dict[str, float] = {}
        self._last: RiskSet | None = None
        self._static: _Static | None = None
        self._rows: tuple | None = None  # see _row_quotes

    # -- updates --------------------------------------------------------------------------
    def set_index(self, underlying: str, price: float) -> None:
        _positive(price, "index_price", underlying)
        self.universe.add_underlying(underlying)
        self.index[underlying] = float(price)

    def set_quote(self, instrument_id: str, mark: float, iv: float | None = None,
                  index: float | None = None) -> None:
        row = self.universe.row(instrument_id)
        inst = self.universe.instruments[row]
        _positive(mark, "mark", instrument_id)
        if inst.is_option:
            if iv is None or not (math.isfinite(iv) and 0 < iv <= 10):
                raise InvalidVolatility(f"{instrument_id}: mark IV must be in (0, 10], got {iv!r}",
                                        field="mark_iv", value=iv, instrument=instrument_id)
            self.iv[instrument_id] = float(iv)
        if index is not None and inst.underlying is not None:
            self.set_index(inst.underlying, index)
        if inst.kind == Kind.SPOT and inst.underlying is not None:
            self.index[inst.underlying] = float(mark)
        self.mark[instrument_id] = float(mark)
        rq = self._rows
        if rq is not None and rq[0] is self.mark and rq[1] is self.iv and \
                row < rq[2].shape[0]:
            rq[2][row] = self.mark[instrument_id]
            if inst.is_option:
                rq[3][row] = self.iv[instrument_id]

    def _row_quotes(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Marks and implied vols by instrument row (NaN: none), kept in step with the dicts
        by :meth:`set_quote`; rebuilt from the dicts when the universe grew or a dict was
        replaced. The dicts stay the record: these arrays only save a pass over them."""
        rq = self._rows
        if rq is None or rq[0] is not self.mark or rq[1] is not self.iv or \
                rq[2].shape[0] != n:
            marks, ivs = np.full(n, np.nan), np.full(n, np.nan)
            find = self.universe.find
            for src, dst in ((self.mark, marks), (self.iv, ivs)):
                for inst_id, x in src.items():
                    r = find(inst_id)
                    if 0 <= r < n:
                        dst[r] = x
            rq = self._rows = (self.mark, self.iv, marks, ivs)
        return rq[2], rq[3]

    def set_params(self, params: RiskParams) -> None:
        self.params = params

    # -- snapshots ------------------------------------------------------------------------
    def risk_set(self, now_ms: int, strict: bool = True) -> RiskSet:
        """Compute risk arrays for every priced instrument.

        With ``strict`` an instrument without a quote (or underlying without an index) raises
        :class:`MissingMarketData`; otherwise it is valued at 0 with zero risk (the pipeline
        uses non-strict mode so that listing an instrument before its first quote is harmless).
        """
        uni = self.universe
        a = uni.arrays
        p = self.params
        n, nu = len(uni), len(uni.underlyings)
        st = self._static
        if st is None or st.params is not p or st.arrays is not a:
            st = self._static = _Static(uni, a, p)
        spot = np.full(nu, np.nan)
        for u, name in enumerate(uni.underlyings):
            if name in self.index:
                spot[u] = self.index[name]
            elif strict:
                raise MissingMarketData(f"no index price for underlying {name}", field="index",
                                        value=name)
        mark = np.full(n, np.nan)
        vol = np.full(n, np.nan)
        t_years = np.zeros(n)
        shock = np.zeros(n)
        priced = np.zeros(n, dtype=np.bool_)
        marks, ivs = self._row_quotes(n)
        bad = _pricing_inputs(a.und, a.kind, st.has_expiry, a.expiry_ms, marks, ivs, spot,
                              int(now_ms), st.vs_base, st.vs_power, st.vs_floor, strict, mark,
                              vol, t_years, shock, priced)
        if bad >= 0:
            inst_id, expiry_ms = uni.ids[bad // 4], uni.instruments[bad // 4].expiry_ms
            if bad % 4 == _NO_QUOTE:
                raise MissingMarketData(f"no quote for {inst_id}", field="mark",
                                        instrument=inst_id)
            raise ExpiredInstrument(f"{inst_id} expired at {expiry_ms} (now {now_ms})",
                                    field="expiry_ms", value=expiry_ms, instrument=inst_id)
        rows = np.flatnonzero(priced).astype(np.int64)
        value = np.zeros(n)
        risk = np.zeros((n, st.n_scen))
        greeks = np.zeros((n, 4))
        nd = np.zeros(n)
        spot_k = np.where(np.isfinite(spot), spot, 1.0)
        threads = nb.get_num_threads()
        if rows.shape[0] < RISK_PARALLEL_MIN:
            nb.set_num_threads(1)  # this call only (the setting is per calling thread)
        try:
            risk_arrays(rows, a.kind, a.inverse, a.mult, a.strike, t_years, spot_k, mark,
                        vol, st.rate, shock, st.moves, st.vsign, a.und, value, risk, greeks, nd)
        finally:
            nb.set_num_threads(threads)
        rs = RiskSet(
            value=value, risk=risk, greeks=greeks, notional_delta=nd, index=spot_k,
            moves=st.moves, vol_sign=st.vsign, weight=st.weight,
            short_option_min=st.short_option_min, concentration_rate=st.concentration_rate,
            concentration_liquidity=st.concentration_liquidity, basis_rate=st.basis_rate,
            mm_ratio=st.mm_ratio, haircut=st.haircut, joint=p.joint_scenarios,
            params_version=p.version, as_of_ms=int(now_ms))
        self._last = rs
        return rs


class _Static:
    """What :meth:`Market.risk_set` needs that changes only with the risk parameters or the
    universe (its arrays are rebuilt whenever an instrument is added or updated): the
    scenario grids as arrays, the per-underlying add-on parameters, the haircuts, and per
    instrument whether it is dated.

    Why: the account path recomputes the risk set after every quote it has not seen yet (a
    trade is margined at the latest marks), and at 10,000 events/s with 2% quotes a profile of
    the worker put 9% of its event loop in this method, most of it rebuilding these from the
    parameters each time. The cached arrays are shared by the risk sets built from them and
    never written."""

    def __init__(self, uni: Universe, arrays, p: RiskParams):
        self.params, self.arrays = p, arrays
        nu = len(uni.underlyings)
        grids = [preset(p.for_underlying(u).grid) for u in uni.underlyings]
        self.n_scen = max((len(g) for g in grids), default=1)
        self.moves = np.zeros((nu, self.n_scen))
        self.vsign = np.zeros((nu, self.n_scen))
        self.weight = np.ones((nu, self.n_scen))
        up = [p.for_underlying(u) for u in uni.underlyings]
        for u, (g, q) in enumerate(zip(grids, up)):
            self.moves[u, :len(g)] = g.moves(q.scan_range)
            self.vsign[u, :len(g)] = g.vol_sign
            self.weight[u, :len(g)] = g.weight
        self.rate = np.array([q.rate for q in up], dtype=np.float64)
        self.short_option_min = np.array([q.short_option_min for q in up], dtype=np.float64)
        self.concentration_rate = np.array([q.concentration_rate for q in up],
                                           dtype=np.float64)
        self.concentration_liquidity = np.array([q.concentration_liquidity for q in up])
        self.basis_rate = np.array([q.basis_rate for q in up], dtype=np.float64)
        self.mm_ratio = np.array([q.mm_ratio for q in up], dtype=np.float64)
        self.haircut = np.array([p.haircut(inst.id) if inst.kind == Kind.SPOT else 0.0
                                 for inst in uni.instruments], dtype=np.float64)
        # whether an instrument is dated (the universe's expiry array holds 0 for none); per
        # underlying, the vol-shock parameters (an instrument without an underlying is never
        # dated)
        self.has_expiry = np.array([inst.expiry_ms is not None for inst in uni.instruments],
                                   dtype=np.bool_)
        self.vs_base = np.array([q.vol_shock_base for q in up], dtype=np.float64)
        self.vs_power = np.array([q.vol_shock_power for q in up], dtype=np.float64)
        self.vs_floor = np.array([q.dte_floor_days for q in up], dtype=np.float64)


def _positive(x, field, who):
    if x is None or not isinstance(x, (int, float, np.floating, np.integer)) \
            or not math.isfinite(x) or x <= 0:
        raise InvalidPrice(f"{who}: {field} must be finite and > 0, got {x!r}", field=field,
                           value=x, instrument=who)
