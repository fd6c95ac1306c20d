"""riskpipe engine: pure portfolio-margin numerics.

No Kafka, Faust or ClickHouse here: a quant can ``import engine`` in a notebook and margin a
portfolio. Typical use::

    import engine as E
    uni = E.Universe()
    uni.add(E.Instrument("BTC-PERP", E.Kind.PERPETUAL, "BTC", multiplier=1.0))
    mkt = E.Market(uni)
    mkt.set_index("BTC", 60_000); mkt.set_quote("BTC-PERP", 60_010)
    book = E.AccountBook(uni)
    book.apply_collateral("alice", "USD", 10_000)
    book.apply_trade("alice", "BTC-PERP", 1.0, 60_000)
    res = book.margin_account("alice", mkt.risk_set(now_ms))
"""
import os

# The threads of a parallel kernel (numba's OpenMP layer) go to sleep as soon as a call ends.
# GNU OpenMP's default keeps them spinning for 300,000 rounds first, in case another parallel
# region follows at once. Ours come tens of milliseconds apart (a market tick, a large round
# of account events), so the spin only burns a CPU that the event loop, the Kafka clients and
# a broker on the same host are waiting for: measured on a 2-vCPU machine, a parallel call
# followed by 20 ms of idle cost 9.7 ms of CPU with the default and 0.09 ms passive. Set
# before numba loads the OpenMP runtime (it reads the variable once); a value already in the
# environment wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from .book import AccountBook, Position
from .errors import (EngineError, ExpiredInstrument, InvalidParameter, InvalidPrice,
                     InvalidQuantity, InvalidVolatility, MissingMarketData, UnknownInstrument)
from .instruments import MAX_ABS_QUANTITY, Instrument, Kind, Settlement, Universe
from .liquidation import LiquidationPlan, MarginSummary, liquidation_plan, what_if
from .margin import MarginResult, run_margin
from .market import Market, RiskSet, risk_arrays
from .params import RiskParams, StateThresholds, UnderlyingParams
from .pricing import option_greeks
from .scenarios import ScenarioGrid, deribit, preset, span16
from .states import MarginState, classify

__all__ = [
    "AccountBook", "Position", "EngineError", "ExpiredInstrument", "InvalidParameter",
    "InvalidPrice", "InvalidQuantity", "InvalidVolatility", "MissingMarketData",
    "UnknownInstrument", "MAX_ABS_QUANTITY", "Instrument", "Kind", "Settlement", "Universe",
    "LiquidationPlan", "MarginSummary", "liquidation_plan", "what_if", "MarginResult",
    "run_margin", "Market", "RiskSet", "risk_arrays", "RiskParams", "StateThresholds",
    "UnderlyingParams", "option_greeks", "ScenarioGrid", "deribit", "preset", "span16",
    "MarginState", "classify", "warm_up",
]


def warm_up() -> None:
    """Load (or compile) every kernel variant once, on a two-instrument book: serial and
    parallel margin, with and without scenario P&L, the risk arrays and the batches of fills
    and of balance changes.
    Numba loads each compiled variant from its cache on first call (a few hundred ms); a
    long-running process calls this at start so its first live events do not pay for it."""
    import numpy as np
    now_ms = 1_900_000_000_000
    uni = Universe()
    uni.add(Instrument("W-PERP", Kind.PERPETUAL, "W", multiplier=1.0))
    uni.add(Instrument("W-C", Kind.CALL, "W", multiplier=1.0, strike=100.0,
                       expiry_ms=now_ms + 30 * 86_400_000))
    mkt = Market(uni)
    mkt.set_index("W", 100.0)
    mkt.set_quote("W-PERP", 100.0)
    mkt.set_quote("W-C", 5.0, iv=0.5)
    book = AccountBook(uni)
    for k in range(300):  # enough rows for the parallel variant
        book.apply_collateral(f"a{k}", "USD", 1_000.0)
        book.apply_trade(f"a{k}", "W-PERP" if k % 2 else "W-C", 1.0, 100.0)
    book.apply_trades([(f"a{k}", "W-PERP", -1.0, 101.0, 0.1) for k in range(300)])
    book.apply_collaterals([(f"a{k}", "USD", 1.0) for k in range(300)])
    rs = mkt.risk_set(now_ms)
    rows = np.arange(len(book.ids), dtype=np.int64)
    for parallel in (False, True):
        for pnl in (False, True):
            book.margin(rs, rows, parallel=parallel, scenario_pnl=pnl)
    book.margin(rs, rows[:1])
    book.rows_holding("W")
