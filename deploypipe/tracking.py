"""The only module that talks to MLflow.

One parent run per pipeline, one nested child run per stage. Params are the flattened config;
tags name the stage, the git commit and the versions; metrics are buffered and sent with
``log_batch``; a stage's files (model with its reload spec, CSV tables, PNG plots) are uploaded once
the stage's output directory is final. Every MLflow call is timed (``Tracker.seconds``) so the
overhead can be measured (bench/tracking_overhead.py).

Default store: ``sqlite:///<workdir>/mlflow.db`` with artifacts in ``<workdir>/mlartifacts`` —
no server needed. ``--tracking-uri`` or MLFLOW_TRACKING_URI select another store.
"""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Any, Optional
from urllib.parse import urlparse

from .errors import InputError, TrackingUnavailable, check_writable  # noqa: F401 (TrackingUnavailable: re-exported)

MAX_METRICS_PER_BATCH = 1000
MAX_PARAMS_PER_BATCH = 100
MAX_PARAM_LENGTH = 6000
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
FLUSH_SECONDS = 15.0  # buffered metrics go out at least this often, so curves update while a stage runs
# MLflow's HTTP client retries 7 times with a growing back-off (minutes against a dead server): a pipeline
# keeps a short leash unless the user set these
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                 "MLFLOW_HTTP_REQUEST_TIMEOUT": "15"}


def _unreachable(err: BaseException) -> bool:
    """Whether ``err`` says the server cannot be reached (as opposed to a refused request)."""
    import requests

    if isinstance(err, (requests.ConnectionError, requests.Timeout, ConnectionError, TimeoutError)):
        return True
    text = str(err)
    return any(s in text for s in ("Max retries exceeded", "Connection refused", "Failed to establish a new connection",
                                   "Read timed out", "RemoteDisconnected", "Connection aborted"))


def default_uri(workdir: Path) -> str:
    return f"sqlite:///{Path(workdir).resolve() / 'mlflow.db'}"


def resolve_uri(cli_uri: Optional[str], config_uri: Optional[str], workdir: Path) -> str:
    """--tracking-uri, then MLFLOW_TRACKING_URI, then the pipeline's tracking.uri, then local sqlite."""
    return cli_uri or os.environ.get("MLFLOW_TRACKING_URI") or config_uri or default_uri(workdir)


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Fail early (exit 2, nothing written) when the tracking store cannot be used."""
    parsed = urlparse(uri)
    scheme = parsed.scheme.split("+")[0]  # postgresql+psycopg2 -> postgresql
    if uri == "databricks" or scheme in ("databricks", "postgresql", "mysql", "mssql"):
        return  # database-backed stores are checked when MLflow connects
    if scheme in ("http", "https"):
        _check_server(uri, timeout)
    elif scheme == "sqlite":
        path = uri.split(":///", 1)[1] if ":///" in uri else ""
        folder = Path(path).parent
        if path and path != ":memory:" and not folder.is_dir():
            raise InputError(f"the folder of the sqlite tracking store '{uri}' does not exist",
                             f"create {folder} or point the URI at an existing folder")
        if path and path != ":memory:":  # sqlite writes a journal beside the store
            check_writable(folder, "the folder of the sqlite tracking store", "point --tracking-uri at a writable "
                           "folder (sqlite:///PATH/mlflow.db) or make it writable")
    elif scheme in ("", "file"):
        raise InputError(f"tracking URI '{uri}' is a plain file store, which MLflow 3 no longer writes by default",
                         "use sqlite:///PATH/mlflow.db or an http(s):// server")
    else:
        raise InputError(f"tracking URI '{uri}' has an unsupported scheme '{parsed.scheme}'",
                         "use sqlite:///PATH/mlflow.db or http://HOST:PORT")


def _check_server(uri: str, timeout: float) -> None:
    import requests

    verify: Any = True
    if os.environ.get("MLFLOW_TRACKING_INSECURE_TLS", "").lower() == "true":
        verify = False
    elif os.environ.get("MLFLOW_TRACKING_SERVER_CERT_PATH"):
        verify = os.environ["MLFLOW_TRACKING_SERVER_CERT_PATH"]
    headers, auth = {}, None
    if os.environ.get("MLFLOW_TRACKING_TOKEN"):
        headers["Authorization"] = f"Bearer {os.environ['MLFLOW_TRACKING_TOKEN']}"
    elif os.environ.get("MLFLOW_TRACKING_USERNAME"):
        auth = (os.environ["MLFLOW_TRACKING_USERNAME"], os.environ.get("MLFLOW_TRACKING_PASSWORD", ""))
    base = uri.rstrip("/")
    try:
        resp = requests.get(base + "/health", timeout=timeout, verify=verify)
    except requests.RequestException as err:
        raise InputError(f"tracking server {uri} is unreachable ({type(err).__name__})",
                         "start it (mlflow/launch.sh or 'deploypipe ui'), or drop --tracking-uri / "
                         "MLFLOW_TRACKING_URI to use the local sqlite store") from None
    if resp.status_code >= 400 and resp.status_code not in (401, 403, 404):
        raise InputError(f"tracking server {uri} answered HTTP {resp.status_code} to /health",
                         "check that the URI points at an MLflow server")
    # /health needs no login on recent servers: ask an authenticated endpoint with the user's credentials
    try:
        resp = requests.get(base + "/api/2.0/mlflow/experiments/search", params={"max_results": 1},
                            auth=auth, headers=headers, timeout=timeout, verify=verify)
    except requests.RequestException as err:
        raise InputError(f"tracking server {uri} stopped answering ({type(err).__name__})",
                         "check the server and retry") from None
    if resp.status_code == 401:
        if auth or headers:  # credentials were sent and refused: a wrong name, password or token
            raise InputError(f"tracking server {uri} refused the login: authentication failed (HTTP 401)",
                             "check MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN)")
        raise InputError(f"tracking server {uri} requires a login (HTTP 401)",
                         "set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN)")
    if resp.status_code == 403:
        raise InputError(f"tracking server {uri} refused the credentials (HTTP {resp.status_code})",
                         "set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN)")


def flatten(d: Any, prefix: str = "") -> dict[str, str]:
    """{'a': {'b': 1}, 'c': [1, 2]} -> {'a.b': '1', 'c': '[1, 2]'} (MLflow param strings)."""
    out: dict[str, str] = {}
    if isinstance(d, dict):
        for k, v in d.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    else:
        out[prefix] = str(d)[:MAX_PARAM_LENGTH]
    return out


def _git_commit(path: Path) -> Optional[str]:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=path, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def version_tags() -> dict[str, str]:
    import mlflow
    import torch

    import deploypipe

    tags = {"deploypipe.version": deploypipe.__version__, "torch.version": torch.__version__,
            "mlflow.version": mlflow.__version__, "python.version": platform.python_version()}
    source = Path(deploypipe.__file__).resolve().parent.parent
    own = _git_commit(source) if (source / "pyproject.toml").is_file() else None  # a source checkout only
    if own:
        tags["deploypipe.git_commit"] = own
    user = _git_commit(Path.cwd())
    if user:
        tags["mlflow.source.git.commit"] = user
    return tags


@contextlib.contextmanager
def _store_lock(uri: str):
    """An exclusive lock file beside a sqlite store (``<db>.lock``) while it is created or migrated and
    the experiment looked up: MLflow's migrations are not safe when several processes open a new store
    at once ("duplicate column name"). Other stores: no lock (the server serialises)."""
    path = uri.split(":///", 1)[1] if uri.startswith("sqlite:///") else ""
    if not path or path == ":memory:":
        yield
        return
    try:
        import fcntl
    except ImportError:  # not POSIX
        yield
        return
    try:
        fh = open(f"{path}.lock", "a")
    except OSError:  # a read-only folder: the store's own error will say more
        yield
        return
    with fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


class Tracker:
    """A pipeline's MLflow parent run and the client every call goes through."""

    def __init__(self, uri: str, experiment: str, artifact_root: Optional[Path] = None):
        for name in ("alembic", "mlflow.store", "mlflow.tracking", "mlflow.utils"):
            logging.getLogger(name).setLevel(logging.WARNING)
        logging.getLogger("urllib3.connectionpool").setLevel(logging.ERROR)  # one line from us, not retry chatter
        for key, value in HTTP_DEFAULTS.items():
            os.environ.setdefault(key, value)
        self.offline: Optional[str] = None  # why the server stopped answering, once it has
        self.seconds = 0.0  # inside MLflow calls (runs, params, metrics, artifacts)
        self.calls = 0
        t0 = time.perf_counter()
        from mlflow import MlflowClient

        self.uri = uri
        with _store_lock(uri):  # one process at a time creates a new sqlite store's tables and the experiment
            self.client = MlflowClient(tracking_uri=uri)
            exp = self.client.get_experiment_by_name(experiment)
            if exp is None:
                location = artifact_root.resolve().as_uri() if (artifact_root and uri.startswith("sqlite")) else None
                try:
                    self.experiment_id = self.client.create_experiment(
                        experiment, artifact_location=location,
                        tags={EXPERIMENT_KIND_TAG: "custom_model_development"})
                except Exception as err:  # another process (or a server's other client) made it first
                    if "already exists" not in str(err).lower() and "RESOURCE_ALREADY_EXISTS" not in str(err):
                        raise
                    exp = self.client.get_experiment_by_name(experiment)
            if exp is not None:
                self.experiment_id = exp.experiment_id
                if EXPERIMENT_KIND_TAG not in exp.tags:  # open the UI's model-training view, not the GenAI one
                    self.client.set_experiment_tag(self.experiment_id, EXPERIMENT_KIND_TAG, "custom_model_development")
        self.setup_seconds = time.perf_counter() - t0  # import, store connection/migrations, experiment
        self.run_id: Optional[str] = None

    def call(self, fn: str, *args: Any, **kwargs: Any) -> Any:
        if self.offline:
            raise TrackingUnavailable(self.offline)
        t0 = time.perf_counter()
        try:
            return getattr(self.client, fn)(*args, **kwargs)
        except Exception as err:
            if _unreachable(err):
                self.offline = f"tracking server {self.uri} unreachable ({type(err).__name__})"
                raise TrackingUnavailable(self.offline) from None
            raise
        finally:
            self.seconds += time.perf_counter() - t0
            self.calls += 1

    def start_pipeline(self, name: str, config: dict, tags: Optional[dict] = None) -> str:
        self.versions = version_tags()
        run = self.call("create_run", self.experiment_id, run_name=name,
                        tags={"deploypipe.pipeline": name, "deploypipe.kind": "pipeline", **self.versions,
                              **(tags or {})})
        self.run_id = run.info.run_id
        self._log_params(self.run_id, config)
        return self.run_id

    def _log_params(self, run_id: str, config: dict) -> None:
        from mlflow.entities import Param

        params = [Param(k, v) for k, v in flatten(config).items()]
        for i in range(0, len(params), MAX_PARAMS_PER_BATCH):
            self.call("log_batch", run_id, params=params[i:i + MAX_PARAMS_PER_BATCH])

    def stage(self, stage_id: str, stage_name: str, config: dict, tags: Optional[dict] = None) -> "StageTracker":
        run = self.call("create_run", self.experiment_id, run_name=stage_id,
                        tags={"mlflow.parentRunId": self.run_id, "deploypipe.stage": stage_name,
                              "deploypipe.stage_id": stage_id, "deploypipe.kind": "stage", **self.versions,
                              **(tags or {})})
        self._log_params(run.info.run_id, config)
        return StageTracker(self, run.info.run_id)

    def log_artifact(self, path: Path, artifact_path: Optional[str] = None) -> None:
        self.call("log_artifact", self.run_id, str(path), artifact_path)

    def log_metrics(self, metrics: dict[str, float]) -> None:
        """Metrics of the pipeline run itself (its stages' headline figures)."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, 0) for k, v in metrics.items()]
        for i in range(0, len(batch), MAX_METRICS_PER_BATCH):
            self.call("log_batch", self.run_id, metrics=batch[i:i + MAX_METRICS_PER_BATCH])

    def end_stale_runs(self, outputs: str) -> int:
        """Mark KILLED the pipeline runs of this output folder (and their stage runs) left RUNNING by a
        process that was killed outright (SIGKILL, a lost node); returns how many."""
        query = f"tags.`deploypipe.outputs` = '{outputs}' and attributes.status = 'RUNNING'"
        stale = self.call("search_runs", [self.experiment_id], query)
        count = 0
        for run in stale:
            children = self.call("search_runs", [self.experiment_id],
                                 f"tags.mlflow.parentRunId = '{run.info.run_id}' and attributes.status = 'RUNNING'")
            for r in [*children, run]:
                self.call("set_terminated", r.info.run_id, "KILLED")
                count += 1
        return count

    def end_pipeline(self, status: str) -> None:
        if self.run_id and not self.offline:
            self.call("set_terminated", self.run_id, status)


def log_files(uri: str, run_id: str, paths: list[Path], timeout: float = 5.0) -> str:
    """Log files to an existing run (``deploypipe report`` on a finished pipeline); returns a line
    saying where they went, or why they did not (the files stay on disk either way)."""
    try:
        check_reachable(uri, timeout)
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=uri)
        for path in paths:
            client.log_artifact(run_id, str(path))
    except Exception as err:  # noqa: BLE001 — a tracking failure must not lose the report files
        return f"not logged to MLflow ({type(err).__name__}: {str(err).splitlines()[0][:160] if str(err) else ''})"
    return f"logged to MLflow run {run_id}"


def set_model_alias(uri: str, name: str, version: str, alias: str) -> None:
    """Point ``alias`` of registered model ``name`` at ``version`` (``deploypipe promote``)."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient(tracking_uri=uri)
    try:
        client.get_model_version(name, version)
    except MlflowException:
        raise InputError(f"registered model '{name}' has no version {version} in {uri}",
                         "check the name and version (the export stage's registered_version)") from None
    client.set_registered_model_alias(name, alias, version)


class StageTracker:
    """A stage's child run: buffered metrics, artifacts, final status."""

    def __init__(self, tracker: Tracker, run_id: str):
        self.tracker = tracker
        self.run_id = run_id
        self._buffer: list = []
        self._latest: dict[str, tuple[int, float]] = {}
        self._flushed_at = time.monotonic()

    def log_summary(self, metrics: dict[str, float]) -> None:
        """Final metrics at the last step used, leaving out values a curve already ends with."""
        step = max((s for s, _ in self._latest.values()), default=0)
        self.log_metrics({k: v for k, v in metrics.items() if self._latest.get(k, (None, None))[1] != float(v)}, step)

    def log_metrics(self, metrics: dict[str, float], step: Optional[int] = None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._buffer += [Metric(k, float(v), now, step or 0) for k, v in metrics.items()]
        self._latest.update({k: (step or 0, float(v)) for k, v in metrics.items()})
        if len(self._buffer) >= MAX_METRICS_PER_BATCH or time.monotonic() - self._flushed_at > FLUSH_SECONDS:
            self.flush()

    def flush(self) -> None:
        self._flushed_at = time.monotonic()
        while self._buffer:
            batch, self._buffer = self._buffer[:MAX_METRICS_PER_BATCH], self._buffer[MAX_METRICS_PER_BATCH:]
            self.tracker.call("log_batch", self.run_id, metrics=batch)

    def set_tags(self, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        self.tracker.call("log_batch", self.run_id, tags=[RunTag(k, str(v)[:5000]) for k, v in tags.items()])

    def log_artifacts(self, directory: Path) -> None:
        self.tracker.call("log_artifacts", self.run_id, str(directory))

    def register_model(self, name: str, artifact_path: str, tags: dict[str, str], alias: Optional[str]) -> str:
        """A new version of registered model ``name`` (created when new) whose source is this run's
        artifact folder ``artifact_path`` (``register_model`` wants a logged model; a plain artifact
        folder goes through ``create_model_version``), with ``tags`` and ``alias``; its version."""
        from mlflow.exceptions import MlflowException

        try:
            self.tracker.call("create_registered_model", name)
        except MlflowException as err:
            if "already exists" not in str(err).lower() and "RESOURCE_ALREADY_EXISTS" not in str(err):
                raise
        run = self.tracker.call("get_run", self.run_id)
        source = f"{run.info.artifact_uri.rstrip('/')}/{artifact_path}"
        mv = self.tracker.call("create_model_version", name, source, run_id=self.run_id,
                               tags={k: str(v)[:5000] for k, v in tags.items()})
        if alias:
            self.tracker.call("set_registered_model_alias", name, alias, mv.version)
        return str(mv.version)

    def end(self, status: str, error: Optional[str] = None) -> None:
        if error:
            self.set_tags({"deploypipe.error": error})
        self.flush()
        self.tracker.call("set_terminated", self.run_id, status)
