"""Typed publishing of riskpipe input records (used by the simulator, tests and tools).

Uses the murmur2 partitioner, the same as the Java client and Faust/aiokafka, so an account's
trades, collateral changes, table changelog and margin events all share one partition number.
"""
from __future__ import annotations

from datetime import datetime, timezone

from confluent_kafka import Producer

from schemas import Codec

from .settings import Settings


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class Publisher:
    def __init__(self, settings: Settings, codec: Codec | None = None, **conf):
        self.s = settings
        self.codec = codec or Codec()
        self.producer = Producer({**settings.kafka_conf(), "partitioner": "murmur2_random",
                                  "linger.ms": 5, "acks": "all", "enable.idempotence": True,
                                  "compression.type": "lz4", **conf})

    def raw(self, topic: str, key: bytes | None, value: bytes) -> None:
        while True:
            try:
                self.producer.produce(self.s.topic(topic), key=key, value=value)
                break
            except BufferError:
                self.producer.poll(0.05)
        self.producer.poll(0)

    def record(self, topic: str, name: str, key: str, rec: dict) -> None:
        self.raw(topic, key.encode(), self.codec.encode(name, rec))

    def instrument(self, id, kind, underlying, settlement="LINEAR", multiplier=1.0, strike=None,
                   expiry=None, lot_size=0.0, ts=None):
        self.record("instruments", "Instrument", id, dict(
            id=id, kind=kind, underlying=underlying, settlement=settlement,
            multiplier=multiplier, strike=strike, expiry=expiry, lot_size=lot_size,
            ts=ts or utcnow()))

    def quote(self, instrument, mark, index_price, mark_iv=None, bid=None, ask=None, ts=None):
        self.record("quotes", "Quote", instrument, dict(
            instrument=instrument, mark=mark, bid=bid, ask=ask, index_price=index_price,
            mark_iv=mark_iv, ts=ts or utcnow()))

    def trade(self, trade_id, account, instrument, quantity, price, fee=0.0, ts=None):
        self.record("trades", "Trade", account, dict(
            trade_id=trade_id, account=account, instrument=instrument, quantity=quantity,
            price=price, fee=fee, ts=ts or utcnow()))

    def collateral(self, change_id, account, asset, amount, kind="DEPOSIT", ts=None):
        self.record("collateral", "CollateralChange", account, dict(
            change_id=change_id, account=account, asset=asset, amount=amount, kind=kind,
            ts=ts or utcnow()))

    def risk_params(self, underlying, version, ts=None, **params):
        import engine as E
        d = E.UnderlyingParams()
        rec = dict(underlying=underlying, version=version, scan_range=d.scan_range, grid=d.grid,
                   vol_shock_base=d.vol_shock_base, vol_shock_power=d.vol_shock_power,
                   dte_floor_days=d.dte_floor_days, short_option_min=d.short_option_min,
                   concentration_rate=d.concentration_rate,
                   concentration_liquidity=d.concentration_liquidity, basis_rate=d.basis_rate,
                   mm_ratio=d.mm_ratio, rate=d.rate, haircut=None, ts=ts or utcnow())
        rec.update(params)
        self.record("risk-params", "RiskParams", underlying, rec)

    def flush(self, timeout: float = 30.0) -> None:
        left = self.producer.flush(timeout)
        if left:
            raise RuntimeError(f"{left} records not delivered within {timeout}s")
