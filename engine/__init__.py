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
    "MarginState", "classify",
]
