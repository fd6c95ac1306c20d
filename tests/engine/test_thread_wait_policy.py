"""The parallel kernels' threads sleep when a call ends (``OMP_WAIT_POLICY=PASSIVE``, set by
``engine`` on import), in the worker's own import order, and a value set by the operator wins.

Why through OpenMP's own report (``OMP_DISPLAY_ENV``): the runtime reads the variable once, when
numba loads it, so setting it after a parallel kernel has run would change the environment and
nothing else. The report shows what the runtime took."""
import os
import subprocess
import sys

# the worker imports the streaming app first, then runs the kernels (engine.warm_up calls the
# parallel variants too)
_CODE = ("import streams.app, engine, numba; engine.warm_up(); "
         "print('layer', numba.threading_layer())")


def _run(extra: dict) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env.update(OMP_DISPLAY_ENV="VERBOSE", **extra)
    r = subprocess.run([sys.executable, "-c", _CODE], capture_output=True, text=True, env=env,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return r


def test_kernel_threads_wait_passively_by_default():
    r = _run({})
    assert "layer omp" in r.stdout  # the policy below is OpenMP's; another layer needs its own
    # OpenMP reports an unset policy as PASSIVE too: the spin count tells them apart (300,000
    # unset, 0 passive)
    assert "OMP_WAIT_POLICY = 'PASSIVE'" in r.stderr
    assert "GOMP_SPINCOUNT = '0'" in r.stderr


def test_operator_setting_wins():
    r = _run({"OMP_WAIT_POLICY": "ACTIVE"})
    assert "OMP_WAIT_POLICY = 'ACTIVE'" in r.stderr
    assert "GOMP_SPINCOUNT = '30000000000'" in r.stderr
