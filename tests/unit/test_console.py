"""The terminal filter, on lines as Ray, DeepSpeed and allmrec really print them (taken from a
`make demo` log), and the log file that keeps every line."""

import io
import sys

from allmrec.console import log_path, quiet_console, shown_on_terminal, write_log_to

RAY = "\x1b[36m(RayTrainWorker pid=26609)\x1b[0m "
EMBEDDER = "\x1b[36m(MapWorker(MapBatches(ItemTextEmbedder)) pid=26435)\x1b[0m "
REPORT_LINE = RAY + "Reporting training result 1: TrainingReport(checkpoint=Checkpoint(...))"
HIDDEN = [
    REPORT_LINE,
    'INFO 2026-12-02 03:04:41,752 serve 27776 -- Started Serve in namespace "serve".',
    "\x1b[33m(raylet)\x1b[0m Task ServeController.graceful_shutdown failed. There are infinite "
    "retries remaining, so the task will be retried.",
    "\x1b[36m(ServeController pid=27001)\x1b[0m INFO 2026-12-02 02:00:58,001 controller 27001 "
    "-- Deploying new version of Deployment(name='Ingress', app='allmrec').",
    RAY + "Reporting training result 1: TrainingReport(checkpoint=Checkpoint(filesystem=local",
    RAY + "DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully",
    EMBEDDER + "\rLoading weights:   0%|          | 0/103 [00:00<?, ?it/s]",
    "\x1b[36m(TrainController pid=32317)\x1b[0m [2026-12-02 01:05:52,025 E 32317 32355] "
    "core_worker.cc:2465: Actor with class name: 'PreemptionWatcher'",
    "2026-12-02 00:10:34,300\tINFO worker.py:2029 -- Started a local Ray instance.",
    "2026-12-02 00:10:31,312\tWARNING authentication_token_setup.py:85 -- Token authentication",
    "2026-12-02 00:10:34,868\tINFO logging_progress.py:225 -- Total Progress: 0/?",
    "00:10:35 INFO filelock: Lock 140 acquired on /root/.cache/x.lock",
    "00:10:35 WARNING transformers.modeling_utils: Some weights were not used",
    # the driver's own, when it dequantizes the embedded LLM on a machine's first run
    "Loading weights:   0%|          | 0/103 [00:00<?, ?it/s]\rLoading weights: 100%|"
    "##########| 103/103 [00:00<00:00, 8886.97it/s]",
    "Writing model shards:   0%|          | 0/1 [00:00<?, ?it/s]\rWriting model shards: 100%|"
    "##########| 1/1 [00:00<00:00, 11.99it/s]",
    "[2026-12-02 08:15:54,882] [WARNING] [real_accelerator.py:213:get_accelerator] Setting "
    "accelerator to CPU. If you have GPU or other accelerator, we were unable to detect it.",
    # the driver's own core worker, written to descriptor 2 by C++
    "[2026-12-02 02:52:35,209 E 27776 27776] core_worker.cc:2465: Actor with class name: "
    "'MapWorker(MapBatches(ItemTextEmbedder))' and ID: 'bd9bf6' has constructor arguments",
]
CF_LINE = "00:12:01 INFO allmrec.cf: epoch=1 loss=1.3944 epoch_seconds=0.6383"
VALIDATION_LINE = "00:20:13 INFO allmrec.stage2: validation prompts=1000 valid_rank_hit@1=0.51"
EVAL_LINE = "00:17:56 INFO allmrec.llm_evaluation: evaluate [1/1]: 100/100 prompts (2.51/s)"
TUNE_LINE = (
    "00:31:40 INFO allmrec.tune: 8c1d2_00001 (alpha=0.5, beta=0.2) epoch 2: "
    "valid_coldtext_hit@1=0.3900"
)
SHOWN = {  # line -> what the terminal shows (None: the line as it is)
    RAY + CF_LINE: CF_LINE,
    RAY + VALIDATION_LINE: VALIDATION_LINE,
    TUNE_LINE: None,
    "\x1b[36m(_evaluate_shard pid=29301)\x1b[0m " + EVAL_LINE: EVAL_LINE,
    "00:10:34 INFO allmrec.distributed.pipeline: data: running": None,
    "2026-12-02 00:10:34,300\tERROR worker.py:1 -- a Ray error stays visible": None,
    "00:10:35 ERROR transformers: so does another library's error": None,
    "| A-LLMRec (rank) | 100 | 0.5300 |": None,
    "INFO 2026-12-02 03:04:53,822 allmrec_Ingress clq 806a -- POST /recommend 200 4ms": None,
    "\x1b[36m(ServeReplica:allmrec:Ingress pid=27326)\x1b[0m INFO 2026-12-02 02:01:04,469 "
    "allmrec_Ingress va8yhr7a 8d4e -- POST /recommend 404 33.7ms": "INFO 2026-12-02 "
    "02:01:04,469 allmrec_Ingress va8yhr7a 8d4e -- POST /recommend 404 33.7ms",
    "allmrec: error: data/u.data line 3: expected 4 fields": None,
    "[2026-12-02 08:15:54,882] [ERROR] [engine.py:1:init] DeepSpeed's errors stay visible": None,
}


def test_ray_and_library_chatter_is_hidden_and_our_lines_are_shown():
    for line in HIDDEN:
        assert shown_on_terminal(line) is None, line
    for line, shown in SHOWN.items():
        assert shown_on_terminal(line) == (shown or line), line


def test_access_lines_stay_off_the_demo_terminal():
    """`allmrec serve` shows Serve's access lines (as uvicorn does); `allmrec demo` only logs
    them: its terminal is the chain's."""
    access = [line for line in SHOWN if " allmrec_Ingress " in line]
    assert len(access) == 2
    for line in access:
        assert shown_on_terminal(line) is not None
        assert shown_on_terminal(line, access_log=False) is None
    assert shown_on_terminal(RAY + CF_LINE, access_log=False) == CF_LINE


RAY_DATA_FAILURE = [
    "2026-12-04 04:21:15,786\tERROR streaming_executor_state.py:747 -- An exception was raised "
    'from a task of operator "ReadInteractionLog->SplitBlocks(4)". Dataset execution will now '
    "abort.",
    "Traceback (most recent call last):",
    '  File "/x/ray/data/_internal/execution/interfaces/physical_operator.py", line 337, in f',
    "StopIteration",
    "2026-12-04 04:21:15,786\tERROR exceptions.py:111 -- Full stack trace:",
    "Traceback (most recent call last):",
    "allmrec.data.readers.DataFormatError: x.json.gz line 17: expected valid gzip data",
    "Failed to apply UDF transform after 1/1 attempts (total backoff 0.0s).",
    "",
]


def test_ray_data_s_failure_and_its_traceback_stay_in_the_log(tmp_path):
    """A data error raised inside a Ray Data operator ends with allmrec's one line: Ray Data's
    record and traceback above it go to the log only (all of it on the terminal with -v)."""
    for verbose in (False, True):
        terminal = io.StringIO()
        saved = sys.stderr
        sys.stderr = terminal
        try:
            with quiet_console(verbose=verbose):
                write_log_to(tmp_path / f"v{verbose}" / "data.log")
                print("04:21:13 INFO allmrec.distributed.pipeline: data: running", file=sys.stderr)
                print("\n".join(RAY_DATA_FAILURE), file=sys.stderr)
                print(
                    "allmrec: error: x.json.gz line 17: expected valid gzip data", file=sys.stderr
                )
        finally:
            sys.stderr = saved
        shown = terminal.getvalue().splitlines()
        logged = (tmp_path / f"v{verbose}" / "data.log").read_text()
        assert all(line in logged for line in RAY_DATA_FAILURE if line)
        if verbose:
            assert "Traceback (most recent call last):" in shown
        else:
            assert shown == [
                "04:21:13 INFO allmrec.distributed.pipeline: data: running",
                "allmrec: error: x.json.gz line 17: expected valid gzip data",
            ]


def _run_command(tmp_path, verbose: bool) -> tuple[str, str]:
    terminal = io.StringIO()
    saved = sys.stdout
    sys.stdout = terminal
    try:
        with quiet_console(verbose=verbose):
            print(REPORT_LINE)
            write_log_to(tmp_path / "logs" / "demo.log")  # lines before this are kept for it
            print(next(iter(SHOWN)))
            sys.stdout.write("| a table | without its newline yet")
            print(" |")
            assert log_path() == tmp_path / "logs" / "demo.log"
    finally:
        sys.stdout = saved
    return terminal.getvalue(), (tmp_path / "logs" / "demo.log").read_text()


def test_the_terminal_gets_our_lines_and_the_log_file_every_line(tmp_path):
    terminal, logged = _run_command(tmp_path, verbose=False)
    assert terminal == f"{CF_LINE}\n| a table | without its newline yet |\n"
    assert "Reporting training result 1" in logged and CF_LINE in logged
    assert "\x1b[" not in logged  # colours stripped in the file
    assert log_path() is None  # the command is over


def test_verbose_shows_every_line(tmp_path):
    terminal, _ = _run_command(tmp_path, verbose=True)
    assert "Reporting training result 1" in terminal


def test_what_cpp_writes_to_descriptor_2_passes_the_filter_too(tmp_path, capfd):
    """Ray's core worker writes to file descriptor 2 itself, past sys.stderr: in the block the
    descriptor is a pipe into the filter, after it the terminal's again."""
    import os

    cpp_error = "[2026-12-02 02:52:35,209 E 27776 27776] core_worker.cc:2465: restart caveat\n"
    cpp_fatal = "[2026-12-02 02:52:35,209 F 27776 27776] core_worker.cc:9: check failed\n"
    with quiet_console():
        write_log_to(tmp_path / "logs" / "x.log")
        for line in (cpp_error, cpp_fatal, "a C library's own line\n"):
            os.write(2, line.encode())
    os.write(2, b"after the block\n")
    terminal = capfd.readouterr().err
    assert terminal == cpp_fatal + "a C library's own line\n" + "after the block\n"
    logged = (tmp_path / "logs" / "x.log").read_text()
    assert cpp_error in logged and cpp_fatal in logged and "after the block" not in logged


def test_progress_lines_have_the_format_of_every_other_line(capsys):
    """A stage's progress line (what Train workers and the Tune driver print) is a record in
    the driver's logging format, shown on the terminal whether it came forwarded or not."""
    import logging
    import re

    from allmrec.console import say

    say("stage2", "epoch 1 step 10/150 loss 1.2209")
    line = capsys.readouterr().out.rstrip("\n")
    formatter = logging.Formatter(  # allmrec.cli.setup_logging's
        "%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    record = logging.LogRecord("allmrec.stage2", logging.INFO, "", 0, "x", None, None)
    driver = formatter.format(record)
    assert re.sub(r"^\d\d:\d\d:\d\d", "", line).startswith(
        re.sub(r"^\d\d:\d\d:\d\d|x$", "", driver)
    )
    assert line.endswith(": epoch 1 step 10/150 loss 1.2209")
    assert shown_on_terminal(line) == line
    assert shown_on_terminal(RAY + line) == line
