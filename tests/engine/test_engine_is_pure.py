"""engine/ imports no streaming or storage library (a notebook can use it alone)."""
import subprocess
import sys


def test_engine_imports_no_io_libraries():
    code = ("import sys, engine; bad = [m for m in ('faust', 'confluent_kafka', 'aiokafka', "
            "'clickhouse_connect', 'chdb', 'fastavro') if m in sys.modules]; print(bad); "
            "sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
