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
