"""Names the worker's own threads for the operating system (``top -H``, ``/proc/<pid>/task``).

Why: a worker runs its event loop, Faust's Kafka consumer thread, the market tick's kernel
thread, the delivery-report thread, librdkafka's threads (which name themselves) and the
kernels' OpenMP threads. Python does not pass its thread names to the kernel, so every Python
thread showed as the process's name, and which one took a CPU could only be guessed from
when it started. With the names, the CPU of each is read from ``/proc`` by name (the
pipeline bench reports it per phase: ``other_threads_by_name``)."""
from __future__ import annotations

import ctypes
import ctypes.util

_PR_SET_NAME = 15
_libc = None


def name_this_thread(name: str) -> None:
    """Set the calling thread's kernel name (at most 15 bytes are kept); a no-op where the
    call is unavailable (not Linux)."""
    global _libc
    try:
        if _libc is None:
            _libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        _libc.prctl(_PR_SET_NAME, name.encode()[:15], 0, 0, 0)
    except (OSError, AttributeError):
        pass
