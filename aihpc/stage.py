"""Running one workflow stage from a Snakemake script."""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Iterator
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from pathlib import Path

from aihpc.errors import InputError


@contextmanager
def rule_log(log_path: str | Path) -> Iterator[None]:
    """Send everything the stage prints to the rule's log; bad input becomes one line, exit 1.

    Redirects ``sys.stdout``/``sys.stderr`` and file descriptors 1 and 2: logging handlers
    created at import time (Lightning's) and native libraries write to the descriptors.
    Other exceptions (bugs) keep their traceback. Snakemake removes the outputs of a failed
    job and prints the log with ``--show-failed-logs``.
    """
    Path(log_path).parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with (
        open(log_path, "w", buffering=1) as log,
        redirect_stdout(log),
        redirect_stderr(log),
    ):
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            yield
        except InputError as exc:
            print(f"error: {exc}", file=sys.stderr)
            raise SystemExit(1) from None
        except Exception:
            traceback.print_exc()
            raise SystemExit(1) from None
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            for fd, original in zip((1, 2), saved, strict=True):
                os.dup2(original, fd)
                os.close(original)
