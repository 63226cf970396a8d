"""Starting the Serve app from Python: `allmrec serve` and the last step of `make demo`.

Reads a Serve config (default `serve_app/config.yaml`, the same file `serve run` / `serve
deploy` take), with the run directory, host and port overridable, builds the application its
`import_path` names (as `serve run` does, so the library never imports the app package), starts
Serve on the current Ray and waits until `/readyz` answers.
"""

from __future__ import annotations

import copy
import importlib
import inspect
import json
import time
import urllib.error
import urllib.request
from pathlib import Path

import yaml
from pydantic import BaseModel
from ray import serve

from allmrec.storage import RunStorage

DEFAULT_CONFIG = Path(__file__).parents[2] / "serve_app" / "config.yaml"


def load_serve_config(
    path: str | Path | None = None,
    run_dir: str | Path | None = None,
    host: str | None = None,
    port: int | None = None,
) -> dict:
    path = Path(path or DEFAULT_CONFIG)
    config = yaml.safe_load(path.read_text())
    if not isinstance(config, dict) or len(config.get("applications", [])) != 1:
        raise ValueError(f"{path}: expected a Serve config with exactly one application")
    config = copy.deepcopy(config)
    app = config["applications"][0]
    if run_dir is not None:
        app["args"]["run_dir"] = RunStorage.open(run_dir).home
    http = config.setdefault("http_options", {})
    if host is not None:
        http["host"] = host
    if port is not None:
        http["port"] = port
    return config


def start(config: dict, timeout_s: float = 300) -> str:
    """Run the app of `config` on the current Ray; returns its URL once /readyz says ready."""
    app_config = config["applications"][0]
    build_app = _imported(app_config.get("import_path", "serve_app.app:build_app"))
    run = RunStorage.open(app_config["args"]["run_dir"])
    if not run.has("stage2"):
        raise FileNotFoundError(
            f"{run.uri('stage2', 'manifest.json')}: no trained stack in {run.home}; run "
            "`make demo` or `allmrec train stage2` first, or pass --run-dir"
        )
    http = config.get("http_options", {})
    host, port = http.get("host", "127.0.0.1"), int(http.get("port", 8000))
    serve.start(http_options={"host": host, "port": port})
    args = {**app_config["args"], "deployments": app_config.get("deployments", [])}
    serve.run(
        build_app(_validated(build_app, args)),
        name=app_config.get("name", "allmrec"),
        route_prefix=app_config.get("route_prefix", "/"),
        # the config's own (e.g. `enable_access_log: false`), as `serve run` would apply it
        logging_config=app_config.get("logging_config"),
        blocking=False,
    )
    url = f"http://{host}:{port}"
    wait_ready(url, timeout_s)
    return url


def stop() -> None:
    """Shut down Serve's applications and controller on the current Ray."""
    serve.shutdown()


def wait_ready(url: str, timeout_s: float) -> dict:
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/readyz", timeout=10) as response:
                return json.loads(response.read())
        except (urllib.error.URLError, ConnectionError, TimeoutError) as exc:
            last = exc
            time.sleep(1)
    raise TimeoutError(f"{url}/readyz not ready after {timeout_s:.0f} s ({last})")


def _imported(import_path: str):
    """The application builder that a Serve config's `import_path` ("module:attribute") names."""
    module, _, attribute = import_path.partition(":")
    if not module or not attribute:
        raise ValueError(f"Serve config import_path {import_path!r}: expected module:attribute")
    return getattr(importlib.import_module(module), attribute)


def _validated(builder, args: dict):
    """`args` as the builder takes them: its pydantic model when it annotates one, as `serve
    run` does, else the dict."""
    parameters = list(inspect.signature(builder).parameters.values())
    model = parameters[0].annotation if len(parameters) == 1 else None
    if inspect.isclass(model) and issubclass(model, BaseModel):
        return model.model_validate(args)
    return args
