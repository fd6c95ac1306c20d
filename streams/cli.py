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


def _settings(**overrides):
    from .settings import load_settings
    try:
        return load_settings(**overrides)
    except ValueError as e:
        raise UserError(str(e).splitlines()[0] if "\n" not in str(e) else str(e)) from None


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
    try:
        from .store import open_store
    except ImportError:
        return
    with open_store(s) as st:
        for m in st.migrate():
            typer.echo(f"clickhouse migration {m}")


@app.command()
def worker(loglevel: str = typer.Option("info", help="log level")):
    """Run a margin worker (Faust) until interrupted."""
    s = _settings()
    from .topics import create_topics
    create_topics(s)
    from .app import create_app
    sink = None
    try:
        from .store import make_sink
        sink = make_sink(s)
    except ImportError:
        pass
    pipe = create_app(s, sink=sink)
    from faust import Worker
    Worker(pipe.app, loglevel=loglevel, redirect_stdouts=False).execute_from_commandline()


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
