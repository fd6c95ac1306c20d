"""`riskpipe bench pipeline`: the worker through the real local broker and the embedded
ClickHouse sink, against a naive per-event Faust agent on the same workload, in one run.

Measured:
* sustained input events/s of one worker (trades + collateral already on the topics, the
  worker started cold; time from its first to its last applied event), and the same for the
  naive agent (the obvious implementation: ``async for event in stream`` -> decode -> apply ->
  margin one account -> table write), with the ratio;
* end-to-end latency percentiles at a fixed input rate: event time (set by the producer) to
  the risk snapshot / margin event appended to its topic (the broker's append time; same
  clock), and the same split at the broker's append of the input record;
* quote fan-out: time to re-margin 100,000 accounts after one underlying moves (risk arrays +
  margin + states + outputs, the code path of a market tick);
* worker memory (RSS) with 100,000 accounts loaded.
"""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np

from . import rowblock
from .settings import REPO, Settings

T0 = datetime.now(timezone.utc).replace(microsecond=0) - timedelta(minutes=5)


def _instruments():
    from .simulator import build_instruments
    return build_instruments(T0)


def _publish_reference(pub, instruments, market_quotes):
    for i in instruments:
        pub.instrument(i.id, i.kind, i.underlying, i.settlement, i.multiplier, i.strike,
                       i.expiry, i.lot_size, ts=T0)
    pub.flush()
    for inst, mark, index, iv in market_quotes:
        pub.quote(inst, mark, index, mark_iv=iv, ts=T0)
    pub.flush()


def _workload(n_events, n_accounts, instruments, quotes, seed=3, event_rate=50_000,
              quote_share=0.0):
    """Pre-encoded (topic, key, value) input records: a deposit per account first, then
    ``quote_share`` quotes (a random derivative's mark, its underlying's index on a small
    random walk) and, of the rest, 85% trades and 15% collateral changes. Event time advances
    as if the records arrived at ``event_rate`` per second, so accounts are due risk snapshots
    (one per ``snapshot_interval_ms``) as they would be live and the sink carries a realistic
    row volume, and quotes move the valuation time with the load."""
    from schemas import Codec
    codec = Codec()
    rng = np.random.default_rng(seed)
    marks = {q[0]: q[1] for q in quotes}
    tradable = [i for i in instruments if i.kind != "SPOT"]
    moves = _quote_moves(instruments, quotes, rng)
    out = []
    ts = T0
    for n in range(n_events):
        ts = T0 + timedelta(seconds=n / event_rate)
        acct = f"acct-{int(rng.integers(n_accounts)):06d}"
        if n < n_accounts:  # everyone deposits first
            acct = f"acct-{n:06d}"
            rec = dict(change_id=f"c{n}", account=acct, asset="USD", amount=1_000_000.0,
                       kind="DEPOSIT", ts=ts)
            out.append(("collateral", acct.encode(), codec.encode("CollateralChange", rec)))
        elif quote_share and rng.random() < quote_share:
            rec = {**next(moves), "ts": ts}
            out.append(("quotes", rec["instrument"].encode(), codec.encode("Quote", rec)))
        elif rng.random() < 0.15:
            rec = dict(change_id=f"c{n}", account=acct, asset="USD",
                       amount=float(rng.choice([1000.0, -500.0])), kind="TRANSFER", ts=ts)
            out.append(("collateral", acct.encode(), codec.encode("CollateralChange", rec)))
        else:
            inst = tradable[int(rng.integers(len(tradable)))]
            q = float(rng.choice([-1, 1]) * (10 if inst.settlement == "INVERSE" and
                                             inst.kind == "PERPETUAL" else 0.1))
            rec = dict(trade_id=f"t{n}", account=acct, instrument=inst.id, quantity=q,
                       price=float(marks[inst.id]), fee=0.0, ts=ts)
            out.append(("trades", acct.encode(), codec.encode("Trade", rec)))
    return out


def _quote_moves(instruments, quotes, rng):
    """Endless Quote records (without ``ts``): a random derivative's mark with its
    underlying's index on a small random walk (perpetuals and futures keep their basis to the
    index; options keep their mark and implied vol)."""
    first = {q[0]: q for q in quotes}
    quoted = [i for i in instruments if i.kind != "SPOT" and i.id in first]
    index0 = {i.underlying: first[i.id][2] for i in quoted}
    index = dict(index0)
    while True:
        inst = quoted[int(rng.integers(len(quoted)))]
        u = inst.underlying
        index[u] *= 1.0 + 2e-4 * float(rng.standard_normal())
        _, mark, _, iv = first[inst.id]
        if inst.kind in ("PERPETUAL", "FUTURE"):
            mark = mark * index[u] / index0[u]
        yield dict(instrument=inst.id, mark=float(mark), bid=None, ask=None,
                   index_price=float(index[u]), mark_iv=iv)


def _produce(settings, records, rate=None):
    from .publish import Publisher
    pub = Publisher(settings)
    t0 = time.perf_counter()
    for n, (topic, key, value) in enumerate(records):
        pub.raw(topic, key, value)
        if rate and n % 200 == 199:
            ahead = t0 + (n + 1) / rate - time.perf_counter()
            if ahead > 0:
                time.sleep(ahead)
    pub.flush(120)


def _scrape(port) -> list[str]:
    """The worker's /metrics lines ([] while it is not answering)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=1) as r:
            return r.read().decode().splitlines()
    except Exception:  # noqa: BLE001
        return []


def _value(lines, name: str) -> float | None:
    """An unlabelled metric's value in a scrape (None if absent)."""
    for line in lines:
        if line.startswith(name + " "):
            return float(line.split()[1])
    return None


def _metric(port, name):
    return _value(_scrape(port), name)


def _int(x):
    return None if x is None else int(x)


def _inputs(port, lines=None):
    """Input events the worker has applied, every topic (trades and collateral once their
    outputs are acknowledged, quotes and reference data once applied); None while it is not
    answering. ``lines``: a scrape already made."""
    lines = _scrape(port) if lines is None else lines
    if not lines:
        return None
    per_topic = [float(line.split()[-1]) for line in lines
                 if line.startswith("riskpipe_input_events_total{")]
    if per_topic:
        return sum(per_topic)
    return _value(lines, "riskpipe_events_in_total") or 0.0


def _gc_seconds(port) -> float:
    """The worker's collector pauses so far (all generations)."""
    return sum(float(line.split()[-1]) for line in _scrape(port)
               if line.startswith("riskpipe_gc_seconds_total{"))


def _buckets(port, name) -> dict[float, float]:
    """Cumulative counts of a histogram on the worker's /metrics, by upper bound (s)."""
    out = {}
    for line in _scrape(port):
        if line.startswith(f"{name}_bucket{{"):
            le = line.split('le="', 1)[1].split('"', 1)[0]
            out[float("inf") if le == "+Inf" else float(le)] = float(line.split()[-1])
    return out


def _bucket_quantiles(before: dict, after: dict) -> dict:
    """Upper bounds (ms) of the buckets holding the p50 and p99 of the observations made
    between two scrapes, and their count."""
    bounds = sorted(after)
    cum = [after[b] - before.get(b, 0.0) for b in bounds]
    n = cum[-1] if cum else 0
    out = {"fetches": int(n)}
    for q in (50, 99):
        b = next((b for b, c in zip(bounds, cum) if n and c >= n * q / 100), None)
        out[f"p{q}_ms_at_most"] = None if b is None or b == float("inf") else round(b * 1000)
    return out


def _sink_rows(port) -> float:
    """Rows the worker's sink has stored so far, all tables."""
    return sum(float(line.split()[1]) for line in _scrape(port)
               if line.startswith("riskpipe_sink_rows_total{"))


def _sink_totals(port) -> tuple[float, float, float]:
    """The sink's inserts, their seconds and the rows they stored so far (all tables)."""
    n = secs = rows = 0.0
    for line in _scrape(port):
        if line.startswith("riskpipe_sink_batch_seconds_count "):
            n = float(line.split()[1])
        elif line.startswith("riskpipe_sink_batch_seconds_sum "):
            secs = float(line.split()[1])
        elif line.startswith("riskpipe_sink_rows_total{"):
            rows += float(line.split()[1])
    return n, secs, rows


def _stages(lines) -> dict[str, float]:
    """The worker's seconds per stage (``riskpipe_stage_seconds_total``) in a scrape."""
    return {line.split('"')[1]: float(line.split()[-1]) for line in lines
            if line.startswith("riskpipe_stage_seconds_total{")}


def _thread_times(pid) -> dict[int, tuple[str, float, float]]:
    """Per thread of ``pid``: (name, seconds on a CPU, seconds waiting for one), from the
    kernel's scheduler statistics."""
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            run_ns, wait_ns = (task / "schedstat").read_text().split()[:2]
            out[int(task.name)] = ((task / "comm").read_text().strip(), int(run_ns) / 1e9,
                                   int(wait_ns) / 1e9)
        except (OSError, ValueError):  # a thread that ended meanwhile
            continue
    return out


def _time_breakdown(pid, first, last) -> dict:
    """Where the worker's time went between two (time, scrape, thread times) snapshots: the
    event loop's thread (the process's main thread: every agent, the account path) on a CPU
    and waiting for one, the other threads (Kafka clients, the tick's kernel) on a CPU, and
    the worker's own stage timers. Why in the bench: it tells a worker short of CPU from one
    waiting for its input or the broker."""
    (t0, lines0, th0), (t1, lines1, th1) = first, last
    window = max(t1 - t0, 1e-9)
    main0, main1 = th0.get(pid, ("", 0.0, 0.0)), th1.get(pid, ("", 0.0, 0.0))
    by_name: dict[str, float] = {}
    for t, v in th1.items():
        if t != pid:
            by_name[v[0]] = by_name.get(v[0], 0.0) + v[1] - th0.get(t, (None, 0.0, 0.0))[1]
    others = sum(by_name.values())
    st0, st1 = _stages(lines0), _stages(lines1)
    units = [_value(lines, "riskpipe_batches_total") or 0.0 for lines in (lines0, lines1)]
    events = [_value(lines, "riskpipe_events_in_total") or 0.0 for lines in (lines0, lines1)]
    return {"window_s": round(window, 3),
            # units of work (the account path's micro-batches) and their events: each unit
            # has a fixed cost, so the events per unit say how much of it the load shares
            "account_units": int(units[1] - units[0]),
            "account_unit_events": int(events[1] - events[0]),
            "event_loop_thread_on_cpu_s": round(main1[1] - main0[1], 3),
            "event_loop_thread_waiting_for_cpu_s": round(main1[2] - main0[2], 3),
            "other_threads_on_cpu_s": round(others, 3),
            # by the threads' kernel names (streams/osthread.py; librdkafka's "rdk:*"); the
            # kernels' OpenMP threads carry the process's name
            "other_threads_by_name": {k: round(v, 3) for k, v in
                                      sorted(by_name.items(), key=lambda kv: -kv[1])},
            "stage_seconds": {k: round(v - st0.get(k, 0.0), 3) for k, v in st1.items()}}


def _own_cpu_seconds() -> float:
    """CPU seconds of this process so far, threads that have ended included."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def _broker_pid(port) -> int | None:
    """The pid of the broker ``ops/kafka`` started on ``port`` (None: none, or another's)."""
    home = Path(os.environ.get("RISKPIPE_HOME") or REPO / ".riskpipe")
    try:
        return int((home / f"kafka-run-{port}" / "kafka.pid").read_text())
    except (OSError, ValueError):
        return None


def _process_times(pid) -> tuple[float, float, float]:
    """(seconds on a CPU, seconds waiting for one, seconds on a CPU of its JIT compiler
    threads) of all of ``pid``'s threads so far; zeros for no process."""
    if pid is None:
        return 0.0, 0.0, 0.0
    try:
        threads = _thread_times(pid).values()
    except OSError:
        return 0.0, 0.0, 0.0
    return (sum(t[1] for t in threads), sum(t[2] for t in threads),
            sum(t[1] for t in threads if "Compiler" in t[0]))


def _broker_jit_seconds(port) -> float | None:
    """CPU seconds the local broker's JIT compiler threads (HotSpot's ``C1``/``C2
    CompilerThread``) have used so far; None without a broker started by ``ops/kafka``.

    Why in the bench: a freshly started broker compiles its hot paths for minutes, and on a
    2-CPU machine those threads take CPU the worker and the broker's own network threads wait
    for (4.1 CPU-seconds in one 17-second latency phase on a broker started a minute before;
    0.6 s on the same broker four minutes later). A latency figure is read together with it."""
    pid = _broker_pid(port)
    if pid is None or not Path(f"/proc/{pid}").exists():
        return None
    return _process_times(pid)[2]


def _ports_free(*ports) -> None:
    """Fail before measuring if a web port the bench's processes use is taken: a worker left
    from another run would answer their metrics (a bench once ran without its sink process,
    which could not bind its port, while a stale one answered for it)."""
    import socket
    for port in ports:
        with socket.socket() as sock:
            # as the workers' web servers bind: connections of earlier runs in TIME_WAIT do not
            # count, a listener does
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                raise RuntimeError(f"port {port} is in use (a worker left from another run?); "
                                   "stop that process first") from None


def _alive(proc, log) -> None:
    """Fail if a process the measurement depends on has exited."""
    if proc is not None and proc.poll() is not None:
        raise RuntimeError(f"process exited during the bench (code {proc.returncode}); see {log}")


def _changelog_records(settings, app_id: str) -> int | None:
    """Records in the accounts table's changelog now (read through: compaction removes
    records from inside the log, so its offsets do not count them): about what a restarted
    worker replays before it is ready. None if the read did not reach every partition's end
    within two minutes (a partial count would understate the replay)."""
    from confluent_kafka import Consumer, KafkaError, TopicPartition
    topic = f"{app_id}-accounts-changelog"
    c = Consumer({**settings.kafka_conf(), "group.id": f"changelog-{uuid.uuid4().hex[:6]}",
                  "enable.auto.commit": False, "enable.partition.eof": True})
    try:
        parts = list(c.list_topics(topic, timeout=10).topics[topic].partitions)
        c.assign([TopicPartition(topic, p, 0) for p in parts])
        n, left, deadline = 0, set(parts), time.time() + 120
        while left and time.time() < deadline:
            for m in c.consume(10_000, timeout=1.0):
                if m.error() is None:
                    n += 1
                elif m.error().code() == KafkaError._PARTITION_EOF:
                    left.discard(m.partition())
        return None if left else n
    finally:
        c.close()


def _rss_kb(pid) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def _start_worker(settings, name, port, naive=False, extra=None):
    env = dict(os.environ, RISKPIPE_KAFKA_BOOTSTRAP=settings.kafka_bootstrap,
               RISKPIPE_TOPIC_PREFIX=settings.topic_prefix,
               RISKPIPE_APP_ID=f"{settings.app_id}-{name}",
               RISKPIPE_DATA_DIR=str(settings.data_dir / name),
               RISKPIPE_CLICKHOUSE_DSN=f"chdb://{settings.data_dir / name / 'clickhouse'}",
               RISKPIPE_WEB_PORT=str(port), **(extra or {}))
    log = open(settings.data_dir / f"{name}.log", "ab")
    cmd = [sys.executable, "-m", "streams.bench_pipeline", "--naive-worker"] if naive else \
        [sys.executable, "-m", "streams.cli", "worker"]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)


def _throughput(settings, name, port, warmup, load, naive=False, timeout=600, extra=None,
                sink_port=None):
    """Start a worker, feed it the deposits (``warmup``) and wait until it has applied them,
    then publish ``load`` as fast as possible and time the worker from its first to its last
    event of the load. Deposits come first because trades and collateral travel on two topics:
    a trade overtaking its account's deposit would put the account through a spurious
    liquidation (and the benchmark would measure liquidation plans, not throughput).
    ``sink_port``: the web port of a separate sink process (else the worker's own sink)."""
    p = _start_worker(settings, name, port, naive=naive, extra=extra)
    sink_port = sink_port or port
    try:
        def count(lines=None):
            if p.poll() is not None:
                raise RuntimeError(f"{name} exited; see {settings.data_dir / (name + '.log')}")
            return _inputs(port, lines)
        deadline = time.time() + timeout
        while time.time() < deadline and count() is None:
            time.sleep(0.2)
        _produce(settings, warmup)
        while time.time() < deadline and (count() or 0) < len(warmup):
            time.sleep(0.05)
        base = count() or 0
        threading.Thread(target=_as_generator, args=(_produce, settings, load),
                         daemon=True).start()
        t_first = t_last = None
        seen = base
        rss = 0
        target = base + len(load)
        snap_first = snap_last = None  # (time, scrape, thread times): see _time_breakdown
        while time.time() < deadline:
            lines = _scrape(port)
            v = count(lines)
            now = time.perf_counter()
            if v is not None and v > base and t_first is None:
                t_first, first = now, v
                if not naive:
                    snap_first = (now, lines, _thread_times(p.pid))
            if v is not None and v > seen:
                seen, t_last = v, now
                if not naive:
                    snap_last = (now, lines, _thread_times(p.pid))
            if v is not None and v >= target:
                break
            rss = max(rss, _rss_kb(p.pid))
            time.sleep(0.02)
        if t_first is None or t_last is None or t_last <= t_first:
            raise RuntimeError(f"{name}: no progress ({seen - base} events)")
        out = {"events": int(seen - base), "seconds": round(t_last - t_first, 3),
               "events_per_s": round((seen - first) / (t_last - t_first), 1),
               "rss_mb": round(rss / 1024, 1)}
        if snap_first is not None and snap_last is not None:
            out["time_breakdown"] = _time_breakdown(p.pid, snap_first, snap_last)
        if not naive:  # the same window, closed when the sink has stored the load's rows
            t_sink, rows = t_last, _sink_rows(sink_port)
            while time.time() < deadline and time.perf_counter() - t_sink < 2.0:
                time.sleep(0.05)
                now_rows = _sink_rows(sink_port)
                if now_rows != rows:
                    rows, t_sink = now_rows, time.perf_counter()
            out["sink_rows"] = int(rows)
            out["events_per_s_sink_caught_up"] = round((seen - first) / (t_sink - t_first), 1)
        return out
    finally:
        p.terminate()
        try:
            p.wait(60)
        except subprocess.TimeoutExpired:
            p.kill()


GENERATOR_NICE = 19


def _as_generator(fn, *args):
    """Run ``fn`` as the load generator: on a thread whose scheduling priority is lowered
    first (Linux sets niceness per thread; the Kafka client threads it starts inherit it).

    Why: the generator shares this machine's two CPUs with the worker it measures. Run at the
    worker's priority it took ~40% of a CPU at 10,000 events/s and, whenever both CPUs were
    busy, delayed the worker (p99 95-132 ms against 39-51 ms niced, same code). Niceness
    cannot flatter the figures: each event is stamped with the wall clock as it is sent, so a
    generator that runs late stamps late, and any delay between its stamp and the broker
    counts against the worker (and is reported apart: ``generator_to_broker``).
    ``achieved_rate`` shows it still sends at the target rate."""
    box: dict = {}

    def run():
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), GENERATOR_NICE)
        except OSError:
            pass
        try:
            box["out"] = fn(*args)
        except BaseException as e:  # noqa: BLE001 - re-raised on the caller's thread
            box["err"] = e

    if threading.current_thread() is not threading.main_thread():
        run()
    else:
        t = threading.Thread(target=run, daemon=True)
        t.start()
        t.join()
    if "err" in box:
        raise box["err"]
    return box.get("out")


def _latency_phase(settings, port, worker, sink, *args, sink_port=None) -> dict:
    """:func:`_latency`, with where the CPU went over the phase: the worker's time breakdown
    (as in the throughput phase), the sink process's and the broker's CPU seconds and
    seconds waiting for a CPU, the broker's JIT compiler seconds, and the ClickHouse inserts
    the sink made (each has a fixed cost, so their number matters as much as their rows).

    Why: the same phase's p99 differs run to run by a factor of five on this machine (a
    standing backlog in some runs, none in others); these say which process was short of CPU
    or busy in the runs that had one."""
    web = int(args[0])
    procs = {"sink_process": sink.pid if sink is not None else None,
             "broker": _broker_pid(port)}
    procs = {k: v for k, v in procs.items() if v is not None and Path(f"/proc/{v}").exists()}
    before = {k: _process_times(v) for k, v in procs.items()}
    bench0 = _own_cpu_seconds()
    sink0 = _sink_totals(sink_port or web)
    first = (time.perf_counter(), _scrape(web), _thread_times(worker.pid))
    out = _latency(settings, *args)
    last = (time.perf_counter(), _scrape(web), _thread_times(worker.pid))
    after = {k: _process_times(v) for k, v in procs.items()}
    sink1 = _sink_totals(sink_port or web)
    out["time_breakdown"] = _time_breakdown(worker.pid, first, last)
    out["sink_inserts"] = {"inserts": int(sink1[0] - sink0[0]),
                           "insert_seconds": round(sink1[1] - sink0[1], 3),
                           "rows": int(sink1[2] - sink0[2])}
    for k in procs:
        (c0, w0, _), (c1, w1, _) = before[k], after[k]
        out["time_breakdown"][f"{k}_on_cpu_s"] = round(c1 - c0, 3)
        out["time_breakdown"][f"{k}_waiting_for_cpu_s"] = round(w1 - w0, 3)
    # the bench itself (the generator, its Kafka client, the reader of results: threads
    # that end with the phase, so counted by the process's own usage) shares the two CPUs
    # too; a load from other hosts would not take this share
    out["time_breakdown"]["bench_process_on_cpu_s"] = round(_own_cpu_seconds() - bench0, 3)
    out["broker_jit_cpu_s"] = (round(after["broker"][2] - before["broker"][2], 2)
                               if "broker" in procs else None)
    return out


def _latency(settings, *args):
    """:func:`_measure_latency` run as the load generator (see :func:`_as_generator`).

    The generator's Kafka producer is made here, before the generator lowers its priority:
    its client thread (compression, sending) then runs at the worker's priority. Niced with
    the generator, that thread was starved whenever both CPUs were busy, and a record stamped
    on time reached the broker 42 ms late at p99 (86 ms at worst), counted as the worker's
    latency. Only the paced Python loop and the reader of results are niced."""
    from .publish import Publisher
    _append_time(settings)
    pub = Publisher(settings, **{"linger.ms": 1})
    _ready(settings, pub)
    return _as_generator(_measure_latency, settings, pub, *args)


def _append_time(settings) -> None:
    """The bench's topics stamp records with the broker's clock on append (``LogAppendTime``).

    Outputs: a sample ends when its risk snapshot or margin event is in the log, readable by
    a liquidation bot, not when the worker hands it to its Kafka client (the producer's create
    time would leave out the client's batching and the broker's append). Inputs: each sample
    can be split at the broker, into the load generator's part (stamp to append) and
    riskpipe's (append to output). The worker reads event time from the record itself, never
    the Kafka timestamp, so nothing else changes."""
    from confluent_kafka.admin import AdminClient, AlterConfigOpType, ConfigEntry, \
        ConfigResource
    admin = AdminClient(settings.kafka_conf())
    res = [ConfigResource("topic", settings.topic(t), incremental_configs=[ConfigEntry(
        "message.timestamp.type", "LogAppendTime",
        incremental_operation=AlterConfigOpType.SET)])
        for t in ("trades", "collateral", "risk-snapshots", "margin-calls")]
    for f in admin.incremental_alter_configs(res).values():
        f.result()


def _appended(settings, start: list, codec) -> dict:
    """(account, event time ms) -> earliest broker append time (ms) of the input records
    from offsets ``start`` on (read after the run, so it costs the measured run nothing)."""
    from confluent_kafka import Consumer
    c = Consumer({**settings.kafka_conf(), "group.id": f"lat-in-{uuid.uuid4().hex[:6]}",
                  "enable.auto.commit": False})
    ends = {(tp.topic, tp.partition): c.get_watermark_offsets(tp, timeout=10)[1]
            for tp in start}
    c.assign(start)
    left = {k for k, tp in zip(ends, start) if tp.offset < ends[k]}
    out: dict = {}
    deadline = time.time() + 60
    while left and time.time() < deadline:
        for m in c.consume(10_000, 0.5):
            if m.error():
                continue
            kind, append_ms = m.timestamp()
            rec = codec.decode(m.value(), millis=True)[1]
            key = (rec["account"], rec["ts"])
            if kind == 2 and append_ms < out.get(key, 1 << 62):  # 2: log append time
                out[key] = append_ms
            if m.offset() + 1 >= ends[(m.topic(), m.partition())]:
                left.discard((m.topic(), m.partition()))
    c.close()
    return out


def _pct(a, q) -> float:
    return round(float(np.percentile(a, q)), 2) if len(a) else float("nan")


def _measure_latency(settings, pub, port, rate, seconds, n_accounts, instruments, quotes,
                     quote_share=0.0):
    """Worker already running: publish at ``rate`` with event time = now and read the
    risk-snapshots and margin-calls it writes (Kafka timestamp = appended to the log)."""
    from confluent_kafka import Consumer, TopicPartition
    from schemas import Codec
    codec = Codec()
    c = Consumer({**settings.kafka_conf(), "group.id": f"lat-{uuid.uuid4().hex[:6]}",
                  "auto.offset.reset": "latest", "enable.auto.commit": False})
    topics = [settings.topic("risk-snapshots"), settings.topic("margin-calls")]
    md = c.list_topics(timeout=10)
    tps = []
    for t in topics:
        for p in md.topics[t].partitions:
            lo, hi = c.get_watermark_offsets(TopicPartition(t, p), timeout=10)
            tps.append(TopicPartition(t, p, hi))
    c.assign(tps)
    lat: list[float] = []
    at: list[float] = []  # event time of each sample, for the per-second tail
    who: list = []  # (account, event time) of each sample: its input record's append time
    trades = settings.topic("trades")  # the latency phases send trades (and quotes) only
    inputs = [TopicPartition(trades, p, c.get_watermark_offsets(
        TopicPartition(trades, p), timeout=10)[1]) for p in md.topics[trades].partitions]
    stop = threading.Event()
    # only this phase's events (a worker may still be finishing older input)
    since_ms = time.time() * 1000 - 1
    snap_head = bytes([rowblock.NATIVE, len("risk_snapshots")]) + b"risk_snapshots"

    def consume():
        while not stop.is_set():
            m = c.poll(0.1)
            if m is None or m.error():
                continue
            kind, produced_ms = m.timestamp()
            if kind != 2:  # 2: log append time (set above); anything else would be a bug
                raise RuntimeError(f"{m.topic()} records carry no log append time")
            if m.topic() == topics[0]:
                v = m.value()
                if not v.startswith(snap_head) or (
                        b"\x05TRADE" not in v and b"\x0aCOLLATERAL" not in v):
                    continue  # exposure and stress rows, and a market tick's snapshots (all
                    # QUOTE): not decoded, as they hold no sample (the generator's CPU)
                cols = rowblock.read(v).get("risk_snapshots")
                if cols:
                    for trig, ts, a in zip(cols["trigger"], cols["ts"].tolist(),
                                           cols["account"]):
                        if trig in ("TRADE", "COLLATERAL") and ts >= since_ms:
                            lat.append(produced_ms - ts)
                            at.append(ts)
                            who.append((a, ts))
            else:
                e = codec.decode(m.value(), millis=True)[1]
                ts = e["ts"]
                if e["trigger"] in ("TRADE", "COLLATERAL") and ts >= since_ms:
                    lat.append(produced_ms - ts)
                    at.append(ts)
                    who.append((e["account"], ts))

    th = threading.Thread(target=consume, daemon=True)
    th.start()
    gc0 = _gc_seconds(port)
    fetch0 = _buckets(port, "riskpipe_input_fetch_lag_seconds")
    rng = np.random.default_rng(9)
    tradable = [i for i in instruments if i.kind in ("PERPETUAL", "FUTURE")]
    marks = {q[0]: q[1] for q in quotes}
    n = int(rate * seconds)
    # the same mix as the throughput phase: quotes re-margin every holder of their underlying
    # (coalesced to one market tick per 100 ms), which live trades queue behind
    moves = _quote_moves(instruments, quotes, np.random.default_rng(10))
    records = []
    for k in range(n):
        if quote_share and rng.random() < quote_share:
            rec = next(moves)
            records.append((settings.topic("quotes"), rec["instrument"].encode(),
                            _stub(codec, rec, "Quote")))
            continue
        acct = f"acct-{int(rng.integers(n_accounts)):06d}"
        inst = tradable[int(rng.integers(len(tradable)))]
        rec = dict(trade_id=f"lat{k}", account=acct, instrument=inst.id,
                   quantity=0.01 if rng.random() < 0.5 else -0.01,
                   price=float(marks[inst.id]), fee=0.0, ts=None)
        records.append((trades, acct.encode(), _stub(codec, rec, "Trade")))
    produce = pub.producer.produce
    t0 = time.perf_counter()
    for k, (topic, key, stub) in enumerate(records):
        produce(topic, stub + _zigzag_varint(int(time.time() * 1000)), key)
        ahead = t0 + (k + 1) / rate - time.perf_counter()
        if ahead > 0.001:  # pace in ~1 ms steps: a sleep per record costs the generator
            time.sleep(ahead)  # (10,000 wake-ups a second) CPU the worker shares
    pub.flush()
    achieved = n / (time.perf_counter() - t0)
    time.sleep(3)
    stop.set()
    th.join()
    c.close()
    gc_pause = _gc_seconds(port) - gc0
    fetch_lag = _bucket_quantiles(fetch0, _buckets(port, "riskpipe_input_fetch_lag_seconds"))
    a = np.array(lat) if lat else np.array([np.nan])
    # p99 per second of the run: tells one long stall from a tail spread over the run
    sec = ((np.array(at) - min(at)) // 1000).astype(int) if at else np.zeros(0, int)
    by_second = [round(float(np.percentile(a[sec == k], 99)), 1)
                 for k in range(int(sec.max()) + 1 if sec.size else 0) if np.any(sec == k)]
    # the same samples split at the broker's append of their input record
    appended = _appended(settings, inputs, codec)
    split = [(appended[w] - w[1], x - (appended[w] - w[1]))
             for w, x in zip(who, lat) if w in appended]
    to_broker = np.array([g for g, _ in split])
    in_riskpipe = np.array([r for _, r in split])
    return {"target_rate": rate, "achieved_rate": round(achieved, 1), "samples": len(lat),
            "p50_ms": _pct(a, 50), "p95_ms": _pct(a, 95), "p99_ms": _pct(a, 99),
            "max_ms": round(float(np.max(a)), 2), "p99_ms_by_second": by_second,
            "from_broker_append": {
                "samples": len(split), "p50_ms": _pct(in_riskpipe, 50),
                "p95_ms": _pct(in_riskpipe, 95), "p99_ms": _pct(in_riskpipe, 99),
                "max_ms": _pct(in_riskpipe, 100)},
            "generator_to_broker": {"p50_ms": _pct(to_broker, 50), "p99_ms": _pct(to_broker, 99),
                                    "max_ms": _pct(to_broker, 100)},
            "worker_gc_pause_s": round(gc_pause, 3),
            # how much of riskpipe's part passes before the worker has its input: from the
            # input's append to its fetch reaching the accounts agent (bucket bounds)
            "input_fetch_lag": fetch_lag}


_STUBS_CHECKED: set[str] = set()


def _stub(codec, rec: dict, name: str) -> bytes:
    """``rec`` (a Trade or Quote, whose last field is ``ts``) encoded up to that field: the
    generator appends the event time as it sends (``_zigzag_varint``), so the paced loop
    spends no time encoding while the worker it measures shares its CPUs. Checked against the
    codec once per record type (the layout is the schema's): the stub plus the appended time
    must be byte-identical to encoding the whole record."""
    rec = {**rec, "ts": datetime.fromtimestamp(0, timezone.utc)}
    stub = codec.encode(name, rec)[:-1]  # ts=0 encodes as the single byte 00
    if name not in _STUBS_CHECKED:
        probe = datetime.now(timezone.utc).replace(microsecond=123000)
        whole = codec.encode(name, {**rec, "ts": probe})
        if stub + _zigzag_varint(int(probe.timestamp() * 1000)) != whole:
            raise RuntimeError(f"{name} no longer ends with its ts field; update _stub")
        _STUBS_CHECKED.add(name)
    return stub


def _zigzag_varint(n: int) -> bytes:
    """Avro's encoding of a long: zigzag, then base-128 varint."""
    z = (n << 1) ^ (n >> 63)
    out = bytearray()
    while z > 0x7F:
        out.append((z & 0x7F) | 0x80)
        z >>= 7
    out.append(z)
    return bytes(out)


def _ready(settings, pub) -> None:
    """Deliver one record to a scratch topic first: a new idempotent producer holds its first
    records until it has a producer id, which would count as the worker's latency."""
    from confluent_kafka.admin import AdminClient, NewTopic
    topic = settings.topic("bench-probe")
    for f in AdminClient(settings.kafka_conf()).create_topics([NewTopic(topic, 1, 1)]).values():
        try:
            f.result()
        except Exception:  # noqa: BLE001 - already exists
            pass
    pub.producer.produce(topic, b"", b"probe")
    pub.flush(60)
    for t in ("trades", "collateral"):  # leaders known before the first timed record
        pub.producer.list_topics(settings.topic(t), timeout=30)


def _processor(ins, quotes, snapshot_interval_ms):
    """A RiskProcessor with the bench's instruments and opening quotes."""
    from .processor import RiskProcessor
    proc = RiskProcessor(snapshot_interval_ms=snapshot_interval_ms)
    for i in ins:
        proc.apply_instrument(dict(id=i.id, kind=i.kind, underlying=i.underlying,
                                   settlement=i.settlement, multiplier=i.multiplier,
                                   strike=i.strike, expiry=i.expiry, lot_size=i.lot_size))
    for inst, mark, index, iv in quotes:
        proc.apply_quote(dict(instrument=inst, mark=mark, index_price=index, mark_iv=iv,
                              ts=T0))
    proc.on_market_tick()
    return proc


def in_process(ins, quotes, warmup, load, n=60_000, batch=2000) -> dict:
    """The account path without Kafka or the event loop, on this machine, now: the
    throughput workload's deposits, then its first ``n`` trades and collateral changes
    (quotes left out) decoded and applied in batches of ``batch``, with the changelog records
    and snapshot messages encoded as the worker encodes them.

    Why: this machine's speed drifts by a third within a day (the naive baseline measured
    1,150-1,710 events/s on one day, same code), so a figure alone says little. This is the
    yardstick taken in the same run. Batches stay at 2,000 (the worker's cap until it went to
    8,000) so the figure compares across runs; the worker's rate over it is the share the
    Kafka clients and the event loop leave, less what its larger batches save (one changelog
    record per account per batch), so it can exceed 1.

    The kernels are loaded first, as a worker loads them at start: the deposits apply no
    fill, so on a fresh clone the fill kernel's first compilation fell inside the timed part
    (25,800-27,300 events/s against 58,000-73,500 with the kernels cached)."""
    import engine as E
    from schemas import Codec
    from .rowblock import encode as encode_rows
    E.warm_up()
    codec = Codec()
    proc = _processor(ins, quotes, 1000)
    timed = [r for r in load if r[0] != "quotes"][:n]

    def apply(recs, first):
        for lo in range(0, len(recs), batch):
            dec = [codec.decode(v, millis=True) + (t, 0, first + lo + k)
                   for k, (t, _, v) in enumerate(recs[lo:lo + batch])]
            out = proc.apply_account_events(dec)
            for a in out.touched:
                proc.account_record_bytes(a)
            for table, cols in (("risk_snapshots", out.snapshots),
                                ("exposures", out.exposures)):
                encode_rows(table, cols)
    apply(warmup, 0)
    t0 = time.perf_counter()
    apply(timed, len(warmup))
    el = time.perf_counter() - t0
    return {"events": len(timed), "batch": batch, "events_per_s": round(len(timed) / el, 1)}


def fanout(n_accounts=100_000, positions=20):
    """In-process: 100k accounts; one BTC quote; time the market tick (the worker's path)."""
    import engine as E
    from .simulator import Market
    ins = _instruments()
    quotes = Market(ins, T0, 1).quotes(T0)
    proc = _processor(ins, quotes, 0)
    # the book's memory as the growth of the current RSS (the maximum RSS would hide it under
    # whatever ran before in this process: the in-process account path does)
    import gc
    gc.collect()
    rss0 = _rss_kb(os.getpid())
    rng = np.random.default_rng(4)
    uni = proc.universe
    tradable = np.array([uni.row(i.id) for i in ins if i.underlying == "BTC"])
    inst = np.empty((n_accounts, positions), dtype=np.int64)
    qty = np.empty((n_accounts, positions))
    inst[:, 0], qty[:, 0] = uni.row("USD"), 1e6
    ids = [f"acct-{a:06d}" for a in range(n_accounts)]
    for a, acct in enumerate(ids):
        inst[a, 1:] = rng.choice(tradable, positions - 1, replace=False)
        qty[a, 1:] = rng.normal(0, 0.5, positions - 1)
        proc.partition[acct] = a % 4
    proc.book = E.AccountBook.from_dense(uni, ids, inst, qty, np.zeros_like(qty))
    gc.collect()
    rss1 = _rss_kb(os.getpid())
    proc.on_market_tick()
    from .rowblock import encode as encode_rows
    times, encode = [], []
    for k in range(5):
        q = quotes[0]
        proc.apply_quote(dict(instrument=q[0], mark=q[1] * (1 - 0.01 * (k + 1)),
                              index_price=q[2] * (1 - 0.01 * (k + 1)), mark_iv=q[3],
                              ts=T0 + timedelta(seconds=k + 1)))
        t0 = time.perf_counter()
        out = proc.on_market_tick()
        t1 = time.perf_counter()
        msgs = [m for table, cols in (("risk_snapshots", out.snapshots),
                                      ("exposures", out.exposures))
                for m in encode_rows(table, cols)[0]]
        times.append(t1 - t0)
        encode.append(time.perf_counter() - t1)
    # the worker's path (Pipeline.market_tick): the same tick in its steps, outputs encoded
    steps, on_loop = [], []
    for k in range(3):
        q = quotes[0]
        proc.apply_quote(dict(instrument=q[0], mark=q[1] * (1 + 0.01 * (k + 1)),
                              index_price=q[2] * (1 + 0.01 * (k + 1)), mark_iv=q[3],
                              ts=T0 + timedelta(seconds=10 + k)))
        t0 = time.perf_counter()
        _, rows_t, t_ms = proc.start_tick()
        job = proc.tick_job(rows_t)
        t1 = time.perf_counter()
        res = job.run()  # the worker runs this on its own thread, off the event loop
        t2 = time.perf_counter()
        for lo, hi in proc.tick_steps(rows_t.size):
            part = proc.finish_tick_job(job, res, lo, hi, "QUOTE", t_ms)
            for table, cols in (("risk_snapshots", part.snapshots),
                                ("exposures", part.exposures)):
                encode_rows(table, cols)
        t3 = time.perf_counter()
        steps.append(t3 - t0)
        on_loop.append((t1 - t0) + (t3 - t2))
    rs_t0 = time.perf_counter()
    proc._stale = True
    proc.risk_set()
    rs_time = time.perf_counter() - rs_t0
    rows = np.arange(n_accounts, dtype=np.int64)
    m_t0 = time.perf_counter()
    proc.book.margin(proc.risk_set(), rows)
    m_time = time.perf_counter() - m_t0
    return {"accounts": n_accounts, "positions_per_account": positions,
            "market_tick_ms_best": round(min(times) * 1e3, 2),
            "market_tick_ms_median": round(float(np.median(times)) * 1e3, 2),
            "of_which_risk_arrays_ms": round(rs_time * 1e3, 2),
            "of_which_margin_ms": round(m_time * 1e3, 2),
            "plus_encoding_outputs_ms_best": round(min(a + b for a, b in zip(times, encode))
                                                   * 1e3, 2),
            "worker_steps_with_outputs_ms_best": round(min(steps) * 1e3, 2),
            "of_which_on_event_loop_ms_best": round(min(on_loop) * 1e3, 2),
            "snapshots_last_tick": len(out.snapshots.get("account", [])),
            "exposure_rows_last_tick": len(out.exposures.get("account", [])),
            "messages_last_tick": len(msgs), "events_last_tick": len(out.events),
            "target_ms": 100.0,
            "book_memory_mb": round((rss1 - rss0) / 1024, 1),
            "process_max_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                                        / 1024, 1)}


def run(events=200_000, accounts=20_000, latency_rate=10_000, latency_seconds=10,
        port=39092, baseline_events=None, sink_process=True, quote_share=0.02,
        latency_warmup_seconds=10) -> dict:
    from .demo import kafka
    from .simulator import Market
    from .topics import create_topics
    from .publish import Publisher
    started = False
    if kafka("status", port).returncode != 0:
        r = kafka("up", port)
        if r.returncode != 0:
            raise RuntimeError(f"local Kafka failed to start: {r.stderr}")
        started = True
    run_id = uuid.uuid4().hex[:8]
    data = REPO / ".riskpipe" / f"bench-{run_id}"
    s = Settings(kafka_bootstrap=f"127.0.0.1:{port}", topic_prefix=f"bench{run_id}.",
                 app_id=f"bench-{run_id}", data_dir=data)
    data.mkdir(parents=True, exist_ok=True)
    result: dict = {"benchmark": "pipeline", "machine": {"cpus": os.cpu_count()},
                    "workload": {"events": events, "accounts": accounts,
                                 "mix": "a deposit per account first (warm-up, not timed), "
                                        f"then {quote_share:.0%} quotes (random derivative, "
                                        "index on a random walk) and of the rest 85% trades / "
                                        "15% collateral changes on random accounts and "
                                        "instruments; the latency phases send the same share "
                                        "of quotes among their trades",
                                 "sink": "embedded ClickHouse (chDB), on, " + (
                                     "in its own process (worker --role margin, plus a "
                                     "--role sink process)" if sink_process else
                                     "in the worker's process (--role all)")}}
    margin = {"RISKPIPE_ROLE": "margin"} if sink_process else None
    sink = None
    _ports_free(16066, 16067, 16068)
    try:
        create_topics(s)
        ins = _instruments()
        mkt = Market(ins, T0, 1)
        quotes = mkt.quotes(T0)
        _publish_reference(Publisher(s), ins, quotes)
        recs = _workload(events + accounts, accounts, ins, quotes, quote_share=quote_share)
        warmup, load = recs[:accounts], recs[accounts:]
        if sink_process:
            sink = _start_worker(s, "sink", 16068, extra={"RISKPIPE_ROLE": "sink"})
            deadline = time.time() + 120
            while _metric(16068, "riskpipe_ready") != 1:
                if sink.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"sink process not ready; see {data / 'sink.log'}")
                time.sleep(0.2)
        result["in_process_account_path"] = in_process(ins, quotes, warmup, load)
        sink_port = 16068 if sink_process else None
        result["riskpipe_worker"] = _throughput(s, "worker", 16066, warmup, load, extra=margin,
                                                sink_port=sink_port)
        _alive(sink, data / "sink.log")
        nb = baseline_events or min(events, 30_000)
        s2 = Settings(kafka_bootstrap=s.kafka_bootstrap, topic_prefix=f"benchnaive{run_id}.",
                      app_id=f"bench-naive-{run_id}", data_dir=data)
        create_topics(s2)
        _publish_reference(Publisher(s2), ins, quotes)
        result["naive_faust_agent"] = _throughput(s2, "naive", 16067, warmup, load[:nb],
                                                  naive=True)
        result["naive_faust_agent"]["note"] = f"first {nb} events of the same load"
        result["throughput_ratio"] = round(result["riskpipe_worker"]["events_per_s"] /
                                           result["naive_faust_agent"]["events_per_s"], 2)
        # latency with the (warm) worker consuming live
        p = _start_worker(s, "worker", 16066, extra=margin)
        try:
            t_start = time.time()
            deadline = t_start + 300
            while time.time() < deadline and _metric(16066, "riskpipe_ready") != 1 \
                    and p.poll() is None:  # restarted: recovers its table from the changelog
                time.sleep(0.1)
            result["restart"] = {
                "ready_s": round(time.time() - t_start, 1),
                "recovery_s": _metric(16066, "riskpipe_last_recovery_seconds"),
                "replayed_records": _int(_metric(
                    16066, "riskpipe_changelog_replayed_records_total")),
                "changelog_records": _changelog_records(s, f"{s.app_id}-worker"),
                "note": "the worker restarted after the throughput run: seconds from its "
                        "start to riskpipe_ready (table recovered from the changelog and "
                        "loaded into the engine), the recovery's own seconds and the records "
                        "it replayed (the worker's metrics), and the records in the changelog "
                        "then"}
            time.sleep(5)  # catch up with anything left from the throughput run
            if latency_warmup_seconds > 0:
                # the same load first, reported apart: the figures below are the steady
                # state of a worker and a broker that have run it (a broker started for the
                # bench is still compiling its hot paths, see _broker_jit_seconds)
                result["latency_warmup"] = _latency_phase(
                    s, port, p, sink, 16066, latency_rate, latency_warmup_seconds, accounts,
                    ins, quotes, quote_share, sink_port=sink_port)
                time.sleep(3)
            result["latency"] = _latency_phase(s, port, p, sink, 16066, latency_rate,
                                               latency_seconds, accounts, ins, quotes,
                                               quote_share, sink_port=sink_port)
            result["latency"]["rss_mb"] = round(_rss_kb(p.pid) / 1024, 1)
            if sink is not None:
                result["latency"]["sink_process_rss_mb"] = round(_rss_kb(sink.pid) / 1024, 1)
            time.sleep(20)  # drain the backlog before measuring below saturation
            result["latency_below_saturation"] = _latency_phase(
                s, port, p, sink, 16066, max(1, latency_rate // 5), latency_seconds,
                accounts, ins, quotes, quote_share, sink_port=sink_port)
            _alive(p, data / "worker.log")
            _alive(sink, data / "sink.log")
        finally:
            p.terminate()
            p.wait(60)
    finally:
        if sink is not None:
            sink.terminate()
            sink.wait(60)
        _clean_up(s, run_id, data, keep_store="latency_below_saturation" not in result)
        if started:
            kafka("down", port)
    result["fanout"] = fanout()
    return result


def _clean_up(settings, run_id: str, data: Path, keep_store: bool) -> None:
    """Delete the run's topics (its own prefixes: inputs, outputs, Faust's changelogs) and,
    after a complete run, its embedded ClickHouse stores; the logs stay in ``data``.

    Why: a run leaves about 600 MB in the broker's log and 350 MB of store. Kept, sixteen runs
    had put 4.8 GB on a local broker. A failed run keeps its store for a look."""
    import shutil

    from confluent_kafka.admin import AdminClient
    prefixes = (f"bench{run_id}.", f"benchnaive{run_id}.", f"bench-{run_id}-",
                f"bench-naive-{run_id}-")
    try:
        admin = AdminClient(settings.kafka_conf())
        names = [t for t in admin.list_topics(timeout=10).topics if t.startswith(prefixes)]
        for f in (admin.delete_topics(names, operation_timeout=30).values() if names else ()):
            f.result()
    except Exception as e:  # noqa: BLE001 - the figures are taken; say what is left
        print(f"bench: could not delete the run's topics ({e}); prefixes {prefixes}",
              file=sys.stderr)
    if not keep_store:
        for store in data.glob("*/clickhouse"):
            shutil.rmtree(store, ignore_errors=True)


# -- the naive baseline ------------------------------------------------------------------------

def naive_worker() -> None:
    """The obvious Faust implementation: one event at a time; a trade or collateral change
    margins its account, a quote re-margins the holders of its underlying at once (no
    coalescing); write the table for each touched account, emit a margin event on
    transitions. Same engine, same topics, its own group."""
    import faust

    from schemas import Codec
    from .processor import RiskProcessor
    from .settings import load_settings
    s = load_settings()
    from .cli import use_event_loop
    use_event_loop(s.event_loop)  # the same runtime as the worker: the ratio compares designs
    app = faust.App(s.app_id, broker=f"kafka://{s.kafka_bootstrap}", store="memory://",
                    datadir=str(s.data_dir / "faust"), web_port=s.web_port,
                    web_bind="127.0.0.1", consumer_auto_offset_reset="earliest",
                    topic_partitions=s.partitions)
    (s.data_dir / "faust").mkdir(parents=True, exist_ok=True)
    table = app.Table("naive-accounts", default=None, partitions=s.partitions)
    topic = app.topic(s.topic("trades"), s.topic("collateral"), s.topic("quotes"),
                      key_type=bytes, value_type=bytes, value_serializer="raw",
                      key_serializer="raw")
    out_topic = app.topic(s.topic("margin-calls-naive"), value_serializer="raw")
    codec = Codec()
    proc = RiskProcessor()
    counter = {"n": 0}
    from confluent_kafka import Consumer
    quotes_seen: dict = {}  # (topic, partition) -> last offset read at start-up
    for ref in (s.topic("instruments"), s.topic("quotes")):  # instruments before quotes
        c = Consumer({**s.kafka_conf(), "group.id": f"{s.app_id}-ref-{ref}",
                      "auto.offset.reset": "earliest"})
        c.subscribe([ref])
        idle = 0
        while idle < 6:
            m = c.poll(0.5)
            if m is None:
                idle += 1
                continue
            name, rec = codec.decode(m.value())
            proc.apply_instrument(rec) if name == "Instrument" else proc.apply_quote(rec)
            if name == "Quote":
                quotes_seen[(m.topic(), m.partition())] = m.offset()
        c.close()
    proc.risk_set()

    @app.agent(topic)
    async def accounts(stream):
        async for event in stream.events():
            m = event.message
            try:
                name, rec = codec.decode(event.value)
                if name == "Quote":  # re-margin the holders of the moved underlying
                    if (m.topic, m.partition) not in quotes_seen or \
                            m.offset > quotes_seen[(m.topic, m.partition)]:
                        proc.apply_quote(rec)
                        out = proc.on_market_tick()
                    else:  # read at start-up already
                        counter["n"] += 1
                        continue
                else:
                    out = proc.apply_account_events([(name, rec, m.topic, m.partition,
                                                      m.offset)])
            except Exception:  # noqa: BLE001
                continue
            for e in out.events:
                await out_topic.send(key=e["account"].encode(),
                                     value=codec.encode("MarginEvent", e))
            for a in out.touched:
                table[a] = json.dumps(proc.account_record(a))
            counter["n"] += 1

    @app.page("/metrics")
    async def metrics(web, request):
        return web.text(f"riskpipe_events_in_total {counter['n']}\n")

    from faust import Worker
    sys.argv = [sys.argv[0]]
    Worker(app, loglevel="warning", redirect_stdouts=False).execute_from_commandline()


if __name__ == "__main__":
    if "--naive-worker" in sys.argv:
        naive_worker()
    else:
        print(json.dumps(run(), indent=2))
