"""`riskpipe demo`: the whole pipeline through a simulated flash crash, on the embedded defaults.

Starts the local Kafka broker (ops/kafka) unless one is already running, creates a fresh set of
topics for the run, starts a worker process, publishes the scenario while showing a live view
(events processed, accounts per state, margin calls as they stream), waits for the worker to
drain, stops it, and prints a summary queried from ClickHouse. The data stays in the embedded
store for `riskpipe sql`.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter, deque
from datetime import datetime, timezone
from pathlib import Path

from rich.console import Console, Group
from rich.live import Live
from rich.panel import Panel
from rich.table import Table

from .settings import REPO, Settings

STATES = ("HEALTHY", "WARNING", "MARGIN_CALL", "LIQUIDATION")
COLORS = {"HEALTHY": "green", "WARNING": "yellow", "MARGIN_CALL": "dark_orange",
          "LIQUIDATION": "red"}


def kafka(cmd: str, port: int | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    if port:
        env["KAFKA_PORT"] = str(port)
    return subprocess.run([str(REPO / "ops" / "kafka"), cmd], env=env, capture_output=True,
                          text=True)


class EventWatcher(threading.Thread):
    """Follows margin-calls and keeps the latest state per account for the live view."""

    def __init__(self, settings: Settings):
        super().__init__(daemon=True)
        from confluent_kafka import Consumer
        from schemas import Codec
        self.c = Consumer({**settings.kafka_conf(), "group.id": f"demo-view-{os.getpid()}",
                           "auto.offset.reset": "earliest", "enable.auto.commit": False})
        self.c.subscribe([settings.topic("margin-calls")])
        self.codec = Codec()
        self.state: dict[str, str] = {}
        self.recent: deque = deque(maxlen=8)
        self.count = 0
        self.ids: set[str] = set()
        self.duplicates = 0
        self.last_event = time.monotonic()
        self.stop = threading.Event()

    def run(self):
        while not self.stop.is_set():
            m = self.c.poll(0.2)
            if m is None or m.error():
                continue
            _, e = self.codec.decode(m.value())
            if e["event_id"] in self.ids:
                self.duplicates += 1
                continue
            self.ids.add(e["event_id"])
            self.count += 1
            self.state[e["account"]] = e["state"]
            self.recent.appendleft(e)
            self.last_event = time.monotonic()
        self.c.close()


def _view(sim, watcher, worker_metrics, t0):
    by = Counter(watcher.state.values())
    healthy = sim.n - sum(by[s] for s in STATES[1:])
    t = Table.grid(padding=(0, 3))
    t.add_row("[b]phase[/b]", sim.phase, "[b]elapsed[/b]", f"{time.monotonic() - t0:5.0f} s")
    t.add_row("[b]BTC index[/b]", f"{sim.market.spot['BTC']:,.0f}", "[b]ETH index[/b]",
              f"{sim.market.spot['ETH']:,.0f}")
    pub = sim.published
    t.add_row("[b]published[/b]", f"{pub['quotes']:,} quotes  {pub['trades']:,} trades  "
              f"{pub['collateral']:,} collateral", "[b]margin events[/b]", f"{watcher.count:,}")
    t.add_row("[b]worker[/b]", worker_metrics(), "", "")
    states = Table("state", "accounts", box=None)
    for s in STATES:
        n = healthy if s == "HEALTHY" else by[s]
        states.add_row(f"[{COLORS[s]}]{s}[/{COLORS[s]}]", f"{n:,}")
    ev = Table("event id", "transition", "trigger", "equity", "MM", "shortfall", box=None)
    for e in list(watcher.recent):
        ev.add_row(e["event_id"], f"{e['prev_state']} -> [{COLORS[e['state']]}]{e['state']}"
                   f"[/{COLORS[e['state']]}]", e["trigger"], f"{e['equity']:,.0f}",
                   f"{e['mm']:,.0f}", f"{e['shortfall']:,.0f}")
    return Panel(Group(t, states, ev), title="riskpipe demo: flash crash")


def run_demo(accounts: int = 2000, duration_s: float = 120.0, seed: int = 7,
             scenario: str = "flash-crash", port: int = 9092, keep_kafka: bool = False) -> int:
    console = Console()
    started_kafka = False
    st = kafka("status", port)
    if st.returncode != 0:
        console.print(f"starting local Apache Kafka on 127.0.0.1:{port} (ops/kafka up) ...")
        up = kafka("up", port)
        if up.returncode != 0:
            console.print(f"[red]Kafka failed to start[/red]\n{up.stderr}")
            return 1
        started_kafka = True
    run_id = datetime.now(timezone.utc).strftime("%Y%m%d%H%M%S")
    base = Settings(kafka_bootstrap=f"127.0.0.1:{port}")
    s = Settings(kafka_bootstrap=f"127.0.0.1:{port}", topic_prefix=f"demo{run_id}.",
                 app_id=f"riskpipe-demo-{run_id}", data_dir=base.data_dir,
                 clickhouse_dsn=base.clickhouse_dsn, web_port=6066)
    from .store import open_store
    from .topics import create_topics
    create_topics(s)
    with open_store(s) as stx:
        stx.migrate()
        for t in ("risk_snapshots", "margin_events", "exposures", "account_latest",
                  "exposure_latest", "stress"):
            stx.client.command(f"TRUNCATE TABLE IF EXISTS {stx.db}.{t}")
    log_path = Path(s.data_dir) / f"demo-worker-{run_id}.log"
    env = dict(os.environ, RISKPIPE_KAFKA_BOOTSTRAP=s.kafka_bootstrap,
               RISKPIPE_TOPIC_PREFIX=s.topic_prefix, RISKPIPE_APP_ID=s.app_id,
               RISKPIPE_CLICKHOUSE_DSN=s.clickhouse_dsn, RISKPIPE_WEB_PORT="6066",
               RISKPIPE_SNAPSHOT_INTERVAL_MS="2000")
    from .publish import Publisher
    from .simulator import Simulator
    pub = Publisher(s)
    sim = Simulator(pub, accounts=accounts, seed=seed, scenario=scenario,
                    duration_s=duration_s)
    console.print(f"run {run_id}: topics {s.topic_prefix}*, worker log {log_path}")
    console.print(f"publishing {len(sim.instruments)} instruments and {accounts:,} accounts ...")
    sim.setup()
    with open(log_path, "ab") as logf:
        worker = subprocess.Popen([sys.executable, "-m", "streams.cli", "worker"], cwd=REPO,
                                  env=env, stdout=logf, stderr=subprocess.STDOUT)
    watcher = EventWatcher(s)
    watcher.start()
    rc = 0

    def worker_metrics():
        try:
            import urllib.request
            with urllib.request.urlopen("http://127.0.0.1:6066/metrics", timeout=0.3) as r:
                text = r.read().decode()
            vals = dict(line.rsplit(" ", 1) for line in text.splitlines()
                        if line and not line.startswith("#") and "{" not in line)
            return (f"{int(float(vals.get('riskpipe_events_in_total', 0))):,} events in, "
                    f"{int(float(vals.get('riskpipe_market_ticks_total', 0))):,} market ticks")
        except Exception:  # noqa: BLE001 - the view is best effort
            return "starting ..." if worker.poll() is None else f"exited {worker.returncode}"

    t0 = time.monotonic()
    try:
        with Live(_view(sim, watcher, worker_metrics, t0), console=console,
                  refresh_per_second=4) as live:
            sim.run(progress=lambda _s: live.update(_view(sim, watcher, worker_metrics, t0)))
            # drain: wait until the worker has been quiet for a few seconds
            deadline = time.monotonic() + 90
            while time.monotonic() < deadline and worker.poll() is None:
                live.update(_view(sim, watcher, worker_metrics, t0))
                if time.monotonic() - watcher.last_event > 8 and _lag(s) == 0:
                    break
                time.sleep(0.5)
        if worker.poll() is not None:
            console.print(f"[red]worker exited with {worker.returncode}; see {log_path}[/red]")
            rc = 1
    finally:
        watcher.stop.set()
        if worker.poll() is None:
            worker.send_signal(signal.SIGTERM)
            try:
                worker.wait(60)
            except subprocess.TimeoutExpired:
                worker.kill()
        if started_kafka and not keep_kafka:
            # release the publisher first: a live client would keep reconnecting (and
            # logging) after the broker is gone
            pub.flush(10)
            del sim, pub
            import gc
            gc.collect()
            kafka("down", port)
    console.print(f"margin events: {watcher.count:,} (duplicates seen by id: "
                  f"{watcher.duplicates})")
    _summary(console, s)
    console.print("\nthe data stays in the embedded store; try:\n"
                  "  riskpipe sql --named top-shortfalls\n"
                  "  riskpipe sql \"SELECT state, count() FROM riskpipe.account_latest FINAL "
                  "GROUP BY state\"")
    return rc


def _lag(s: Settings) -> int:
    """Total consumer lag of the worker's group on the input topics (-1 if unknown)."""
    try:
        from confluent_kafka import Consumer, TopicPartition
        c = Consumer({**s.kafka_conf(), "group.id": s.app_id, "enable.auto.commit": False})
        tps = [TopicPartition(s.topic(t), p) for t in ("trades", "collateral")
               for p in range(s.partitions)]
        committed = c.committed(tps, timeout=5)
        lag = 0
        for tp in committed:
            lo, hi = c.get_watermark_offsets(tp, timeout=5)
            lag += hi - (tp.offset if tp.offset >= 0 else lo)
        c.close()
        return lag
    except Exception:  # noqa: BLE001
        return -1


def _summary(console: Console, s: Settings) -> None:
    from .store import open_store
    with open_store(s) as st:
        for name, title in (("states", "accounts per state"),
                            ("top-shortfalls", "top shortfalls"),
                            ("stress", "exchange-wide stress (worst scenarios)"),
                            ("exposure", "net exposure by underlying")):
            r = st.named(name, limit=8)
            t = Table(*r.column_names, title=title)
            for row in r.result_rows:
                t.add_row(*[f"{v:,.2f}" if isinstance(v, float) else str(v) for v in row])
            console.print(t)
