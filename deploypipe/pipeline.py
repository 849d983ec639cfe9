"""Running a pipeline: preflight, ordering, resume, artifact hand-off, failure handling.

Everything that can be wrong with the user's input (config, data, model, checkpoint, tracking
server) is checked before anything is written, so bad input never leaves a half-made run.

Each stage's output lands in ``<out>/<stage id>/`` (``<out>`` defaults to ``<workdir>/<pipeline name>``):

    result.json      key, metrics, MLflow run id, whether a model was produced and uploaded
    config.yaml      the stage's config
    model/           the output model with its reload spec (when the stage makes one)
    *.csv, *.png     the stage's tables and plots

It is written in ``<out>/.<id>.partial-<pid>`` and renamed into place when the stage has
finished, so a crash never leaves a directory that looks done. A stage's *key* hashes its name,
config, input model (content, or the factory's source), data (spec and image files) and seed; a
finished stage with the same key is skipped unless forced. ``<out>/.work/<id>/`` is the stage's
scratch (e.g. per-epoch checkpoints); it survives a crash so the stage can resume.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import random
import shutil
import tempfile
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import torch
import yaml

from .config import PipelineConfig
from .data import Splits, load_data
from .errors import InputError, StageFailed, TrackingUnavailable, check_writable
from .models import (ModelRecord, check_fits_data, content_hash, factory_source, is_model_dir, load_model,
                     model_from_spec, read_record, save_model, trust_factories)
from .distributed import barrier, destroy_process_group, init_process_group, launched_ranks
from .stage import NullTracker, Preflight, StageContext, StageDef, StageResult, load_stages
from .progress import log
from .tracking import StageTracker, Tracker, check_reachable, default_uri, resolve_uri


@dataclass
class StageOutcome:
    id: str
    stage: str
    status: str  # ran | skipped
    seconds: float = 0.0
    metrics: dict[str, float] = field(default_factory=dict)
    dir: Optional[str] = None
    model: Optional[str] = None
    run_id: Optional[str] = None


@dataclass
class PipelineSummary:
    name: str
    outputs: str
    tracking_uri: str
    experiment_id: str
    run_id: Optional[str]
    stages: list[StageOutcome]
    tracking_seconds: float = 0.0
    tracking_setup_seconds: float = 0.0
    tracking_calls: int = 0
    seconds: float = 0.0
    rechecked: bool = False  # every stage was finished already: no new MLflow runs

    def to_json(self) -> dict:
        return {"pipeline": self.name, "outputs": self.outputs, "tracking_uri": self.tracking_uri,
                "experiment_id": self.experiment_id, "run_id": self.run_id, "seconds": round(self.seconds, 3),
                "tracking_seconds": round(self.tracking_seconds, 3), "tracking_calls": self.tracking_calls,
                "tracking_setup_seconds": round(self.tracking_setup_seconds, 3),
                "stages": [vars(s) for s in self.stages]}


@dataclass
class RunOptions:
    """How to run a pipeline: what the command line adds to the YAML (one object, not ten arguments)."""

    workdir: Path = Path("runs")          # MLflow store (mlflow.db, mlartifacts/) and default outputs
    out_dir: Optional[Path] = None        # default <workdir>/<pipeline name>
    tracking_uri: Optional[str] = None    # else MLFLOW_TRACKING_URI, the YAML's tracking.uri, local sqlite
    experiment: Optional[str] = None      # overrides the YAML's tracking.experiment
    device: Optional[str] = None          # overrides the YAML's device
    seed: Optional[int] = None            # overrides the YAML's seed
    only: Optional[list[str]] = None      # run only these stage ids (earlier ones must be finished)
    force: bool = False                   # rerun stages even when finished with the same key
    show_progress: bool = True
    where: str = "pipeline"               # names the source of the config in error messages
    trusted_factories: list[str] = field(default_factory=list)  # --trust-factory: user code a model folder may name


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        local = int(os.environ.get("LOCAL_RANK", "0")) if launched_ranks()[1] > 1 else 0
        return torch.device("cuda", local % torch.cuda.device_count())  # torchrun: one GPU per local rank
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise InputError(f"unknown device '{name}'", "use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device '{name}' asked for but no CUDA GPU is visible", "use --device cpu (or auto)")
    return dev


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _spec_hash(cfg: PipelineConfig) -> str:
    """Identity of the pipeline's input model: its spec, checkpoint bytes, saved folder or factory source."""
    parts: dict[str, Any] = {"model": cfg.model.model_dump(mode="json")}
    if cfg.model.checkpoint:
        parts["checkpoint"] = content_hash(cfg.model.checkpoint)
    if is_model_dir(cfg.model.spec):
        parts["artifact"] = content_hash(cfg.model.spec)
    else:
        source = factory_source(cfg.model.spec)
        if source:
            parts["factory_source"] = content_hash(source)
    return _hash(parts)


def _read_result(stage_dir: Path) -> Optional[dict]:
    try:
        return json.loads((stage_dir / "result.json").read_text())
    except (OSError, ValueError):
        return None


def _replace_dir(tmp: Path, final: Path) -> None:
    """Put ``tmp`` at ``final``; an older ``final`` is removed only after the new one is in place."""
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


class Pipeline:
    """A validated pipeline with its data and input model, ready to run.

    Construction is the preflight: config, stage options, device, tracking server, data and model
    are all checked here, and nothing is written. CLI overrides (seed, device, experiment) are
    folded into ``self.cfg`` so what is logged is what ran.
    """

    def __init__(self, cfg: PipelineConfig, options: Optional[RunOptions] = None):
        options = options or RunOptions()
        self.options = options
        where = options.where
        registry = load_stages()
        overrides: dict[str, Any] = {k: v for k, v in (("seed", options.seed), ("device", options.device))
                                     if v is not None}
        if options.experiment:
            overrides["tracking"] = cfg.tracking.model_copy(update={"experiment": options.experiment})
        self.cfg = cfg = cfg.model_copy(update=overrides)
        self.workdir = Path(options.workdir)
        self.out_dir = Path(options.out_dir) if options.out_dir else self.workdir / cfg.name
        self.seed = cfg.seed
        self.show_progress = options.show_progress
        self.stage_defs: list[tuple[Any, StageDef, Any]] = []
        for i, entry in enumerate(cfg.stages):
            if entry.stage not in registry:
                raise InputError(f"{where}: stages[{i}] names unknown stage '{entry.stage}'",
                                 f"use one of: {', '.join(sorted(registry))} (see 'deploypipe stages')")
            sdef = registry[entry.stage]
            typed = entry.typed(sdef.config, where, prefix=f"stages[{i}].{entry.stage}")
            self.stage_defs.append((entry, sdef, typed))
        self.rank, self.world_size = launched_ranks()
        self.mode = self._distributed_mode(registry, where)
        if self.mode == "shards":  # torchrun: each rank its own output folder (and MLflow run), merged afterwards
            self.out_dir = self.out_dir / f"rank{self.rank}"
        self.writes = self.mode != "ddp" or self.rank == 0  # DDP training: rank 0 alone writes and logs
        trust_factories([*cfg.trusted_factories, *options.trusted_factories])
        self.device = resolve_device(cfg.device)
        self.uri = resolve_uri(options.tracking_uri, cfg.tracking.uri, self.workdir)
        if self.uri != default_uri(self.workdir):  # the default store is created with the work directory
            check_reachable(self.uri)
        self.data: Splits = load_data(cfg.data)
        mean, std = self.data.channel_stats()
        seed_everything(self.seed)  # fresh weights of a zoo model are part of the reproducible run
        fits = self.fed_shape(*self.stage_defs[0][1:]) if self.stage_defs else tuple(self.data.input_shape)
        self.model, self.record = model_from_spec(cfg.model, self.data.input_shape, self.data.num_classes, mean, std,
                                                  fits=fits)
        self.input_hash = _spec_hash(cfg)

    def _distributed_mode(self, registry: dict[str, StageDef], where: str) -> str:
        """"single" outside torchrun; under it "shards" (every stage splits its work over the ranks,
        each rank writing its own folder) or "ddp" (every stage trains with DistributedDataParallel)."""
        if self.world_size == 1:
            return "single"
        modes = {sdef.distributed for _, sdef, _ in self.stage_defs}
        if "none" in modes:
            stage = next(e.stage for e, sdef, _ in self.stage_defs if sdef.distributed == "none")
            able = ", ".join(sorted(n for n, d in registry.items() if d.distributed != "none"))
            raise InputError(f"{where}: stage '{stage}' does not split its work over torchrun's "
                             f"{self.world_size} ranks (every rank would redo all of it)",
                             f"run it without torchrun; under torchrun run only: {able}")
        missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(k)]
        if "ddp" in modes and missing:
            raise InputError(f"{where}: WORLD_SIZE is {self.world_size} but {' and '.join(missing)} not set, so the "
                             "ranks cannot meet", "start the ranks with torchrun (it sets them), e.g. torchrun "
                             "--nproc-per-node 2 -m deploypipe train ...")
        if len(modes) > 1:
            raise InputError(f"{where}: under torchrun a pipeline either trains (train, sparsify: the ranks "
                             "train one model) or shards (certify: each rank its share), not both",
                             "run the training and the certification as two torchrun commands")
        return modes.pop()

    def fed_shape(self, sdef: StageDef, typed: Any) -> tuple[int, ...]:
        """The image shape a stage feeds its input model: the data's, or what the stage's hook says
        (DRS certification and DRS side training: half-images)."""
        shape = tuple(self.data.input_shape)
        return tuple(sdef.model_input_shape(typed, shape)) if sdef.model_input_shape else shape

    def _check_fed(self, model: torch.nn.Module, entry: Any, shape: tuple[int, ...], before: tuple[str, tuple]) -> None:
        """A stage that feeds its model other images than the stage before it did (a DRS side model
        reaching evaluate): refuse it before the stage starts, not with a shape error inside it."""
        try:
            check_fits_data(model, shape, self.data.num_classes, entry.id)  # the same probe as at load
        except InputError as err:
            raise InputError(f"stage '{entry.id}' feeds its model images of shape {shape}, but the model it gets "
                             f"takes the images stage '{before[0]}' fed it, {before[1]} ({err.problem})",
                             f"leave '{entry.id}' out of this pipeline, or run it on a model for {shape} "
                             "images") from None

    def stage_key(self, entry: Any, typed: Any, input_hash: str) -> str:
        return _hash({"stage": entry.stage, "config": typed.model_dump(mode="json"), "input": input_hash,
                      "data": self.data.fingerprint, "seed": self.seed})

    def _check_selection(self, only: Optional[list[str]], force: bool) -> list[dict]:
        """Before anything is written: every stage before the selected ones must be finished. Returns
        the results of the stages that will be skipped, in order, up to the first that runs."""
        ids = [e.id for e, _, _ in self.stage_defs]
        for name in only or []:
            if name not in ids:
                raise InputError(f"--stage {name}: no stage with that id in the pipeline",
                                 f"use one of: {', '.join(ids)}")
        input_hash, finished = self.input_hash, []
        for entry, _, typed in self.stage_defs:
            done = _read_result(self.out_dir / entry.id)
            selected = only is None or entry.id in only
            if done and done.get("key") == self.stage_key(entry, typed, input_hash) and not (force and selected):
                input_hash = done.get("model_hash", input_hash)
                finished.append(done)
                if only and entry.id == [i for i in ids if i in only][-1]:
                    break
            elif not selected:
                raise InputError(f"--stage: stage '{entry.id}' comes before the selected stage(s) but has no "
                                 "finished output for this config",
                                 "run the whole pipeline once (without --stage), or select it too")
            else:
                break  # from here on, stages run
        return finished

    def _recheck(self, finished: list[dict]) -> Optional[PipelineSummary]:
        """When every asked-for stage already finished with these settings and its results are in this
        store, a rerun changes nothing: no new MLflow runs, the summary points at the earlier ones."""
        wanted = [e.id for e, _, _ in self.stage_defs]
        if self.options.only:
            wanted = wanted[:max(wanted.index(i) for i in self.options.only) + 1]
        if len(finished) != len(wanted) or not all(d.get("tracked") and d.get("pipeline_run_id") and
                                                   d.get("tracking_uri") == self.uri for d in finished):
            return None
        outcomes = [StageOutcome(d["id"], d["stage"], "skipped", 0.0, d.get("metrics", {}), str(self.out_dir / d["id"]),
                                 str(self.out_dir / d["id"] / "model") if d.get("model") else None, d.get("run_id"))
                    for d in finished]
        last = finished[-1]
        return PipelineSummary(self.cfg.name, str(self.out_dir), self.uri, last.get("experiment_id", ""),
                               last["pipeline_run_id"], outcomes, rechecked=True)

    def _preflight(self, skipped: int) -> None:
        """Every stage that will run checks what needs no computation (files, budgets, data sizes)
        before the first one starts, so a mistake in the last stage does not cost the earlier ones."""
        model: Optional[torch.nn.Module] = self.model
        for i, (entry, sdef, typed) in enumerate(self.stage_defs):
            if i >= skipped and sdef.preflight is not None:
                before = self.stage_defs[:i]
                record = self.record if model is not None else None
                try:
                    sdef.preflight(typed, Preflight(entry.id, self.data, model, record, [e.stage for e, _, _ in before],
                                                    [self.out_dir / e.id for e, _, _ in before]))
                except (ValueError, TypeError) as err:
                    if InputError.is_for_user(err):
                        raise InputError.from_error(err, f"stage '{entry.id}'") from None
                    raise
            if sdef.changes_architecture(typed):
                model = None  # later stages get a model of another shape: their model checks wait for it

    def run(self) -> PipelineSummary:
        only, force = self.options.only, self.options.force
        finished = self._check_selection(only, force)
        self._preflight(len(finished))
        if self.mode != "ddp":
            return self._recheck(finished) or self._run_writing(only, force)
        init_process_group(self.device)
        try:
            if not self.writes:  # a DDP rank > 0: computes with rank 0, writes nothing
                barrier()  # rank 0 has its folders and lock
                return self._run_locked(only, force)
            return self._run_writing(only, force)
        finally:
            destroy_process_group()

    def _run_writing(self, only: Optional[list[str]], force: bool) -> PipelineSummary:
        try:
            self.workdir.mkdir(parents=True, exist_ok=True)
            self.out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise InputError(f"cannot create the work directory: {err}",
                             "choose a writable --workdir / --out") from None
        for folder in dict.fromkeys((self.workdir, self.out_dir)):
            check_writable(folder, "the output folder", "choose a writable --workdir / --out")
        with _exclusive(self.out_dir):
            if self.mode == "ddp":
                barrier()
            return self._run_locked(only, force)

    def _run_locked(self, only: Optional[list[str]], force: bool) -> PipelineSummary:
        ids = [e.id for e, _, _ in self.stage_defs]
        last_selected = [i for i in ids if i in only][-1] if only else None
        t_start = time.perf_counter()
        if self.writes:
            for stale in [*self.out_dir.glob(".*.partial-*"), *self.out_dir.glob(".*.old-*")]:  # left by a killed run
                shutil.rmtree(stale, ignore_errors=True)
            with _exclusive(self.workdir, ".tracking.lock", wait=True):  # torchrun ranks: one creates the store
                tracker = Tracker(self.uri, self.cfg.tracking.experiment, self.workdir / "mlartifacts")
            stale = tracker.end_stale_runs(str(self.out_dir.resolve()))  # we hold the folder's lock: theirs died
            if stale:
                log(f"marked {stale} MLflow runs of {self.out_dir} KILLED: an earlier run of this folder could not end "
                    "them (it was killed outright, or its tracking server went away)")
            ranks = {"deploypipe.rank": f"{self.rank}/{self.world_size}"} if self.mode == "shards" else {}
            if self.mode == "ddp":
                ranks = {"deploypipe.ddp_ranks": str(self.world_size)}
            name = self.cfg.name + (f" rank {self.rank}" if self.mode == "shards" else "")
            tracker.start_pipeline(name, self.cfg.model_dump(mode="json"),
                                   tags={"deploypipe.outputs": str(self.out_dir.resolve()), **ranks})
            (self.out_dir / "pipeline.yaml").write_text(self.cfg.to_yaml())
            tracker.log_artifact(self.out_dir / "pipeline.yaml")
        else:
            tracker = _SilentTracker()
        model, record, input_hash = self.model, self.record, self.input_hash
        input_tags = {"deploypipe.input_model": self.cfg.model.spec}  # which checkpoint each stage consumed
        previous: dict[str, StageResult] = {}
        outcomes: list[StageOutcome] = []
        status = "FAILED"
        try:
            before = None  # (stage id, the image shape it fed its model)
            for entry, sdef, typed in self.stage_defs:
                key = self.stage_key(entry, typed, input_hash)
                final = self.out_dir / entry.id
                done = _read_result(final)
                shape = self.fed_shape(sdef, typed)
                if done and done.get("key") == key and not (force and (only is None or entry.id in only)):
                    outcome = self._record_skip(tracker, entry, typed, final, done, input_tags)
                else:
                    if before and shape != before[1]:
                        self._check_fed(model, entry, shape, before)
                    outcome = self._run_stage(tracker, entry, sdef, typed, key, model, record, previous, input_tags)
                    done = _read_result(final)
                before = (entry.id, shape)
                outcomes.append(outcome)
                files = sorted(p for p in final.iterdir() if p.name != "result.json")
                previous[entry.id] = StageResult(metrics=outcome.metrics, artifacts=files)
                if done.get("model"):
                    model, record = load_model(final / "model"), read_record(final / "model")
                    input_hash = done["model_hash"]
                    input_tags = {"deploypipe.input_model": str(final / "model"),
                                  "deploypipe.input_model_uri": f"runs:/{outcome.run_id}/model"}
                if entry.id == last_selected:
                    break  # later stages are not asked for
            status = "FINISHED"
            tracker.log_metrics(self._final_figures(outcomes))
            if self.writes and self.mode != "shards" and any(o.status == "ran" for o in outcomes):
                self._report(tracker)
        except KeyboardInterrupt:
            status = "KILLED"
            raise
        finally:
            tracker.end_pipeline(status)
        return PipelineSummary(self.cfg.name, str(self.out_dir), self.uri, tracker.experiment_id, tracker.run_id,
                               outcomes,
                               tracker.seconds, tracker.setup_seconds, tracker.calls, time.perf_counter() - t_start)

    def _report(self, tracker: Tracker) -> None:
        """report.md / .csv / .png over every artifact (deploypipe.report), logged to the pipeline run. A
        failure here costs the report only: the stages' results are already safe."""
        from .report import write_report

        try:
            files = write_report(self.out_dir)
            for path in files:
                tracker.log_artifact(path)
        except Exception as err:  # noqa: BLE001
            log(f"pipeline report not finished ({type(err).__name__}: {err}); 'deploypipe report {self.out_dir}' "
                "retries it")
            return
        if files:
            log(f"pipeline report: {self.out_dir / 'report.md'} (and report.png)")

    def _final_figures(self, outcomes: list[StageOutcome]) -> dict[str, float]:
        """The pipeline run's own metrics: each stage's headline figures as ``<stage id>/<metric>``."""
        defs = {e.id: sdef for e, sdef, _ in self.stage_defs}
        figures = {}
        for o in outcomes:
            wanted = defs[o.id].headline or tuple(o.metrics)
            figures.update({f"{o.id}/{k}": float(o.metrics[k]) for k in wanted if k in o.metrics})
        return figures

    def _record_skip(self, tracker: Tracker, entry: Any, typed: Any, final: Path, done: dict,
                     input_tags: dict[str, str]) -> StageOutcome:
        st = tracker.stage(entry.id, entry.stage, typed.model_dump(mode="json"),
                           tags={"deploypipe.skipped": "true", "deploypipe.resumed_from": done.get("run_id", ""),
                                 **input_tags})
        st.log_summary(done.get("metrics", {}))
        if not done.get("tracked", True) and self.writes:  # finished earlier while MLflow was failing: upload now
            st.log_artifacts(final)
            _write_result(final, {**done, "tracked": True})
        st.end("FINISHED")
        return StageOutcome(entry.id, entry.stage, "skipped", 0.0, done.get("metrics", {}), str(final),
                            str(final / "model") if done.get("model") else None, st.run_id)

    def _run_stage(self, tracker: Tracker, entry: Any, sdef: StageDef, typed: Any, key: str,
                   model: torch.nn.Module, record: ModelRecord, previous: dict,
                   input_tags: dict[str, str]) -> StageOutcome:
        final = self.out_dir / entry.id
        work = self.out_dir / ".work" / entry.id
        if self.writes:
            tmp = self.out_dir / f".{entry.id}.partial-{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            if _read_key(work) != key:  # scratch of another config is of no use
                shutil.rmtree(work, ignore_errors=True)
            work.mkdir(parents=True, exist_ok=True)
            (work / "key").write_text(key)
        else:  # a DDP rank > 0: its files are thrown away; rank 0's checkpoints in ``work`` are shared
            tmp = Path(tempfile.mkdtemp(prefix=f"deploypipe-{entry.id}-rank{self.rank}-"))
        if self.mode == "ddp":
            barrier()  # rank 0 has prepared the shared work directory
        config = typed.model_dump(mode="json")
        st = tracker.stage(entry.id, entry.stage, config, tags=input_tags)
        (tmp / "config.yaml").write_text(yaml.safe_dump({entry.stage: config}, sort_keys=False))
        # each stage gets its own copy: in-place changes never leak into the pipeline's input model
        ctx = StageContext(stage_id=entry.id, model=copy.deepcopy(model).to(self.device), record=record,
                           data=self.data, device=self.device, tracker=st, out_dir=tmp, work_dir=work,
                           seed=self.seed, previous=dict(previous), show_progress=self.show_progress,
                           rank=self.rank, world_size=self.world_size)
        seed_everything(self.seed)
        t0 = time.perf_counter()
        if not self.writes:
            try:
                result = sdef.run(ctx, typed)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            barrier()  # rank 0 has written the stage's folder
            return StageOutcome(entry.id, entry.stage, "ran", time.perf_counter() - t0, result.metrics, str(final),
                                str(final / "model") if result.model is not None else None)
        try:
            result = sdef.run(ctx, typed)
            seconds = time.perf_counter() - t0
            out = {"stage": entry.stage, "id": entry.id, "key": key, "metrics": result.metrics,
                   "run_id": st.run_id, "seconds": seconds, "model": result.model is not None, "tracked": False,
                   "pipeline_run_id": tracker.run_id, "experiment_id": tracker.experiment_id, "tracking_uri": self.uri}
            if result.model is not None:
                save_model(result.model, result.record or record, tmp / "model")
                out["model_hash"] = content_hash(tmp / "model")
            _write_result(tmp, out)
        except BaseException as err:
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(err, TrackingUnavailable) or tracker.offline:  # nothing more to tell the server
                raise TrackingUnavailable(f"{tracker.offline or err}: finished stages are kept in {self.out_dir} "
                                          f"and '{entry.id}' restarts from its last checkpoint; rerun to upload"
                                          ) from None
            st.end("KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED",
                   error="".join(traceback.format_exception_only(type(err), err)).strip())
            if InputError.is_for_user(err):  # a method's message about its input: one line, exit 2
                raise InputError.from_error(err, f"stage '{entry.id}'") from None
            if isinstance(err, (KeyboardInterrupt, InputError)):
                raise
            raise StageFailed(entry.id, err) from err
        _replace_dir(tmp, final)  # from here on the stage's results are safe on disk
        shutil.rmtree(work, ignore_errors=True)  # finished: checkpoints to resume from are no longer needed
        try:
            st.log_summary({**result.metrics, "stage_seconds": seconds})
            st.log_artifacts(final)
            if result.registration:  # the files are uploaded: the version can point at them
                reg = result.registration
                out["registered_model"] = reg["name"]
                out["registered_version"] = st.register_model(reg["name"], reg["path"], reg.get("tags", {}),
                                                              reg.get("alias"))
                st.set_tags({"deploypipe.registered_model": f"{reg['name']}/{out['registered_version']}"})
            st.end("FINISHED")
        except Exception as err:
            if isinstance(err, TrackingUnavailable):
                raise TrackingUnavailable(f"{err}: outputs kept in {final}; rerun to upload") from None
            try:
                st.end("FAILED", error=f"logging to MLflow failed after the stage finished: {err}")
            except Exception:
                pass
            raise StageFailed(entry.id, RuntimeError(
                f"finished, outputs kept in {final}, but logging to MLflow failed ({err}); "
                "rerun the pipeline to upload them")) from err
        _write_result(final, {**out, "tracked": True})
        if self.mode == "ddp":
            barrier()  # the other ranks read this stage's folder next
        return StageOutcome(entry.id, entry.stage, "ran", seconds, result.metrics, str(final),
                            str(final / "model") if result.model is not None else None, st.run_id)


class _SilentTracker:
    """The pipeline-level tracker of a DDP rank > 0: rank 0 alone logs."""

    experiment_id, run_id, seconds, setup_seconds, calls, offline = "", None, 0.0, 0.0, 0, None

    def stage(self, *args: Any, **kwargs: Any) -> NullTracker:
        return NullTracker()

    def log_artifact(self, *args: Any) -> None:
        pass

    def end_pipeline(self, status: str) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float]) -> None:
        pass


def _write_result(stage_dir: Path, result: dict) -> None:
    tmp = stage_dir / "result.json.tmp"
    tmp.write_text(json.dumps(result, indent=2))
    os.replace(tmp, stage_dir / "result.json")


@contextmanager
def _exclusive(out_dir: Path, name: str = ".lock", wait: bool = False) -> Iterator[None]:
    """One run at a time per output folder (another run would delete our partial outputs); with
    ``wait``, queue for the lock instead (e.g. creating the MLflow store and experiment once when
    several torchrun ranks start together)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        yield
        return
    with open(out_dir / name, "w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            raise InputError(f"another deploypipe run is using {out_dir}",
                             "wait for it to finish, or give this run another --out / --workdir") from None
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _read_key(work: Path) -> Optional[str]:
    try:
        return (work / "key").read_text()
    except OSError:
        return None


@contextmanager
def standalone_run(name: str, config: dict, tags: dict[str, str], workdir: Path, tracking_uri: Optional[str],
                   experiment: str) -> Iterator[StageTracker]:
    """The MLflow run of a command that is not a pipeline (e.g. certify-merge): started before the
    command writes anything, so a store that cannot take it stops the command with nothing written;
    FINISHED when the block ends, FAILED when it raises. Yields the run's tracker (metrics, artifacts)."""
    workdir = Path(workdir)
    uri = resolve_uri(tracking_uri, None, workdir)
    try:
        if uri == default_uri(workdir):
            workdir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise InputError(f"{name} --workdir {workdir} cannot be created ({err.strerror})",
                         "give a writable --workdir, or --tracking-uri") from None
    check_reachable(uri)
    try:
        tracker = Tracker(uri, experiment, workdir / "mlartifacts")
        run_id = tracker.start_pipeline(name, config, tags=tags)
    except Exception as err:
        raise InputError(f"the MLflow store {uri} could not start a run ({type(err).__name__}: "
                         f"{str(err).splitlines()[0][:120] if str(err) else ''})",
                         "check the tracking store, or give another --tracking-uri / --workdir") from None
    run = StageTracker(tracker, run_id)
    try:
        yield run
        run.flush()
    except BaseException as err:
        try:
            tracker.end_pipeline("KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED")
        except Exception:  # the store itself failed: the original error says more
            pass
        raise
    tracker.end_pipeline("FINISHED")
