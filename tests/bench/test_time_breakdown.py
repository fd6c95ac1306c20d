"""The benchmark's time breakdown: thread times read from the kernel, differences taken over the
window between two snapshots."""
import os
import time

from streams.bench_pipeline import _thread_times, _time_breakdown


def _spin(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def test_thread_times_reads_the_main_threads_cpu_and_wait():
    pid = os.getpid()
    before = _thread_times(pid)
    _spin(0.2)
    after = _thread_times(pid)
    assert pid in before and pid in after  # the main thread's id is the process id
    name, run, wait = after[pid]
    assert run - before[pid][1] >= 0.1  # it spun 0.2 s (a busy CI machine may lend it less)
    assert wait >= before[pid][2] >= 0.0


def test_breakdown_is_the_difference_between_snapshots():
    pid = 100
    lines0 = ['riskpipe_stage_seconds_total{stage="process"} 1.5',
              'riskpipe_stage_seconds_total{stage="backpressure"} 0.25']
    lines0 += ["riskpipe_batches_total 40", "riskpipe_events_in_total 4000"]
    lines1 = ["riskpipe_batches_total 65", "riskpipe_events_in_total 5000",
              'riskpipe_stage_seconds_total{stage="process"} 4.0',
              'riskpipe_stage_seconds_total{stage="backpressure"} 0.75',
              'riskpipe_stage_seconds_total{stage="wait"} 0.5']  # first seen in the window
    th0 = {100: ("python", 10.0, 1.0), 101: ("rdk:broker1", 2.0, 0.5)}
    th0[103] = ("rdk:broker2", 1.0, 0.0)
    th1 = {100: ("python", 12.5, 1.25), 101: ("rdk:broker1", 2.5, 0.75),
           102: ("riskpipe-tick", 0.25, 0.0),  # started in the window: counts from zero
           103: ("rdk:broker2", 1.125, 0.0), 104: ("riskpipe-tick", 0.125, 0.0)}
    out = _time_breakdown(pid, (1.0, lines0, th0), (4.0, lines1, th1))
    assert out == {"window_s": 3.0, "account_units": 25, "account_unit_events": 1000,
                   "event_loop_thread_on_cpu_s": 2.5,
                   "event_loop_thread_waiting_for_cpu_s": 0.25,
                   "other_threads_on_cpu_s": 1.0,
                   "other_threads_by_name": {"rdk:broker1": 0.5, "riskpipe-tick": 0.375,
                                             "rdk:broker2": 0.125},
                   "stage_seconds": {"process": 2.5, "backpressure": 0.5, "wait": 0.5}}


def test_broker_jit_seconds_sums_the_compiler_threads(tmp_path, monkeypatch):
    """A thread named as HotSpot names its JIT compilers counts; the others do not."""
    import ctypes
    import threading

    from streams.bench_pipeline import _broker_jit_seconds

    run = tmp_path / "kafka-run-39999"
    run.mkdir()
    (run / "kafka.pid").write_text(str(os.getpid()))
    monkeypatch.setenv("RISKPIPE_HOME", str(tmp_path))
    _spin(0.3)
    before = _broker_jit_seconds(39999)
    assert before == 0.0  # the main thread's 0.3 s does not count: no thread is a compiler yet
    seen = []

    def compiler():
        ctypes.CDLL(None).prctl(15, b"C2 CompilerThre", 0, 0, 0)  # PR_SET_NAME: this thread
        end = time.thread_time() + 0.2  # 0.2 s of this thread's CPU, however busy the host
        while time.thread_time() < end:
            pass
        seen.append(_broker_jit_seconds(39999))  # sampled while it runs (an ended thread
        # leaves /proc)

    t = threading.Thread(target=compiler)
    t.start()
    t.join()
    assert 0.19 <= seen[0] - before < 0.3
    assert _broker_jit_seconds(39998) is None  # no broker started on that port


def test_a_named_thread_shows_its_name_to_the_kernel():
    """streams/osthread.py: the name the breakdown groups the worker's threads by."""
    import threading

    from streams.osthread import name_this_thread

    seen = []

    def run():
        name_this_thread("riskpipe-a-very-long-name")
        seen.append(_thread_times(os.getpid())[threading.get_native_id()][0])

    t = threading.Thread(target=run)
    t.start()
    t.join()
    assert seen == ["riskpipe-a-very"]  # the kernel keeps 15 bytes
