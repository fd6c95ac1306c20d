"""The ``riskpipe`` command line.

User mistakes (bad arguments, a broker that is not running, a bad DSN) end with one clear line
on stderr and a non-zero exit code, never a traceback; ``RISKPIPE_DEBUG=1`` shows tracebacks.
"""
from __future__ import annotations

import json
import os
import sys

import typer

app = typer.Typer(help="riskpipe: streaming portfolio margin for crypto derivatives.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
bench_app = typer.Typer(help="Benchmarks (JSON on stdout).", no_args_is_help=True)
app.add_typer(bench_app, name="bench")


class UserError(Exception):
    """An error caused by input or environment, reported as one line."""


@bench_app.command("kernel")
def bench_kernel(options: int = typer.Option(20_000, help="options for the risk-array run"),
                 accounts: int = typer.Option(100_000, help="accounts for the re-margin run"),
                 positions: int = typer.Option(20, help="positions per account"),
                 repeat: int = typer.Option(5, help="repetitions (best time is reported)")):
    """Engine kernels vs a numpy/scipy implementation of the same math, in one run."""
    from .bench_kernel import run
    typer.echo(json.dumps(run(options, accounts, positions, repeat), indent=2))


@bench_app.command("pipeline")
def bench_pipeline(events: int = typer.Option(200_000, help="input events for throughput"),
                   accounts: int = typer.Option(20_000, help="accounts in the workload"),
                   latency_rate: int = typer.Option(10_000, help="events/s for latency"),
                   latency_seconds: int = typer.Option(10),
                   port: int = typer.Option(39092, help="local Kafka port for the run"),
                   baseline_events: int = typer.Option(30_000, help="events for the naive "
                                                       "per-event baseline"),
                   sink_process: bool = typer.Option(True, help="ClickHouse sink in its own "
                                                     "process (roles margin + sink); "
                                                     "--no-sink-process: one process"),
                   quote_share: float = typer.Option(0.02, help="share of quotes among the "
                                                     "input events"),
                   latency_warmup_seconds: int = typer.Option(
                       10, help="seconds of the latency load run first and reported apart "
                                "(latency_warmup), so the latency figures are a warm worker's "
                                "and broker's")):
    """Worker throughput, latency and fan-out through the real broker vs a naive agent."""
    from .bench_pipeline import run
    typer.echo(json.dumps(run(events, accounts, latency_rate, latency_seconds, port,
                              baseline_events, sink_process, quote_share,
                              latency_warmup_seconds), indent=2))


def _settings(**overrides):
    from pydantic import ValidationError
    from .settings import load_settings
    try:
        return load_settings(**overrides)
    except ValidationError as e:
        parts = [f"RISKPIPE_{'_'.join(map(str, err['loc'])).upper()}: {err['msg']}"
                 f" (got {err.get('input')!r})" for err in e.errors()]
        raise UserError("invalid setting " + "; ".join(parts)) from None
    except ValueError as e:
        raise UserError(str(e).splitlines()[0]) from None


def _logging(level: str = "INFO"):
    import logging
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")


@app.command()
def init():
    """Create the topics (idempotent) and apply the ClickHouse migrations."""
    _logging()
    from .topics import create_topics
    s = _settings()
    for name, state in create_topics(s).items():
        typer.echo(f"topic {name}: {state}")
    from .store import open_store
    with open_store(s) as st:
        for m in st.migrate():
            typer.echo(f"clickhouse migration {m}")


@app.command()
def worker(loglevel: str = typer.Option("info", help="log level"),
           role: str = typer.Option("", help="all (default), margin or sink; overrides "
                                    "RISKPIPE_ROLE. margin + sink processes keep the "
                                    "ClickHouse inserts off the account path's interpreter")):
    """Run a margin worker (Faust) until interrupted."""
    s = _settings(**({"role": role} if role else {}))
    use_event_loop(s.event_loop)
    from .topics import create_topics
    create_topics(s)
    from .app import create_app
    from .store import make_sink
    pipe = create_app(s, sink=None if s.role == "margin" else make_sink(s))
    from faust import Worker
    import engine
    if s.role != "sink":
        engine.warm_up()  # kernels loaded before the first live event, not during it
    elif s.sink_nice:
        import os
        os.nice(s.sink_nice)  # analytics ingestion yields the CPU to margin on a shared host
    _tune_gc()
    Worker(pipe.app, loglevel=loglevel, redirect_stdouts=False).execute_from_commandline()


def use_event_loop(name: str) -> None:
    """Make ``name`` the event loop of every loop created from here on, before the app
    exists: the worker's own and the one Faust's consumer thread creates for the Kafka
    client.

    Why uvloop: it was chosen while Faust replayed the table's changelog one record at a time,
    mostly the event loop's own work (a task step, futures and a timer per record): the
    bench's restart replayed its ~260,000 records in 19.8-21.0 s on uvloop (four runs) against
    24.0-30.5 s on asyncio's loop (sixteen). That replay now goes in bulk
    (``streams.feed.replay_changelog``: 0.4-0.6 s in the bench); the latency and
    throughput phases never separated the two loops (docs/benchmarks.md). uvloop stays the
    default as the loop the tests and benches run on."""
    if name == "uvloop":
        import asyncio

        import uvloop
        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def _tune_gc() -> None:
    """A worker holds millions of long-lived objects (account state, the table, compiled
    kernels): move what exists after start-up out of the collector's sight and collect the
    young generation less often. Full collections over that heap otherwise stall the event
    loop for tens of milliseconds each (``riskpipe_gc_seconds_total`` in /metrics)."""
    import gc
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 20)


@app.command()
def sql(query: str = typer.Argument("", help="SQL, or empty with --named"),
        named: str = typer.Option("", help="a named query: " + ", ".join(
            ["latest", "top-shortfalls", "closest-to-liquidation", "history", "exposure",
             "stress", "states"])),
        account: str = typer.Option("", help="account for --named history"),
        limit: int = typer.Option(20, help="row limit of named queries"),
        fmt: str = typer.Option("table", "--format", help="table, csv or json"),
        worker: str = typer.Option("", help="query a running worker's read-only SQL endpoint, "
                                   "e.g. http://127.0.0.1:6066")):
    """Query the results store (ClickHouse) with SQL or a named query."""
    from .store import NAMED_QUERIES, DB, open_store
    if fmt not in ("table", "csv", "json"):
        raise UserError("--format must be table, csv or json")
    if not query and not named:
        lines = [f"  {k:24} {v[0]}" for k, v in NAMED_QUERIES.items()]
        raise UserError("give a SQL query or --named NAME; named queries:\n" + "\n".join(lines))
    if named and named not in NAMED_QUERIES:
        raise UserError(f"unknown named query {named!r}; known: {', '.join(NAMED_QUERIES)}")
    if worker:
        import urllib.parse
        import urllib.request
        if named:
            query = NAMED_QUERIES[named][1].replace("{db}", DB).replace("{limit}", str(limit))
            query = query.replace("{account:String}", "'" + account.replace("'", "''") + "'")
        try:
            with urllib.request.urlopen(f"{worker.rstrip('/')}/sql?q=" +
                                        urllib.parse.quote(query), timeout=30) as r:
                data = json.loads(r.read())
        except Exception as e:  # noqa: BLE001
            raise UserError(f"worker endpoint {worker}: {e}") from None
        columns, rows = data["columns"], data["rows"]
    else:
        s = _settings()
        try:
            with open_store(s) as st:
                st.migrate()
                res = st.named(named, limit, account) if named else st.query(query)
                columns, rows = list(res.column_names), [list(r) for r in res.result_rows]
        except Exception as e:  # noqa: BLE001
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            if "lock" in msg.lower() or "already" in msg.lower():
                msg += " (a worker holds the embedded store: use --worker URL)"
            raise UserError(f"query failed on {s.clickhouse_dsn_redacted}: {msg}") from None
    _print_rows(columns, rows, fmt)


def _print_rows(columns, rows, fmt):
    from datetime import datetime
    def cell(v):
        return v.isoformat() if isinstance(v, datetime) else v
    if fmt == "json":
        typer.echo(json.dumps([dict(zip(columns, map(cell, r))) for r in rows], indent=1,
                              default=str))
    elif fmt == "csv":
        import csv
        w = csv.writer(sys.stdout)
        w.writerow(columns)
        w.writerows([[cell(v) for v in r] for r in rows])
    else:
        from rich.console import Console
        from rich.table import Table
        t = Table(*columns)
        for r in rows:
            t.add_row(*[f"{v:,.2f}" if isinstance(v, float) else str(cell(v)) for v in r])
        Console().print(t)


@app.command()
def demo(accounts: int = typer.Option(2000, help="simulated accounts"),
         duration: float = typer.Option(120.0, help="seconds of simulated market"),
         seed: int = typer.Option(7, help="random seed (the run is deterministic for a seed)"),
         scenario: str = typer.Option("flash-crash", help="calm, flash-crash or vol-spike"),
         port: int = typer.Option(9092, help="local Kafka port")):
    """Run the whole pipeline through a simulated market scenario with a live view."""
    from .demo import run_demo
    raise typer.Exit(run_demo(accounts, duration, seed, scenario, port))


@app.command()
def simulate(accounts: int = typer.Option(2000), duration: float = typer.Option(120.0),
             seed: int = typer.Option(7), scenario: str = typer.Option("flash-crash"),
             trade_rate: float = typer.Option(200.0, help="random trades per second")):
    """Publish a simulated exchange (instruments, accounts, market) to the configured Kafka."""
    from .publish import Publisher
    from .simulator import SCENARIOS, Simulator
    if scenario not in SCENARIOS:
        raise UserError(f"unknown scenario {scenario!r}; choose from {', '.join(SCENARIOS)}")
    s = _settings()
    from .topics import create_topics
    create_topics(s)
    sim = Simulator(Publisher(s), accounts, seed, scenario, duration, trade_rate=trade_rate)
    sim.setup()
    sim.run()
    typer.echo(json.dumps(sim.published))


@app.command()
def kafka(action: str = typer.Argument(..., help="up, down, status or reset")):
    """Start / stop the local single-node Apache Kafka broker (ops/kafka)."""
    import subprocess
    from .settings import REPO
    if action not in ("up", "down", "status", "reset", "fetch"):
        raise UserError("action must be up, down, status, reset or fetch")
    raise typer.Exit(subprocess.call([str(REPO / "ops" / "kafka"), action]))


@app.command()
def tail(account: str = typer.Option("", help="only this account"),
         state: str = typer.Option("", help="only transitions into this state"),
         from_beginning: bool = typer.Option(False, help="replay the topic from the start")):
    """Follow margin events live in the terminal."""
    from confluent_kafka import Consumer
    from schemas import Codec
    s = _settings()
    c = Consumer({**s.kafka_conf(), "group.id": f"riskpipe-tail-{os.getpid()}",
                  "auto.offset.reset": "earliest" if from_beginning else "latest",
                  "enable.auto.commit": False})
    c.subscribe([s.topic("margin-calls")])
    codec = Codec()
    try:
        while True:
            m = c.poll(0.5)
            if m is None or m.error():
                continue
            _, e = codec.decode(m.value())
            if (account and e["account"] != account) or (state and e["state"] != state):
                continue
            plan = "; ".join(f"{p['instrument']} {p['quantity']:+g}"
                             for p in e["liquidation_plan"])
            typer.echo(f"{e['ts']:%H:%M:%S} {e['event_id']:<20} {e['prev_state']:>11} -> "
                       f"{e['state']:<11} {e['trigger']:<10} equity {e['equity']:>14,.2f} "
                       f"MM {e['mm']:>14,.2f} shortfall {e['shortfall']:>12,.2f}"
                       + (f"  plan: {plan}" if plan else ""))
    except KeyboardInterrupt:
        pass
    finally:
        c.close()


@app.command()
def whatif(account: str = typer.Argument(..., help="account id"),
           trades: list[str] = typer.Argument(..., help="INSTRUMENT:QTY:PRICE, e.g. "
                                              "BTC-PERP:-0.5:60000")):
    """Pre-trade check: margin of an account before and after hypothetical trades."""
    parsed = []
    for t in trades:
        try:
            inst, qty, price = t.rsplit(":", 2)
            parsed.append((inst, float(qty), float(price)))
        except ValueError:
            raise UserError(f"bad trade {t!r}: expected INSTRUMENT:QTY:PRICE") from None
    from .whatif import what_if
    try:
        res = what_if(_settings(), account, parsed)
    except ValueError as e:
        raise UserError(str(e)) from None
    typer.echo(json.dumps(res, indent=2))


def main() -> None:
    try:
        app()
    except UserError as e:
        typer.echo(f"riskpipe: {e}", err=True)
        sys.exit(2)
    except Exception as e:  # noqa: BLE001 - last-resort one-line report
        if os.environ.get("RISKPIPE_DEBUG"):
            raise
        from engine import EngineError
        code = 2 if isinstance(e, EngineError) else 1
        typer.echo(f"riskpipe: {type(e).__name__}: {e}", err=True)
        sys.exit(code)


if __name__ == "__main__":
    main()
