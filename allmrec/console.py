"""What a command prints: its own lines on the terminal, everything in the run's log file.

A command's terminal would otherwise be Ray's: every worker's output comes back to the driver
prefixed "(ActorName pid=N)" (Ray Data's progress tables, weight-loading bars, DeepSpeed's
build lines, Ray Train's internals), and Ray's own driver logs sit between. `quiet_console`
puts a line filter in front of stdout and stderr: by default the terminal gets allmrec's lines
(its log records, what it prints, its workers' progress lines and log records, all in one
format: "12:00:01 INFO allmrec.stage2: ...") plus any error of another library;
with `verbose`, every line. Every line, shown or not, goes to the log file that
`write_log_to` names once the run directory is known (lines before that are kept for it).
C and C++ code (Ray's core worker) writes to file descriptor 2 itself, past `sys.stderr`: the
descriptor is a pipe into the same filter for the block.
"""

from __future__ import annotations

import io
import os
import re
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

# Ray's prefix of a line forwarded from a worker: "(RayTrainWorker pid=12, ip=10.0.0.2) ",
# coloured on a terminal.
_FORWARDED = re.compile(
    r"^(?:\x1b\[[\d;]*m)?\((?P<who>.*? pid=\d+(?:, ip=[\w.:-]+)?|raylet|gcs_server|autoscaler"
    r"|monitor)(?:, ip=[\w.:-]+)?\)(?:\x1b\[0m)? ?"
)
_ANSI = re.compile(r"\x1b\[[\d;]*m")
# A worker's line of allmrec's: a record or a progress line in the driver's format
# (`progress_line`: "12:00:01 INFO allmrec.stage2: epoch 1 step 10/150 ...")
_OURS_FROM_WORKERS = re.compile(r"^[\d\- :,.]+(?:[A-Z]+ )?allmrec\.")
# Serve's access log of a request to allmrec's app: what an operator of `allmrec serve` watches
_ACCESS = re.compile(r" allmrec_\w+ .* -- (?:GET|POST|PUT|PATCH|DELETE) /\S* \d{3} ")
# A log record in the driver's format (allmrec.cli.setup_logging): "12:00:01 INFO name: ..."
_RECORD = re.compile(r"^\d\d:\d\d:\d\d (?P<level>[A-Z]+) (?P<name>[\w.]+): ")
# Ray's driver-side records: "2026-12-02 00:10:31,312\tINFO worker.py:2029 -- ...", and
# Serve's: "INFO 2026-12-02 03:04:41,752 serve 27776 -- Started Serve in namespace ..."
_RAY_RECORD = re.compile(
    r"^(?:\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+\t(?P<level>[A-Z]+) "
    r"|(?P<serve_level>[A-Z]+) \d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ \S+ )"
)
_LOUD = {"ERROR", "CRITICAL", "FATAL"}
# Ray's C++ core (glog format): "[2026-12-02 02:52:35,209 E 27776 27776] core_worker.cc:2465: "
# Its E lines report internal states (an actor's restart caveats) to Ray's own logs; only a
# fatal one (F) reaches the terminal.
_CPP_RECORD = re.compile(r"^\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ (?P<level>[DIWEF]) \d+ \d+\] ")
# DeepSpeed's own logger: "[2026-12-02 08:15:54,882] [WARNING] [real_accelerator.py:213:...] "
_DEEPSPEED_RECORD = re.compile(r"^\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+\] \[(?P<level>[A-Z]+)\] \[")
# Ray Data's driver-side record of an operator whose task raised ("An exception was raised
# from a task of operator ... Dataset execution will now abort"), its traceback below it
_RAY_DATA_FAILURE = re.compile(
    r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+\tERROR (?:streaming_executor\w*\.py:\d+ -- .*"
    r"will now abort|exceptions\.py:\d+ -- (?:Exception occurred in Ray Data|Full stack trace))"
)
_FAILURE_LINES = 1000  # a traceback longer than this is not one
# What ends that traceback: a new record of anyone, or one of allmrec's own lines
_NEXT_RECORD = re.compile(
    r"^(?:\d\d:\d\d:\d\d [A-Z]+ [\w.]+: |\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+\t[A-Z]+ |allmrec: "
    r"|log \(every line)"
)
# A library's tqdm bar ("Loading weights: 100%|####| 103/103 [00:00<00:00, ...]"), redrawn
# with carriage returns on one line: the driver's own (a worker's is hidden with its prefix).
_PROGRESS_BAR = re.compile(r"\d+%\|.*\| *\d+/\d+ \[")


def progress_line(stage: str, text: str) -> str:
    """A progress line of a stage ("cf", "stage1", "stage2", "tune", ...) in the format of
    every other line allmrec prints (`allmrec.cli.setup_logging`'s records):
    "12:00:01 INFO allmrec.stage2: epoch 1 step 10/150 loss 1.2209". Workers print it (Ray
    forwards their stdout, not their log records); the driver shows it as it came."""
    return f"{time.strftime('%H:%M:%S')} INFO allmrec.{stage}: {text}"


def say(stage: str, text: str) -> None:
    """Print `progress_line(stage, text)` now (flushed: a worker's line reaches the driver
    while the step is still running)."""
    print(progress_line(stage, text), flush=True)


def shown_on_terminal(line: str, access_log: bool = True) -> str | None:
    """The line as the terminal shows it by default (a worker's line without Ray's prefix),
    or None for a line that only goes to the log file. `access_log`: Serve's access lines of
    allmrec's app are shown (`allmrec serve`, as uvicorn does), else only logged (`demo`)."""
    forwarded = _FORWARDED.match(line)
    if forwarded:
        payload = line[forwarded.end() :]
        plain = _ANSI.sub("", payload)
        if _ACCESS.search(plain):
            return payload if access_log else None
        return payload if _OURS_FROM_WORKERS.search(plain) else None
    cpp = _CPP_RECORD.match(line)
    if cpp:
        return line if cpp["level"] == "F" else None
    deepspeed = _DEEPSPEED_RECORD.match(line)
    if deepspeed:
        return line if deepspeed["level"] in _LOUD else None
    if _PROGRESS_BAR.search(line):
        return None
    record = _RECORD.match(line)
    if record:
        ours = record["name"] == "allmrec" or record["name"].startswith("allmrec.")
        return line if ours or record["level"] in _LOUD else None
    ray_record = _RAY_RECORD.match(line)
    if ray_record:
        level = ray_record["level"] or ray_record["serve_level"]
        return line if level in _LOUD or (access_log and _ACCESS.search(line)) else None
    return line


class _Log:
    """The log file shared by both streams; lines written before it is named are kept."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.file: io.TextIOBase | None = None
        self.path: Path | None = None
        self.early: list[str] = []

    def write(self, text: str) -> None:
        with self.lock:
            if self.file is not None:
                self.file.write(_ANSI.sub("", text))
                self.file.flush()
            elif len(self.early) < 10_000:
                self.early.append(text)

    def open(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with self.lock:
            if self.file is not None:
                return
            self.file = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
            self.path = path
            self.file.write(_ANSI.sub("", "".join(self.early)))
            self.early.clear()

    def close(self) -> None:
        with self.lock:
            if self.file is not None:
                self.file.close()
                self.file = None


class _FilteredStream(io.TextIOBase):
    """A text stream that writes whole lines to the log and the chosen ones to `target`."""

    def __init__(self, target, log: _Log, verbose: bool, access_log: bool = True) -> None:
        self.target, self.log, self.verbose = target, log, verbose
        self.access_log = access_log
        self.failure_lines = 0  # > 0: inside Ray Data's failure record, lines left to hide
        self.pending = ""
        self.passthrough = False  # after the command: straight to `target`
        self.lock = threading.Lock()

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        if self.passthrough:
            return self.target.write(text)
        with self.lock:  # whole lines, in order, from the main thread and descriptor 2's pump
            self.pending += text
            *lines, self.pending = self.pending.split("\n")
            for line in lines:
                self._emit(line + "\n")
        return len(text)

    def _emit(self, line: str) -> None:
        self.log.write(line)
        if self.verbose:
            self.target.write(line)
            return
        # Ray Data's record of an aborted dataset and the traceback under it: the log's; the
        # command ends with its own line about the same error (`allmrec: error: ...`). What
        # ends the traceback: any record, a worker's line, allmrec's own lines.
        if _RAY_DATA_FAILURE.match(line):
            self.failure_lines = _FAILURE_LINES
            return
        if self.failure_lines:
            ends = _NEXT_RECORD.match(line) or _FORWARDED.match(line) or _CPP_RECORD.match(line)
            if not ends:
                self.failure_lines -= 1
                return
            self.failure_lines = 0
        shown = shown_on_terminal(line, self.access_log)
        if shown is not None:
            self.target.write(shown)

    def flush(self) -> None:
        self.target.flush()  # a partial line waits for its end: it is filtered as a whole

    def finish(self) -> None:
        with self.lock:
            rest, self.pending = self.pending, ""
        if rest:
            self._emit(rest)
        self.passthrough = True
        self.target.flush()

    def isatty(self) -> bool:
        # Not a terminal: libraries that would redraw live progress displays on one (Ray
        # Data's) log lines instead, which the filter can tell apart.
        return False

    def fileno(self) -> int:
        return self.target.fileno()

    @property
    def encoding(self) -> str:
        return getattr(self.target, "encoding", "utf-8")


_log = _Log()


class _Descriptor2:
    """File descriptor 2 as a pipe into `stream` (see the module docstring); the terminal's
    stderr is kept on a copy of the descriptor, where `stream` writes."""

    def __init__(self) -> None:
        self.saved = os.dup(2)
        self.terminal = open(  # noqa: SIM115 - closed at the end of quiet_console
            os.dup(self.saved), "w", buffering=1, encoding="utf-8", errors="replace"
        )
        self.thread: threading.Thread | None = None

    def redirect_into(self, stream: _FilteredStream) -> None:
        reader, writer = os.pipe()
        os.dup2(writer, 2)
        os.close(writer)

        def pump() -> None:
            with open(reader, "rb") as pipe:
                for raw in pipe:
                    stream.write(raw.decode("utf-8", "replace"))

        self.thread = threading.Thread(target=pump, name="allmrec-fd2", daemon=True)
        self.thread.start()

    def restore(self) -> None:
        os.dup2(self.saved, 2)  # the pipe's last writer closes: the pump reads to its end
        os.close(self.saved)
        if self.thread is not None:
            self.thread.join(timeout=2)  # a child process may still hold the pipe open


def _on_descriptor_2(stream) -> bool:
    try:
        return stream.fileno() == 2
    except (AttributeError, OSError, io.UnsupportedOperation):
        return False


@contextmanager
def quiet_console(verbose: bool = False, access_log: bool = True) -> Iterator[None]:
    """Filter this process's stdout and stderr for the block (see the module docstring);
    `access_log` False keeps Serve's access lines off the terminal (`shown_on_terminal`)."""
    try:
        descriptor = _Descriptor2()
    except OSError:  # no descriptor 2 (a detached process): Python's stream alone
        descriptor = None
    out = _FilteredStream(sys.stdout, _log, verbose, access_log)
    # sys.stderr itself, unless it writes to descriptor 2 (the pipe now): then the copy
    terminal = descriptor.terminal if descriptor and _on_descriptor_2(sys.stderr) else sys.stderr
    err = _FilteredStream(terminal, _log, verbose, access_log)
    saved = sys.stdout, sys.stderr
    sys.stderr.flush()
    if descriptor is not None:
        descriptor.redirect_into(err)
    sys.stdout, sys.stderr = out, err
    try:
        yield
    finally:
        sys.stdout, sys.stderr = saved
        if descriptor is not None:
            descriptor.restore()
        out.finish()
        err.finish()
        if descriptor is not None:  # whatever still holds `err` now writes to stderr itself
            err.target = saved[1]
            descriptor.terminal.close()
        _log.close()
        _log.path = None
        _log.early.clear()


def write_log_to(path: Path) -> None:
    """Name the command's log file (inside `quiet_console`; once: later calls are ignored)."""
    _log.open(Path(path))


def log_path() -> Path | None:
    return _log.path
