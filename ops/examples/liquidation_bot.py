#!/usr/bin/env python3
"""An outsider's liquidation bot: follows riskpipe's margin-calls topic with confluent-kafka and
decodes events using nothing but the published .avsc files (no riskpipe code).

Framing is Avro single-object encoding: C3 01, the 8-byte little-endian CRC-64-AVRO
fingerprint of the writer schema's parsing canonical form, then the Avro binary body.
Events are deduplicated by ``event_id`` (riskpipe delivers at least once; re-deliveries carry
identical content).

    python ops/examples/liquidation_bot.py --bootstrap 127.0.0.1:9092 \
        --topic riskpipe.margin-calls --schemas schemas/
"""
import argparse
import json
import sys
from pathlib import Path

import fastavro
from confluent_kafka import Consumer
from fastavro.schema import fingerprint, to_parsing_canonical_form


def load_writers(schema_dir: Path) -> dict:
    """fingerprint bytes -> parsed schema, for every .avsc (current and released versions)."""
    writers = {}
    for path in sorted(schema_dir.rglob("*.avsc")):
        parsed = fastavro.parse_schema(json.loads(path.read_text()), named_schemas={})
        fp = bytes.fromhex(fingerprint(to_parsing_canonical_form(parsed), "CRC-64-AVRO"))
        writers[fp] = parsed
    return writers


def decode(value: bytes, writers: dict, reader) -> dict:
    if value[:2] != b"\xc3\x01":
        raise ValueError("not Avro single-object encoding")
    writer = writers[value[2:10]]
    import io
    return fastavro.schemaless_reader(io.BytesIO(value[10:]), writer, reader)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bootstrap", default="127.0.0.1:9092")
    ap.add_argument("--topic", default="riskpipe.margin-calls")
    ap.add_argument("--group", default="liquidation-bot")
    ap.add_argument("--schemas", default=str(Path(__file__).resolve().parents[2] / "schemas"))
    ap.add_argument("--exit-after", type=int, default=0, help="stop after N liquidations")
    ap.add_argument("--timeout", type=float, default=0, help="stop after N idle seconds")
    args = ap.parse_args(argv)
    writers = load_writers(Path(args.schemas))
    reader = fastavro.parse_schema(json.loads((Path(args.schemas) / "MarginEvent.avsc")
                                              .read_text()), named_schemas={})
    c = Consumer({"bootstrap.servers": args.bootstrap, "group.id": args.group,
                  "auto.offset.reset": "earliest", "enable.auto.commit": True})
    c.subscribe([args.topic])
    seen, liquidations, idle = set(), 0, 0.0
    try:
        while True:
            m = c.poll(0.5)
            if m is None or m.error():
                idle += 0.5
                if args.timeout and idle >= args.timeout:
                    break
                continue
            idle = 0.0
            e = decode(m.value(), writers, reader)
            if e["event_id"] in seen:
                print(f"duplicate {e['event_id']} ignored", flush=True)
                continue
            seen.add(e["event_id"])
            print(f"{e['event_id']} {e['prev_state']} -> {e['state']} equity={e['equity']:.2f}"
                  f" mm={e['mm']:.2f}", flush=True)
            if e["state"] == "LIQUIDATION":
                for step in e["liquidation_plan"]:
                    side = "BUY" if step["quantity"] > 0 else "SELL"
                    print(f"  LIQUIDATE {e['account']}: {side} {abs(step['quantity']):g} "
                          f"{step['instrument']}", flush=True)
                liquidations += 1
                if args.exit_after and liquidations >= args.exit_after:
                    break
    finally:
        c.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
