"""The command line: run a pipeline, one command per stage, list stages, the demo, the UI.

Exit codes: 0 success, 1 a stage failed (its MLflow run is FAILED, earlier results kept),
2 bad usage, config or input (one line naming the problem and the fix; nothing written).
"""

from __future__ import annotations

import json
import subprocess
import sys
import types
import typing
from pathlib import Path
from typing import Any, Callable, Optional

import click
import yaml

from .config import PipelineConfig, load_pipeline, validate
from .errors import InputError, StageFailed, TrackingUnavailable

EXAMPLES_DIR = Path(__file__).resolve().parent.parent / "examples"
UI_VIEW = "?workflowType=machine_learning"  # MLflow 3's UI opens its GenAI view otherwise


def _demo_yaml() -> Path:
    """examples/demo.yaml: from the source checkout (editable install), else the installed package data."""
    if (EXAMPLES_DIR.parent / "pyproject.toml").is_file() and (EXAMPLES_DIR / "demo.yaml").is_file():
        return EXAMPLES_DIR / "demo.yaml"
    try:
        from importlib.resources import files

        path = Path(str(files("deploypipe.examples") / "demo.yaml"))
    except (ModuleNotFoundError, TypeError):
        path = None
    if path is None or not path.is_file():
        raise InputError("examples/demo.yaml is not installed", "reinstall deploypipe (pip install -e .)")
    return path


# --------------------------------------------------------------------------- common options
def common_params() -> list[click.Option]:
    return [
        click.Option(["--workdir"], type=click.Path(file_okay=False, path_type=Path), default=Path("runs"),
                     show_default=True, help="where the MLflow store (mlflow.db, mlartifacts/) and outputs live"),
        click.Option(["--tracking-uri"], default=None, help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, "
                     "then sqlite:///<workdir>/mlflow.db)"),
        click.Option(["--experiment"], default=None, help="MLflow experiment name"),
        click.Option(["--device"], default=None, help="auto | cpu | cuda | cuda:N"),
        click.Option(["--seed"], type=int, default=None, help="seed of training and sampling"),
        click.Option(["--json", "as_json"], is_flag=True, help="print a JSON summary (metrics, artifact paths) as the "
                                                               "last line"),
        click.Option(["--trust-factory", "trust_factory"], multiple=True, metavar="PKG.MODULE:FACTORY",
                     help="a user factory that a saved model folder may name and deploypipe may call (repeatable); "
                          "without it a model folder cannot run code"),
    ]


def common_options(fn: Callable) -> Callable:
    fn.__click_params__ = [*getattr(fn, "__click_params__", []), *reversed(common_params())]
    return fn


def _execute(cfg: PipelineConfig, options: Any, as_json: bool) -> None:
    """Run ``cfg`` with ``options`` (a deploypipe.pipeline.RunOptions) and print the summary."""
    from .distributed import is_main_process
    from .pipeline import Pipeline

    summary = Pipeline(cfg, options).run()
    if is_main_process():  # under torchrun rank 0 speaks for all
        _print_summary(summary, options.workdir, as_json)


def _options(workdir: Path, tracking_uri: Optional[str], experiment: Optional[str], device: Optional[str],
             seed: Optional[int], where: str, **more: Any) -> Any:
    from .pipeline import RunOptions

    return RunOptions(workdir=workdir, tracking_uri=tracking_uri, experiment=experiment, device=device, seed=seed,
                      show_progress=True, where=where, **more)


def _print_summary(summary: Any, workdir: Path, as_json: bool) -> None:
    from rich.console import Console
    from rich.table import Table

    stream = sys.stderr if as_json else sys.stdout
    console = Console(stderr=as_json, width=None if stream.isatty() else 160)  # piped: not cut at 80 columns
    table = Table(title=f"pipeline '{summary.name}' — {summary.seconds:.1f} s")
    for col in ("stage", "status", "seconds", "metrics", "output"):
        table.add_column(col)
    registry = _registered()  # the pipeline imported its stages

    for s in summary.stages:
        wanted = registry[s.stage].headline if s.stage in registry else ()
        shown_metrics = {k: s.metrics[k] for k in wanted if k in s.metrics} or dict(list(s.metrics.items())[:8])
        shown = "\n".join(f"{k} {_fmt(v)}" for k, v in shown_metrics.items())
        table.add_row(s.id, s.status, f"{s.seconds:.1f}", shown, s.model or s.dir or "")
    console.print(table)
    if summary.rechecked:
        console.print("every stage was finished with these settings: nothing rerun, no new MLflow run "
                      "(--force reruns)")
    page = f"#/experiments/{summary.experiment_id}/runs/{summary.run_id}{UI_VIEW}"
    if summary.tracking_uri.startswith("sqlite"):
        console.print(f"MLflow store: {summary.tracking_uri}\nUI: deploypipe ui --workdir {workdir}   "
                      f"then open http://127.0.0.1:5000/{page}", soft_wrap=True)
    else:
        console.print(f"MLflow: {summary.tracking_uri.rstrip('/')}/{page}", soft_wrap=True)
    if as_json:
        click.echo(json.dumps(summary.to_json()))


def _fmt(v: float) -> str:
    if float(v).is_integer():
        return f"{int(v):,}"
    return f"{v:.4f}" if abs(v) < 1000 else f"{v:,.0f}"


def _registered() -> dict[str, Any]:
    """The stages registered with deploypipe.stage.register in this process, when it has been imported."""
    module = sys.modules.get("deploypipe.stage")
    return dict(module.REGISTRY) if module is not None else {}


def _stage_facts() -> dict[str, tuple[str, type]]:
    """{stage: (help, config class)}: the declared stages and those registered in this process."""
    from .stage_index import load, stage_index

    facts = {name: (info.help, load(info.config)) for name, info in stage_index().items()}
    for name, sdef in _registered().items():
        facts.setdefault(name, (sdef.help, sdef.config))
    return facts


class _Lazy(click.Group):
    """Adds one command per registered stage when the CLI is first used."""

    def _ensure(self) -> None:
        if getattr(self, "_loaded", False):
            return
        self._loaded = True
        from .stage_index import load, stage_index

        for name, info in stage_index().items():  # from the stage packages' declarations: no torch
            if name not in self.commands:
                options, intercept = load(info.options) if info.options else ([], None)
                self.add_command(_stage_command(name, load(info.config), info.help, options, intercept))
            for ref in info.commands:
                command = load(ref)
                if command.name not in self.commands:
                    self.add_command(command)
        for name, sdef in _registered().items():  # stages registered in this process (a plugin, a test)
            if name not in self.commands:
                self.add_command(_stage_command(name, sdef.config, sdef.help))

    def list_commands(self, ctx: click.Context) -> list[str]:
        self._ensure()
        return super().list_commands(ctx)

    def get_command(self, ctx: click.Context, name: str) -> Optional[click.Command]:
        if name not in self.commands:
            self._ensure()
        return super().get_command(ctx, name)



# --------------------------------------------------------------------------- group
@click.group(cls=_Lazy, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(package_name="deploypipe")
def cli() -> None:
    """deploypipe: make a trained PyTorch model ship — smaller, faster, certified, tracked in MLflow.

    \b
    Examples:
      deploypipe demo                                   # the demo pipeline on the embedded digits
      deploypipe run examples/demo.yaml --workdir runs  # a YAML pipeline
      deploypipe train --model zoo:resnet20 --data imagefolder:../shared/data/cifar10 --epochs 15
      deploypipe evaluate --model runs/train/train/model --data imagefolder:../shared/data/cifar10
      deploypipe report runs/demo                       # every artifact of a pipeline side by side
      deploypipe stages                                 # every stage and its options
      deploypipe ui                                     # MLflow UI on http://127.0.0.1:5000
    """


@cli.command("run")
@click.argument("pipeline", type=click.Path(path_type=Path))
@click.option("--stage", "only", multiple=True, help="run only this stage id (repeatable); earlier stages must be "
                                                     "finished")
@click.option("--force", is_flag=True, help="rerun stages even when their config and inputs are unchanged")
@common_options
def run_cmd(pipeline: Path, only: tuple[str, ...], force: bool, workdir: Path, tracking_uri: Optional[str],
            experiment: Optional[str], device: Optional[str], seed: Optional[int], as_json: bool,
            trust_factory: tuple[str, ...]) -> None:
    """Run a pipeline YAML; finished stages with unchanged config and inputs are skipped.

    \b
    Outputs land in <workdir>/<pipeline name>/<stage id>/ (result.json, model/, tables, plots).
    Examples:
      deploypipe run examples/demo.yaml
      deploypipe run pipeline.yaml --stage evaluate --force
      deploypipe run pipeline.yaml --tracking-uri http://127.0.0.1:5000 --json
    """
    cfg = load_pipeline(pipeline)
    _execute(cfg, _options(workdir, tracking_uri, experiment, device, seed, str(pipeline), only=list(only) or None,
                           force=force, trusted_factories=list(trust_factory)), as_json)


@cli.command("demo")
@click.option("--force", is_flag=True, help="rerun even finished stages")
@common_options
def demo_cmd(force: bool, workdir: Path, tracking_uri: Optional[str], experiment: Optional[str],
             device: Optional[str], seed: Optional[int], as_json: bool, trust_factory: tuple[str, ...]) -> None:
    """Run examples/demo.yaml on the embedded digits data (offline).

    \b
    Example:
      deploypipe demo && deploypipe ui
    """
    path = _demo_yaml()
    cfg = load_pipeline(path)
    _execute(cfg, _options(workdir, tracking_uri, experiment, device, seed, str(path), force=force,
                           trusted_factories=list(trust_factory)), as_json)


@cli.command("stages")
@click.option("--json", "as_json", is_flag=True, help="machine-readable list")
def stages_cmd(as_json: bool) -> None:
    """List the stages and their options (the keys of a pipeline's stage entries).

    \b
    Examples:
      deploypipe stages
      deploypipe stages --json | python -m json.tool
    """
    out = {name: {"help": help_text, "options": _schema_rows(config)}
           for name, (help_text, config) in sorted(_stage_facts().items())}
    if as_json:
        click.echo(json.dumps(out))
        return
    from rich.console import Console
    from rich.table import Table

    console = Console()
    for name, info in out.items():
        table = Table(title=f"{name} — {info['help']}", title_justify="left")
        for col in ("option", "type", "default", "description"):
            table.add_column(col)
        for row in info["options"]:
            table.add_row(row["name"], row["type"], row["default"], row["description"])
        console.print(table)


def type_name(ann: Any) -> str:
    """A field's type as a user reads it: int, float | null, rtn | adaquant, list[int]."""
    origin, args = typing.get_origin(ann), typing.get_args(ann)
    if origin is typing.Literal:
        return " | ".join(map(str, args))
    if origin in (typing.Union, types.UnionType):
        inner = [type_name(a) for a in args if a is not type(None)]
        return " | ".join(inner + (["null"] if type(None) in args else []))
    if origin in (list, dict):
        return f"{origin.__name__}[{', '.join(type_name(a) for a in args)}]"
    return getattr(ann, "__name__", None) or str(ann).replace("typing.", "")


def _schema_rows(schema: type) -> list[dict]:
    rows = []
    for name, f in schema.model_fields.items():
        tname = type_name(f.annotation)
        default = f.get_default(call_default_factory=True)
        rows.append({"name": name, "type": tname, "default": json.dumps(default, default=str),
                     "description": f.description or ""})
    return rows


@cli.command("report")
@click.argument("pipeline_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--trust-factory", multiple=True,
              help="a user model factory (module:callable) the model folders may name")
@click.option("--no-tracking", is_flag=True, help="write the files only; do not log them to the pipeline's MLflow run")
def report_cmd(pipeline_dir: Path, trust_factory: tuple[str, ...], no_tracking: bool) -> None:
    """Every model a pipeline produced side by side: size, BOPs, latency, top-1, certified accuracy, ACR.

    \b
    Writes report.md, report.csv and report.png into PIPELINE_DIR and logs them to the pipeline's
    MLflow run (the run of the folder's result.json files). 'deploypipe run' writes it at the end.
    Example:
      deploypipe report runs/cifar-ship
    """
    if not pipeline_dir.is_dir():
        raise InputError(f"no pipeline folder at {pipeline_dir}", "give the folder 'deploypipe run' wrote (its --out, "
                                                                  "e.g. runs/demo)")
    from .report import collect, write_report

    try:
        files = write_report(pipeline_dir, trusted=list(trust_factory))
    except ValueError as err:
        raise InputError(*str(err).split(" — fix: ", 1)) from None
    if not files:
        raise InputError(f"{pipeline_dir} holds no finished stage", "run the pipeline first")
    click.echo((pipeline_dir / "report.md").read_text())
    _, tracking = collect(pipeline_dir)
    if not no_tracking and tracking.get("pipeline_run_id"):
        from .tracking import log_files

        where = log_files(tracking["tracking_uri"], tracking["pipeline_run_id"], files)
        click.echo(f"report files: {', '.join(str(f) for f in files)}; {where}", err=True)
    else:
        click.echo(f"report files: {', '.join(str(f) for f in files)}", err=True)


@cli.command("ui")
@click.option("--workdir", type=click.Path(file_okay=False, path_type=Path), default=Path("runs"), show_default=True,
              help="the work directory whose mlflow.db to serve")
@click.option("--host", default="127.0.0.1", show_default=True, help="address to bind (keep 127.0.0.1 unless behind a "
                                                                     "proxy)")
@click.option("--port", type=int, default=5000, show_default=True)
def ui_cmd(workdir: Path, host: str, port: int) -> None:
    """Serve the local MLflow store of a work directory with `mlflow server` on 127.0.0.1 (no logins: keep it there).

    \b
    Example:
      deploypipe demo && deploypipe ui --port 5000   # then open http://127.0.0.1:5000
    """
    if not _loopback(host):  # before anything else: the user should see this even when the start fails
        click.echo(f"warning: --host {host} serves this work directory's runs and artifacts with no authentication to "
                   f"every machine that can reach port {port} (anyone there can read, change and delete them) — keep "
                   "127.0.0.1 and use an SSH tunnel, or run the team server with logins (mlflow/launch.sh)", err=True)
    db = workdir / "mlflow.db"
    if not db.is_file():
        raise InputError(f"no MLflow store at {db}", "run a pipeline first (deploypipe demo) or pass --workdir")
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{db.resolve()}",
           "--artifacts-destination", str((workdir / "mlartifacts").resolve()), "--host", host,
           "--port", str(port), "--workers", "1"]
    url = f"http://{host}:{port}"
    click.echo(f"starting the MLflow server for {workdir} on {url} ...", err=True)
    server = subprocess.Popen(cmd, start_new_session=True)  # its own process group: stopped as one (uvicorn, workers)
    try:
        if _wait_until_serving(url, server):
            click.echo(f"MLflow UI ready: {url}/#/experiments{UI_VIEW}  (Ctrl-C to stop)", err=True)
        code = server.wait()
        if code:
            click.echo(f"error: the MLflow server exited with code {code} — fix: see its messages above (is port "
                       f"{port} taken? try --port)", err=True)
        raise SystemExit(2 if code else 0)
    except KeyboardInterrupt as err:  # Ctrl-C or SIGTERM (Terminated): stop the whole server group
        _stop_group(server)
        click.echo("MLflow server stopped", err=True)
        raise SystemExit(143 if isinstance(err, Terminated) else 0)


def _loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name other than localhost: may resolve to anything
        return False


def _wait_until_serving(url: str, server: subprocess.Popen, timeout: float = 300.0) -> bool:
    """Poll the server's /health until it answers (True), it exits, or ``timeout`` passes."""
    import time
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and server.poll() is None:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as reply:
                if reply.status == 200:
                    return True
        except OSError:
            pass
        time.sleep(0.5)
    return False


def _stop_group(server: subprocess.Popen) -> None:
    import os
    import signal

    for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
        try:
            os.killpg(server.pid, sig)
        except ProcessLookupError:
            return
        try:
            server.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


# --------------------------------------------------------------------------- one command per stage
NULL = object()  # "--act-bits null": an explicit None, unlike an option not given


class _Nullable(click.ParamType):
    """An optional value: 'null' (or 'none') gives None, anything else the inner type."""

    def __init__(self, inner: Any):
        self.inner = click.types.convert_type(inner)
        self.name = f"{self.inner.name}|null"

    def convert(self, value: Any, param: Any, ctx: Any) -> Any:
        if isinstance(value, str) and value.strip().lower() in ("null", "none"):
            return NULL
        return self.inner.convert(value, param, ctx)


def _click_type(ann: Any) -> tuple[Any, bool]:
    """(click type, is_flag) for a pydantic field annotation."""
    origin, args = typing.get_origin(ann), typing.get_args(ann)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1 and type(None) in args:
            ctype, flag = _click_type(inner[0])
            return (ctype, flag) if flag or _structured(inner[0]) else (_Nullable(ctype), False)
        return _click_type(inner[0]) if len(inner) == 1 else (str, False)
    if origin is typing.Literal:
        return click.Choice([str(a) for a in args]), False
    if ann is bool:
        return bool, True
    if ann in (int, float, str):
        return ann, False
    if ann is Path:
        return click.Path(path_type=Path), False
    return str, False  # lists and mappings: given as YAML, e.g. '[2, 4, 8]'


def _structured(ann: Any) -> Optional[type]:
    """list or dict when the annotation is one (possibly Optional), else None."""
    origin = typing.get_origin(ann)
    if origin in (list, dict):
        return origin
    if origin in (typing.Union, types.UnionType):
        return next((o for o in map(_structured, typing.get_args(ann)) if o), None)
    return None


def _parse_structured(value: Any, ann: Any, option: str = "") -> Any:
    """List options take 'a,b,c' or YAML '[2, 4, 8]'; mapping options take YAML '{a: 1}'."""
    kind = _structured(ann)
    if kind is None or not isinstance(value, str):
        return value
    if kind is list and not value.lstrip().startswith("["):
        return [part.strip() for part in value.split(",") if part.strip()]
    try:
        return yaml.safe_load(value)
    except yaml.YAMLError as err:
        raise InputError(f"--{option.replace('_', '-')} '{value}' is not valid YAML ({str(err).splitlines()[0]})",
                         "write lists as a,b,c or [a, b] and mappings as {key: value}") from None


def _flag(field: Any) -> str:
    return "--" + str(field).replace("_", "-")


def _common_flag(loc: tuple) -> Optional[str]:
    """The flag of a stage command that set a pipeline key: --model, --checkpoint, --data, --calib-size, ..."""
    if loc[:1] == ("model",):
        return "--model" if len(loc) < 2 or loc[1] == "spec" else _flag(loc[1])
    if loc[:1] == ("data",):
        return "--data" if len(loc) < 2 or loc[1] == "source" else _flag(loc[1])
    return None


def _stage_command(name: str, schema: type, help_text: str, extra: Optional[list] = None,
                   intercept: Optional[Callable[[dict], Optional[int]]] = None) -> click.Command:
    """The command of one stage: its config keys as options, the common options, and the stage's own
    ``extra`` options; ``intercept(options)`` runs first and returns an exit code when it handled the call
    (``export --check FILE``)."""
    params: list[click.Parameter] = []
    for field, f in schema.model_fields.items():
        ctype, flag = _click_type(f.annotation)
        opt = "--" + field.replace("_", "-")
        desc = f"{f.description or ''} [default: {f.get_default(call_default_factory=True)}]"
        if flag:
            params.append(click.Option([f"{opt}/--no-{field.replace('_', '-')}", field], default=None, help=desc))
        else:
            params.append(click.Option([opt, field], type=ctype, default=None, help=desc))

    extra = list(extra or [])

    def callback(**kw: Any) -> None:
        if intercept is not None:
            code = intercept(kw)
            if code is not None:
                raise SystemExit(code)
        for option in extra:
            kw.pop(option.name)
        common = {k: kw.pop(k) for k in ("workdir", "tracking_uri", "experiment", "device", "seed", "as_json")}
        trusted = list(kw.pop("trust_factory"))
        model = {k: kw.pop(k) for k in ("checkpoint", "mean", "std")}
        model["spec"] = kw.pop("model")
        model = {k: v for k, v in model.items() if v is not None}
        for k in ("mean", "std"):
            if k in model:
                try:
                    model[k] = [float(x) for x in str(model[k]).split(",")]
                except ValueError:
                    raise InputError(f"--{k} '{model[k]}' is not a comma-separated list of numbers",
                                     f"give one number per channel, e.g. --{k} 0.49,0.48,0.45") from None
        data = {"source": kw.pop("data")}
        for k in ("calib_size", "limit_train", "limit_test", "image_size"):
            if kw.get(k) is not None:
                data[k] = kw.pop(k)
            else:
                kw.pop(k)
        out, force = kw.pop("out"), kw.pop("force")
        stage_cfg = {}
        for k, v in kw.items():
            if v is NULL:
                stage_cfg[k] = None
            elif v is not None:
                stage_cfg[k] = _parse_structured(v, schema.model_fields[k].annotation, k)
        where, fix = f"deploypipe {name}", f"see 'deploypipe {name} --help'"
        typed = validate(schema, stage_cfg, where, flag_of=lambda loc: _flag(loc[0]) if loc else None, fix=fix)
        cfg = validate(PipelineConfig, {"name": name, "model": model, "data": data, "stages": [{name: stage_cfg}]},
                       where, flag_of=_common_flag, fix=fix)
        cfg.stages[0]._typed = typed  # validated once, here
        as_json = common.pop("as_json")
        _execute(cfg, _options(**common, where=where, out_dir=out, force=force, trusted_factories=trusted), as_json)

    params += [
        click.Option(["--model", "model"], required=not extra,  # a stage's own options may make a call without one
                     help="zoo:NAME, package.module:factory, or a saved model/ folder"),
        click.Option(["--checkpoint"], type=click.Path(path_type=Path), default=None, help="state dict for the model "
                                                                                           "(weights_only=True)"),
        click.Option(["--mean"], default=None, help="per-channel mean for a user model, e.g. 0.49,0.48,0.45"),
        click.Option(["--std"], default=None, help="per-channel std for a user model"),
        click.Option(["--data", "data"], default="digits", show_default=True, help="digits | imagefolder:PATH | "
                                                                                   "torchvision:CIFAR10"),
        click.Option(["--calib-size"], type=int, default=None, help="calibration images from the train split"),
        click.Option(["--limit-train"], type=int, default=None, help="use only N training images"),
        click.Option(["--limit-test"], type=int, default=None, help="use only N test images"),
        click.Option(["--image-size"], type=int, default=None, help="resize image-folder images to this size"),
        click.Option(["--out"], type=click.Path(file_okay=False, path_type=Path), default=None,
                     help=f"output folder (default <workdir>/{name}); the stage writes <out>/{name}/"),
        click.Option(["--force"], is_flag=True, help="rerun even if the same stage already finished with this config "
                                                     "and input"),
    ]
    cmd = click.Command(name, callback=callback, params=params + extra + common_params(), help=(
        f"{help_text}.\n\nRuns a one-stage pipeline; options are the stage's config keys (see 'deploypipe stages').\n\n"
        f"\b\nExample:\n  deploypipe {name} --model zoo:digits_cnn --data digits --out runs/{name}-example"))
    return cmd




class Terminated(KeyboardInterrupt):
    """SIGTERM (what schedulers, timeout and Kubernetes send): the Ctrl-C path, exit 143."""


def _on_sigterm(_signum: int, _frame: Any) -> None:
    raise Terminated()


def main(argv: Optional[list[str]] = None) -> None:
    import signal
    import threading

    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _on_sigterm)  # runs end KILLED, partial outputs removed, as on Ctrl-C
    try:
        _main(argv)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _main(argv: Optional[list[str]]) -> None:
    try:
        cli.main(args=argv, prog_name="deploypipe", standalone_mode=False)
    except InputError as err:
        click.echo(f"error: {err}", err=True)
        sys.exit(2)
    except click.UsageError as err:
        cmd = err.ctx.command_path if err.ctx else "deploypipe"
        click.echo(f"error: {err.format_message()} — fix: see '{cmd} --help'", err=True)
        sys.exit(2)
    except click.ClickException as err:
        click.echo(f"error: {err.format_message()}", err=True)
        sys.exit(err.exit_code if err.exit_code != 1 else 2)
    except StageFailed as err:
        click.echo(f"error: {err} (earlier stages' outputs are kept; the MLflow run is marked FAILED)", err=True)
        sys.exit(1)
    except TrackingUnavailable as err:
        click.echo(f"error: {err}", err=True)
        sys.exit(1)
    except (click.exceptions.Abort, KeyboardInterrupt) as err:  # click turns Ctrl-C (and SIGTERM) into Abort
        if isinstance(err, Terminated) or isinstance(err.__context__, Terminated):
            click.echo("terminated by SIGTERM (finished stages are kept; rerun to resume)", err=True)
            sys.exit(143)
        click.echo("interrupted (finished stages are kept; rerun to resume)", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
