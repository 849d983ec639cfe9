"""Pipeline engine: hand-off, resume (skip unchanged stages), failures that keep earlier results."""

import json

import pytest
import torch
from mlflow import MlflowClient
from pydantic import Field

from deploypipe.config import PipelineConfig, Schema, validate
from deploypipe.errors import InputError, StageFailed
from deploypipe.models import load_model
from deploypipe.pipeline import Pipeline, RunOptions
from deploypipe.stage import StageContext, StageResult, register


class ExplodeConfig(Schema):
    when: str = Field("always")


@register("explode-test", help="test stage that writes a partial file, then fails")
def explode(ctx: StageContext, cfg: ExplodeConfig) -> StageResult:
    (ctx.out_dir / "half_written.csv").write_text("a,b\n1,")
    if cfg.when == "always":
        raise RuntimeError("boom in the middle of the stage")
    return StageResult(metrics={"ok": 1.0})


def config(stages, name="p"):
    return validate(PipelineConfig, {"name": name, "model": "zoo:digits_cnn",
                                     "data": {"source": "digits", "limit_train": 300, "limit_test": 100},
                                     "stages": stages}, "test")


TRAIN = {"train": {"epochs": 2, "batch_size": 64, "lr": 0.05, "eval_every": 0}}


def runs_of(workdir, run_id):
    c = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    parent = c.get_run(run_id)
    children = c.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{run_id}'")
    return c, parent, {r.data.tags["deploypipe.stage_id"]: r for r in children}


def test_handoff_and_resume_skips_unchanged_stages(workdir):
    cfg = config([TRAIN, {"evaluate": {"latency_repeats": 2}}])
    s1 = Pipeline(cfg, RunOptions(workdir, show_progress=False)).run()
    assert [o.status for o in s1.stages] == ["ran", "ran"]
    # evaluate saw the trained model: its accuracy equals the train stage's final test accuracy
    assert s1.stages[1].metrics["test_top1"] == pytest.approx(s1.stages[0].metrics["test_top1"])
    model_file = workdir / "p" / "train" / "model" / "weights.pt"
    mtime = model_file.stat().st_mtime_ns

    client, parent, children = runs_of(workdir, s1.run_id)
    assert parent.info.status == "FINISHED"  # the pipeline run carries its stages' headline figures
    assert parent.data.metrics["train/test_top1"] == pytest.approx(s1.stages[0].metrics["test_top1"])
    assert parent.data.metrics["evaluate/size_bytes"] == s1.stages[1].metrics["size_bytes"]
    before = len(client.search_runs([parent.info.experiment_id]))
    s2 = Pipeline(cfg, RunOptions(workdir, show_progress=False)).run()
    assert [o.status for o in s2.stages] == ["skipped", "skipped"] and s2.rechecked
    assert model_file.stat().st_mtime_ns == mtime
    # nothing changed: no new (empty) pipeline run; the summary points at the run that made the outputs
    assert len(client.search_runs([parent.info.experiment_id])) == before and s2.run_id == s1.run_id
    assert [o.run_id for o in s2.stages] == [o.run_id for o in s1.stages]

    # a changed evaluate config reruns only evaluate; a changed train config reruns both
    cfg3 = config([TRAIN, {"evaluate": {"latency_repeats": 3}}])
    assert [o.status for o in Pipeline(cfg3, RunOptions(workdir, show_progress=False)).run().stages] == ["skipped", "ran"]
    cfg4 = config([{"train": {**TRAIN["train"], "epochs": 3}}, {"evaluate": {"latency_repeats": 3}}])
    assert [o.status for o in Pipeline(cfg4, RunOptions(workdir, show_progress=False)).run().stages] == ["ran", "ran"]
    # --force reruns; --stage runs one stage on the earlier stage's finished output
    s5 = Pipeline(cfg4, RunOptions(workdir, only=["evaluate"], force=True, show_progress=False)).run()
    assert [o.status for o in s5.stages] == ["skipped", "ran"]
    # the skipped train stage handed its saved model on
    assert s5.stages[1].metrics["test_top1"] == pytest.approx(s5.stages[0].metrics["test_top1"])


def test_stage_selection_needs_finished_predecessors(workdir):
    cfg = config([TRAIN, {"evaluate": {"latency_repeats": 2}}])
    with pytest.raises(InputError, match="no finished output"):
        Pipeline(cfg, RunOptions(workdir, only=["evaluate"], show_progress=False)).run()
    with pytest.raises(InputError, match="no stage with that id"):
        Pipeline(cfg, RunOptions(workdir, only=["nope"], show_progress=False)).run()
    s = Pipeline(cfg, RunOptions(workdir, only=["train"], show_progress=False)).run()
    assert [o.id for o in s.stages] == ["train"]  # later stages are not run


def test_crash_mid_stage_keeps_earlier_artifacts(workdir):
    cfg = config([TRAIN, {"explode-test": {}}])
    with pytest.raises(StageFailed, match="boom"):
        Pipeline(cfg, RunOptions(workdir, show_progress=False)).run()
    out = workdir / "p"
    assert json.loads((out / "train" / "result.json").read_text())["model"] is True
    load_model(out / "train" / "model")  # intact and reloadable
    assert not (out / "explode-test").exists()
    assert not list(out.glob(".*partial*"))  # the half-written file went with the failed stage
    c = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    runs = c.search_runs([c.get_experiment_by_name("deploypipe").experiment_id])
    by_kind = {(r.data.tags.get("deploypipe.stage_id") or "parent"): r for r in runs}
    assert by_kind["parent"].info.status == "FAILED"
    assert by_kind["train"].info.status == "FINISHED"
    assert by_kind["explode-test"].info.status == "FAILED"
    assert "boom in the middle" in by_kind["explode-test"].data.tags["deploypipe.error"]
    # fixed config: train is skipped, the failed stage runs
    fixed = config([TRAIN, {"explode-test": {"when": "never"}}])
    assert [o.status for o in Pipeline(fixed, RunOptions(workdir, show_progress=False)).run().stages] == ["skipped", "ran"]


def test_interrupted_training_resumes_from_its_checkpoint(workdir, monkeypatch):
    from deploypipe.training import Trainer

    cfg = config([{"train": {**TRAIN["train"], "epochs": 3}}])
    straight = Pipeline(cfg, RunOptions(workdir, out_dir=workdir / "straight", show_progress=False)).run()

    real = Trainer._epoch
    calls = {"n": 0}

    def crash_on_second_epoch(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("power cut")
        return real(*a, **k)

    monkeypatch.setattr(Trainer, "_epoch", crash_on_second_epoch)
    with pytest.raises(StageFailed, match="power cut"):
        Pipeline(cfg, RunOptions(workdir, out_dir=workdir / "crashy", show_progress=False)).run()
    assert (workdir / "crashy" / ".work" / "train" / "checkpoint.pt").is_file()
    resumed_calls = {"n": 0}

    def counting(*a, **k):
        resumed_calls["n"] += 1
        return real(*a, **k)

    monkeypatch.setattr(Trainer, "_epoch", counting)
    resumed = Pipeline(cfg, RunOptions(workdir, out_dir=workdir / "crashy", show_progress=False)).run()
    assert resumed_calls["n"] == 2  # epochs 2 and 3 only: epoch 1 came from the checkpoint
    epochs = (workdir / "crashy" / "train" / "epochs.csv").read_text().splitlines()
    assert len(epochs) == 1 + 3  # header + the epoch from before the crash + two after it
    a = load_model(workdir / "straight" / "train" / "model")
    b = load_model(workdir / "crashy" / "train" / "model")
    x = torch.rand(8, 1, 8, 8)
    torch.testing.assert_close(a(x), b(x), rtol=1e-4, atol=1e-4)
    assert resumed.stages[0].metrics["test_top1"] == pytest.approx(straight.stages[0].metrics["test_top1"], abs=0.011)
    assert not (workdir / "crashy" / ".work" / "train").exists()  # scratch removed once finished


def test_unknown_stage_and_bad_stage_option(workdir):
    with pytest.raises(InputError, match="unknown stage 'trian'.*evaluate"):
        Pipeline(config([{"trian": {}}]), RunOptions(workdir))
    with pytest.raises(InputError, match=r"stages\[0\].train.epocs: unknown key \(did you mean 'epochs'\?\)"):
        Pipeline(config([{"train": {"epocs": 3}}]), RunOptions(workdir))
    with pytest.raises(InputError, match=r"stages\[0\].train.lr = 'fast'"):
        Pipeline(config([{"train": {"lr": "fast"}}]), RunOptions(workdir))


def test_finished_stage_survives_a_tracking_failure(workdir, monkeypatch):
    from deploypipe.tracking import StageTracker

    cfg = config([TRAIN])
    real = StageTracker.log_artifacts

    def down(self, directory):
        raise ConnectionError("tracking server went away")

    monkeypatch.setattr(StageTracker, "log_artifacts", down)
    with pytest.raises(StageFailed, match="outputs kept .*logging to MLflow failed"):
        Pipeline(cfg, RunOptions(workdir, show_progress=False)).run()
    result = json.loads((workdir / "p" / "train" / "result.json").read_text())
    assert result["tracked"] is False and (workdir / "p" / "train" / "model" / "weights.pt").is_file()
    monkeypatch.setattr(StageTracker, "log_artifacts", real)
    s = Pipeline(cfg, RunOptions(workdir, show_progress=False)).run()
    assert s.stages[0].status == "skipped"  # not trained again ...
    c = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    assert "model" in {a.path for a in c.list_artifacts(s.stages[0].run_id)}  # ... but uploaded now
    assert json.loads((workdir / "p" / "train" / "result.json").read_text())["tracked"] is True


def test_one_run_per_output_folder(workdir):
    import fcntl

    cfg = config([TRAIN])
    (workdir / "p").mkdir()
    with open(workdir / "p" / ".lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)  # another run holds the folder
        with pytest.raises(InputError, match="another deploypipe run is using"):
            Pipeline(cfg, RunOptions(workdir, show_progress=False)).run()


def test_resume_key_follows_user_factory_source_and_overrides(workdir, tmp_path, monkeypatch):
    mod = tmp_path / "keyed_models.py"
    mod.write_text("import torch.nn as nn\ndef make():\n    return nn.Sequential(nn.Flatten(), nn.Linear(64, 10))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = validate(PipelineConfig, {"name": "k", "model": "keyed_models:make", "data": {"source": "digits", "limit_test": 50},
                                    "stages": [{"evaluate": {"latency_repeats": 1}}]}, "test")
    assert Pipeline(cfg, RunOptions(workdir, show_progress=False)).run().stages[0].status == "ran"
    assert Pipeline(cfg, RunOptions(workdir, show_progress=False)).run().stages[0].status == "skipped"
    mod.write_text(mod.read_text() + "# edited\n")  # the architecture's source changed
    assert Pipeline(cfg, RunOptions(workdir, show_progress=False)).run().stages[0].status == "ran"
    p = Pipeline(cfg, RunOptions(workdir, seed=7, show_progress=False))  # a CLI override is part of what is logged and keyed
    s = p.run()
    assert s.stages[0].status == "ran" and p.cfg.seed == 7
    assert "seed: 7" in (workdir / "k" / "pipeline.yaml").read_text()


def test_stage_ids_must_be_safe_folder_names():
    with pytest.raises(InputError, match="stages"):
        config([{"train": {}, "id": "../escape"}])
