"""What a command shows on the terminal: one line per stage and phase, and the result.

By default (``quiet``) everything else a run prints, Ray's worker logs and progress bars,
transformers' notes, warnings and the library's own log records, goes to ``OUT/logs/console.log``:
the process's stdout and stderr file descriptors point there while the command runs, so the Ray
processes started meanwhile write there too. ``phase`` and ``say`` write to the terminal that was
saved before. ``--verbose`` (or ``SELECTMOE_VERBOSE=1``) leaves every stream on the terminal.

On a terminal (TTY) a phase's line shows the time spent so far while it runs and is replaced by
``text: done in N s`` when it ends. Elsewhere (a pipe, a job log) a phase that runs longer than
``ANNOUNCE_S`` is announced with ``text ...`` then, so short phases take one line and long ones two.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time
from pathlib import Path

from selectmoe.layout import LOGS_DIR

CONSOLE_LOG = "console.log"
TICK_S = 1.0  # refresh of a running phase's elapsed time (TTY only)
ANNOUNCE_S = 10.0  # not a TTY: a phase still running after this long gets a line saying it runs

_terminal = None  # the saved terminal while quiet; None = write to sys.stderr
_branch = ""  # "[random] " while a pipeline runs a baseline's stage


def say(text: str) -> None:
    """One line on the terminal (stderr, so stdout keeps only the result)."""
    stream = _terminal or sys.stderr
    stream.write(_branch + text + "\n")
    stream.flush()


@contextlib.contextmanager
def branch(name: str):
    """Prefix every line with ``[name]`` (a pipeline's baseline branch)."""
    global _branch
    previous, _branch = _branch, f"[{name}] " if name else ""
    try:
        yield
    finally:
        _branch = previous


STAGE_TITLES = {
    "validate-data": "validate-data",
    "pretrain": "stage 1 pretrain",
    "select": "stage 2 select",
    "finetune": "stage 3 finetune",
    "evaluate": "stage 4 evaluate",
}


def summary(stage: str, manifest: dict) -> str:
    """The one-line result of a finished stage, from its manifest."""
    c, m = manifest.get("counts", {}), manifest.get("metrics", {})
    seconds = manifest.get("seconds")
    took = f" ({seconds:.0f} s)" if isinstance(seconds, int | float) else ""
    if stage == "pretrain":
        text = f"{c.get('rows_trained')} rows, {c.get('steps')} steps, final LM loss {m.get('lm_loss', float('nan')):.3f}"
    elif stage == "select":
        text = (
            f"{c.get('rows_read')} rows read, {c.get('rows_scored')} scored, {c.get('rows_rejected')} rejected, "
            f"{c.get('rows_selected')} selected; score = {m.get('score_formula', 'mean gate')}"
        )
    elif stage == "finetune":
        text = (
            f"{c.get('rows_trained')} rows, {c.get('steps')} steps, loss "
            f"{m.get('first_loss', float('nan')):.3f} -> {m.get('final_loss', float('nan')):.3f}"
        )
    elif stage == "evaluate":
        values = {name: v for name, v in m.items() if isinstance(v, int | float)}  # task/metric -> value
        text = ", ".join(f"{name} {value:.4f}" for name, value in values.items()) or "no metric"
    else:
        text = f"{c.get('rows_read')} rows read, {c.get('rows_accepted')} accepted, {c.get('rows_rejected')} rejected"
    return f"{STAGE_TITLES.get(stage, stage)}: {text}{took}"


@contextlib.contextmanager
def phase(text: str):
    """``text: done in N s`` at the end; while it runs, a live counter (TTY) or one ``text ...`` line
    after ``ANNOUNCE_S``."""
    stream = _terminal or sys.stderr
    started = time.monotonic()
    live = stream.isatty()
    stop = threading.Event()
    text = _branch + text

    def tick():
        if not live:
            if not stop.wait(ANNOUNCE_S):
                stream.write(f"{text} ...\n")
                stream.flush()
            return
        while not stop.wait(TICK_S):
            stream.write(f"\r{text} ... {time.monotonic() - started:.0f} s")
            stream.flush()

    if live:
        stream.write(f"{text} ...")
        stream.flush()
    ticker = threading.Thread(target=tick, daemon=True)
    ticker.start()
    try:
        yield
    finally:
        stop.set()
        ticker.join()
        if live:
            stream.write("\r\033[K")  # clear the live line
        status = "done" if sys.exc_info()[0] is None else "failed"
        stream.write(f"{text}: {status} in {time.monotonic() - started:.0f} s\n")
        stream.flush()


@contextlib.contextmanager
def quiet(output_dir: str | Path):
    """Send every stream of this process (and of the processes it starts) to
    ``output_dir/logs/console.log``; ``say`` and ``phase`` still reach the terminal."""
    global _terminal
    log_dir = Path(output_dir) / LOGS_DIR
    log_dir.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = {fd: os.dup(fd) for fd in (1, 2)}
    log = open(log_dir / CONSOLE_LOG, "a", buffering=1)  # noqa: SIM115 (closed below)
    _terminal = os.fdopen(os.dup(saved[2]), "w", buffering=1)
    for fd in (1, 2):
        os.dup2(log.fileno(), fd)
    # Python-level streams too, and the log handlers already writing to them (Ray's, set up on import):
    # where sys.stdout/sys.stderr are not the process's file descriptors (pytest, notebooks)
    streams = (sys.stdout, sys.stderr)
    sys.stdout = sys.stderr = log
    moved = [(h, h.stream) for h in _stream_handlers() if h.stream in streams]
    for h, _ in moved:
        h.setStream(log)
    handler = logging.StreamHandler(log)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    previous_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    _quiet_libraries()
    say(f"(full output: {log_dir / CONSOLE_LOG})")
    try:
        yield
    finally:
        log.flush()
        root.removeHandler(handler)
        root.setLevel(previous_level)
        sys.stdout, sys.stderr = streams
        for h, stream in moved:
            h.setStream(stream)
        for fd in (1, 2):
            os.dup2(saved[fd], fd)
            os.close(saved[fd])
        _terminal.close()
        _terminal = None
        log.close()


def _stream_handlers() -> list[logging.StreamHandler]:
    loggers = [logging.getLogger()] + [
        logger for logger in logging.Logger.manager.loggerDict.values() if isinstance(logger, logging.Logger)
    ]
    return [h for logger in loggers for h in logger.handlers if type(h) is logging.StreamHandler]


def _quiet_libraries() -> None:
    """Progress bars and notes that would only repeat what the phase lines say."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
