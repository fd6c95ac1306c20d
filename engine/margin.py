"""Portfolio margin of accounts: scan risk from risk arrays, add-ons, IM, MM and equity.

Positions are stored in CSR form (per account a slice ``start[a]:end[a]`` of flat arrays of
instrument row, quantity and cost basis). Re-margining is a sparse product of positions with the
shared risk arrays. One chunk routine (:func:`_margin_chunk`) is used by both the serial
path (a single trade: microseconds) and the parallel batch path (a market move: every account in
one call), so incremental and batch results are identical by construction, and a test checks it.

Conventions, per position (instrument row i, quantity q, cost c in the settlement currency):

* premium-paid instruments (spot, options) have c = 0: their premium moved the settlement
  balance when traded, and the position is worth q x value;
* margined instruments (futures, perpetuals) carry c = q x unit value at entry, so the
  contribution to equity is the unrealised P&L q x value - c;
* for inverse instruments c is in coin: it is valued at the index and shocked with the
  underlying's spot row (a coin amount loses USD value when the coin falls);
* spot rows are collateral: a positive balance counts at (1 - haircut); a negative balance
  (a loan) counts in full.

Scan risk per underlying = max(0, -min_s weight_s x P&L_s); IM per underlying =
max(scan risk, short option minimum) + concentration add-on + basis add-on; MM = IM x mm_ratio.
"""
from __future__ import annotations

import math
import threading
from dataclasses import dataclass

import numba as nb
import numpy as np

from .market import RiskSet

SPOT, PERPETUAL, FUTURE, CALL, PUT = 0, 1, 2, 3, 4
#: Accounts below which a margin call runs on the calling thread. A parallel call wakes the
#: other worker threads and waits for the slowest: on a busy 2-vCPU host that cost 0.3-3 ms,
#: more than margining a few thousand accounts takes, and it took both CPUs from the Kafka
#: clients (with 256, p99 at 10,000 events/s with quotes was 106-328 ms; with the account
#: path's rounds and the market tick's steps serial, 58-97 ms, three runs each).
_PARALLEL_MIN = 4096
#: Parallel kernels launch one at a time: a market tick's kernel runs on a thread of its own,
#: and not every numba threading layer accepts launches from two threads at once (workqueue
#: aborts the process). Serial calls need no lock: they release the GIL and share nothing.
_PARALLEL_LOCK = threading.Lock()


# Columns of the packed instrument table after the n_scen risk-array columns.
_VALUE, _DELTA, _ND, _MULT, _HAIRCUT, _KIND, _UND, _INVERSE = 0, 1, 5, 6, 7, 8, 9, 10
_N_EXTRA = 11


def pack_instruments(rs: RiskSet, universe_arrays) -> np.ndarray:
    """One row per instrument: risk array, then value, 4 greeks, notional delta, multiplier,
    haircut, kind, underlying, inverse flag; rows padded to whole 64-byte cache lines."""
    n, S = rs.risk.shape
    width = -(-(S + _N_EXTRA) // 8) * 8
    tab = np.zeros((n, width))
    ua = universe_arrays
    tab[:, :S] = rs.risk
    tab[:, S + _VALUE] = rs.value
    tab[:, S + _DELTA:S + _DELTA + 4] = rs.greeks
    tab[:, S + _ND] = rs.notional_delta
    tab[:, S + _MULT] = ua.mult[:n]
    tab[:, S + _HAIRCUT] = rs.haircut
    tab[:, S + _KIND] = ua.kind[:n]
    tab[:, S + _UND] = ua.und[:n]
    tab[:, S + _INVERSE] = ua.inverse[:n]
    return tab


@nb.njit(cache=True, nogil=True, fastmath={"contract", "nsz", "arcp"})
def _margin_chunk(lo_r, hi_r, rows, start, end, p_inst, p_qty, p_cost, tab, spot_row, index,
                  weight, som_rate, conc_rate, conc_liq, basis_rate, mm_ratio, joint,
                  o_equity, o_im, o_mm, o_wu, o_ws, o_wv, o_greeks, o_pnl):
    """Margin accounts ``rows[lo_r:hi_r]`` (positions ``start[a]:end[a]``) serially.

    The per-account body is written out inside the loop on purpose: a numba call per account
    costs more than the arithmetic of a small account (every array argument is reference
    counted), so the unit of work is a chunk of accounts with scratch allocated once.
    ``tab`` is the packed instrument table (see :func:`pack_instruments`): one row per
    instrument holding its risk array and every per-instrument scalar, so a position touches
    one contiguous run of memory instead of a dozen arrays. If ``o_pnl`` has one row per
    account it receives the unweighted scenario P&L (n, n_und, n_scen) for stress reports.
    """
    keep_pnl = o_pnl.shape[0] == rows.shape[0] and o_pnl.shape[1] == weight.shape[0]
    n_und, n_scen = weight.shape
    S = n_scen
    pnl = np.zeros(n_und * n_scen)  # flat: lets the scenario loops vectorise
    som = np.zeros(n_und)
    dpos = np.zeros(n_und)
    lng = np.zeros(n_und)
    sht = np.zeros(n_und)
    touched = np.zeros(n_und, dtype=np.bool_)
    for r in range(lo_r, hi_r):
        a = rows[r]
        for u in range(n_und):
            touched[u] = False
            som[u] = 0.0
            dpos[u] = 0.0
            lng[u] = 0.0
            sht[u] = 0.0
            for s in range(u * n_scen, (u + 1) * n_scen):
                pnl[s] = 0.0
            for g in range(4):
                o_greeks[r, u, g] = 0.0
        equity = 0.0
        for j in range(start[a], end[a]):
            ri = tab[p_inst[j]]
            q = p_qty[j]
            c = p_cost[j]
            k = int(ri[S + _KIND])
            u = int(ri[S + _UND])
            inv = ri[S + _INVERSE] != 0.0
            qe = q
            if k == SPOT and q > 0.0:
                qe = q * (1.0 - ri[S + _HAIRCUT])
            if inv:
                equity += qe * ri[S + _VALUE] - c * index[u]
            else:
                equity += qe * ri[S + _VALUE] - c
            if u < 0:
                continue
            touched[u] = True
            base = u * n_scen
            for s in range(n_scen):
                pnl[base + s] += qe * ri[s]
            if inv and c != 0.0:
                rs_ = tab[spot_row[u]]
                for s in range(n_scen):
                    pnl[base + s] -= c * rs_[s]
            d = qe * ri[S + _DELTA]
            if inv:
                d -= c
            o_greeks[r, u, 0] += d
            o_greeks[r, u, 1] += qe * ri[S + _DELTA + 1]
            o_greeks[r, u, 2] += qe * ri[S + _DELTA + 2]
            o_greeks[r, u, 3] += qe * ri[S + _DELTA + 3]
            if k == SPOT:
                continue
            dpos[u] += d
            if k >= CALL and q < 0.0:
                som[u] -= q * ri[S + _MULT] * index[u] * som_rate[u]
            elif k == PERPETUAL or k == FUTURE:
                nd = q * ri[S + _ND]
                if nd > 0.0:
                    lng[u] += nd
                else:
                    sht[u] -= nd
        im = 0.0
        mm = 0.0
        worst_u = -1
        worst_s = -1
        worst_v = 0.0
        if joint:
            scan_worst = 0.0
            for s in range(n_scen):
                tot = 0.0
                for u in range(n_und):
                    if touched[u]:
                        tot += pnl[u * n_scen + s] * weight[u, s]
                if tot < scan_worst:
                    scan_worst = tot
                    worst_s = s
            som_tot = 0.0
            addon = 0.0
            ratio_sum = 0.0
            n_t = 0
            for u in range(n_und):
                if not touched[u]:
                    continue
                n_t += 1
                som_tot += som[u]
                notional = abs(dpos[u]) * index[u]
                addon += conc_rate[u] * notional * math.sqrt(notional / conc_liq[u])
                addon += basis_rate[u] * index[u] * min(lng[u], sht[u])
                ratio_sum += mm_ratio[u]
            im = max(-scan_worst, som_tot) + addon
            worst_v = scan_worst
            mm = im * (ratio_sum / n_t if n_t > 0 else 1.0)
        else:
            worst_scan = -1.0
            for u in range(n_und):
                if not touched[u]:
                    continue
                w = 0.0
                ws = -1
                for s in range(n_scen):
                    v = pnl[u * n_scen + s] * weight[u, s]
                    if v < w:
                        w = v
                        ws = s
                scan = -w
                notional = abs(dpos[u]) * index[u]
                im_u = max(scan, som[u])
                im_u += conc_rate[u] * notional * math.sqrt(notional / conc_liq[u])
                im_u += basis_rate[u] * index[u] * min(lng[u], sht[u])
                im += im_u
                mm += im_u * mm_ratio[u]
                if scan > worst_scan:
                    worst_scan = scan
                    worst_u = u
                    worst_s = ws
                    worst_v = w
        if keep_pnl:
            for u in range(n_und):
                for s in range(n_scen):
                    o_pnl[r, u, s] = pnl[u * n_scen + s]
        o_equity[r] = equity
        o_im[r] = im
        o_mm[r] = mm
        o_wu[r] = worst_u
        o_ws[r] = worst_s
        o_wv[r] = worst_v


@nb.njit(cache=True, nogil=True, parallel=True)
def margin_rows(rows, start, end, p_inst, p_qty, p_cost, tab, spot_row, index, weight,
                som_rate, conc_rate, conc_liq, basis_rate, mm_ratio, joint, n_chunks,
                o_equity, o_im, o_mm, o_wu, o_ws, o_wv, o_greeks, o_pnl):
    """Margin accounts ``rows`` in ``n_chunks`` parallel chunks; outputs aligned with rows."""
    n = rows.shape[0]
    for ch in nb.prange(n_chunks):
        _margin_chunk(ch * n // n_chunks, (ch + 1) * n // n_chunks, rows, start, end, p_inst,
                      p_qty, p_cost, tab, spot_row, index, weight, som_rate, conc_rate,
                      conc_liq, basis_rate, mm_ratio, joint, o_equity, o_im, o_mm, o_wu, o_ws,
                      o_wv, o_greeks, o_pnl)


def margin_rows_serial(rows, start, end, p_inst, p_qty, p_cost, tab, spot_row, index, weight,
                       som_rate, conc_rate, conc_liq, basis_rate, mm_ratio, joint, n_chunks,
                       o_equity, o_im, o_mm, o_wu, o_ws, o_wv, o_greeks, o_pnl):
    """The same chunk routine on the calling thread (one trade: no thread start-up cost)."""
    _margin_chunk(0, rows.shape[0], rows, start, end, p_inst, p_qty, p_cost, tab, spot_row,
                  index, weight, som_rate, conc_rate, conc_liq, basis_rate, mm_ratio, joint,
                  o_equity, o_im, o_mm, o_wu, o_ws, o_wv, o_greeks, o_pnl)


@dataclass(frozen=True, eq=False)
class MarginResult:
    """Margin of a set of accounts (arrays aligned with ``rows``).

    ``greeks`` is (n, n_underlyings, 4): delta (underlying units), gamma (per USD), vega (USD per
    1.00 vol) and theta (USD per year). ``worst_*`` name the scenario that sets the largest scan
    risk (underlying index and scenario index, -1 if none) and its weighted P&L.
    """

    rows: np.ndarray
    equity: np.ndarray
    im: np.ndarray
    mm: np.ndarray
    worst_underlying: np.ndarray
    worst_scenario: np.ndarray
    worst_pnl: np.ndarray
    greeks: np.ndarray
    scenario_pnl: np.ndarray | None = None  # (n, n_und, n_scen) when requested

    def take(self, idx: np.ndarray) -> "MarginResult":
        """The results of ``idx`` (indices into the arrays) only."""
        return MarginResult(self.rows[idx], self.equity[idx], self.im[idx], self.mm[idx],
                            self.worst_underlying[idx], self.worst_scenario[idx],
                            self.worst_pnl[idx], self.greeks[idx],
                            None if self.scenario_pnl is None else self.scenario_pnl[idx])

    @property
    def shortfall(self) -> np.ndarray:
        """Amount to deposit to get back to IM."""
        return np.maximum(self.im - self.equity, 0.0)

    @property
    def margin_ratio(self) -> np.ndarray:
        """MM / equity (Deribit's maintenance margin ratio): >= 1 means liquidation. Accounts
        with no positive equity but margin requirement report 1e6 (documented cap)."""
        with np.errstate(divide="ignore", invalid="ignore"):
            r = np.where(self.equity > 0, self.mm / np.where(self.equity > 0, self.equity, 1), 1e6)
        return np.where((self.mm == 0) & (self.equity > 0), 0.0, np.minimum(r, 1e6))


def run_margin(rows, start, end, p_inst, p_qty, p_cost, universe_arrays, rs: RiskSet,
               parallel: bool | None = None, out_rows=None,
               scenario_pnl: bool = False) -> MarginResult:
    """Margin accounts ``rows`` of a CSR book against a RiskSet. ``out_rows`` (default
    ``rows``) is what the result reports as its rows."""
    rows = np.ascontiguousarray(rows, dtype=np.int64)
    n = rows.shape[0]
    n_und = rs.weight.shape[0]
    out = (np.empty(n), np.empty(n), np.empty(n), np.empty(n, dtype=np.int64),
           np.empty(n, dtype=np.int64), np.empty(n), np.zeros((n, max(n_und, 1), 4)))
    weight = rs.weight if n_und else np.ones((1, rs.risk.shape[1]))
    ua = universe_arrays
    if parallel is None:
        parallel = n >= _PARALLEL_MIN
    n_chunks = max(1, min(n, nb.get_num_threads() * 8))
    tab = rs.packed(ua)
    o_pnl = np.zeros((n, weight.shape[0], weight.shape[1]) if scenario_pnl else (0, 0, 0))
    args = (rows, start, end, p_inst, p_qty, p_cost, tab, ua.spot_row, _pad(rs.index, n_und),
            weight, _pad(rs.short_option_min, n_und), _pad(rs.concentration_rate, n_und),
            _pad(rs.concentration_liquidity, n_und, 1.0), _pad(rs.basis_rate, n_und),
            _pad(rs.mm_ratio, n_und, 1.0), rs.joint, n_chunks, *out, o_pnl)
    if parallel:
        with _PARALLEL_LOCK:
            margin_rows(*args)
    else:
        margin_rows_serial(*args)
    return MarginResult(rows if out_rows is None else np.asarray(out_rows), *out,
                        o_pnl if scenario_pnl else None)


def _pad(a, n_und, fill=0.0):
    return a if n_und else np.full(1, fill)
