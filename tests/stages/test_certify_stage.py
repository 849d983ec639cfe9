"""The certify stage in a pipeline: noise-trained digits CNN -> W8A8 quantize -> certify the quantized
model with the FP32 one as reference; CSV, metrics that agree with the CSV, the plot; shards that
merge into exactly the unsharded result, also as torchrun ranks; DRS on half-width side models; bad options exit 2."""

import csv
import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import assert_sound_certificates, last_json, run_cli, run_main
from deploypipe.config import PipelineConfig, validate
from deploypipe.errors import InputError, StageFailed
from deploypipe.pipeline import Pipeline, RunOptions
from deploypipe.stages.certify.merge import merge_shards
from deploypipe.stages.certify.config import CertifyConfig
from deploypipe.stages.certify.report import summarize
from deploypipe.stages.certify.runner import select_images


def test_select_images_and_shards():
    assert select_images(10, 5, None, None) == [0, 2, 4, 6, 8]
    assert select_images(10, None, 3, None) == [0, 3, 6, 9]
    assert select_images(10, 500, None, None) == list(range(10))
    parts = [select_images(450, 100, None, f"{i}/3") for i in range(3)]
    assert sorted(sum(parts, [])) == select_images(450, 100, None, None)


def test_summary_by_hand():
    rows = [{"prediction": 1, "label": 1, "correct": 1, "radius": 0.6}, {"prediction": 2, "label": 1, "correct": 0, "radius": 0.9},
            {"prediction": -1, "label": 0, "correct": 0, "radius": 0.0}, {"prediction": 0, "label": 0, "correct": 1, "radius": 0.2}]
    m = summarize(rows, [0.0, 0.25, 0.5, 1.0])
    assert m == {"certified_acc_r0": 0.5, "certified_acc_r0.25": 0.25, "certified_acc_r0.5": 0.25,
                 "certified_acc_r1": 0.0, "acr": (0.6 + 0.2) / 4, "abstain_rate": 0.25}


def test_certify_the_quantized_model_against_its_fp32_input(workdir):
    cfg = validate(PipelineConfig, {
        "name": "c", "model": "zoo:digits_cnn", "data": {"source": "digits", "calib_size": 128},
        "stages": [{"train": {"epochs": 8, "batch_size": 64, "lr": 0.05, "noise_sigma": 0.25}},
                   {"quantize": {"weight_bits": 8, "act_bits": 8, "method": "rtn"}},
                   {"certify": {"sigma": 0.25, "n0": 20, "n": 400, "alpha": 0.01, "num_images": 12, "batch_size": 200,
                                "reference": str(workdir / "c" / "train" / "model")}},
                   {"certify": {"sigma": 0.25, "n0": 20, "n": 400, "alpha": 0.01, "num_images": 12, "batch_size": 200,
                                "onnx": str(workdir / "c" / "quantize" / "model.onnx")}, "id": "certify-onnx"}]},
                   "test")
    stages = Pipeline(cfg, RunOptions(workdir, show_progress=False)).run().stages
    m, shipped = stages[2].metrics, stages[3].metrics
    # the exported file, certified in ONNX Runtime with the same noise, certifies like the PyTorch model
    assert shipped["certified_acc_r0"] == pytest.approx(m["certified_acc_r0"], abs=1 / 12 + 1e-9)
    assert shipped["acr"] == pytest.approx(m["acr"], abs=0.05)
    out = workdir / "c" / "certify"
    rows = [{k: float(v) for k, v in r.items()} for r in csv.DictReader(open(out / "certify.csv"))]
    assert len(rows) == 12 and (out / "certified_accuracy.png").is_file() and (out / "certify_reference.csv").is_file()
    assert m["certified_acc_r0"] == pytest.approx(summarize(rows, [0.0])["certified_acc_r0"])
    assert m["certified_acc_r0"] >= 0.5  # a noise-trained digits CNN is mostly right under sigma 0.25
    # every row's bound and radius recomputed from its vote count with SciPy, none beyond what n = 400 allows
    assert_sound_certificates(out / "certify.csv", 0.25, 400, 0.01)
    assert_sound_certificates(out / "certify_reference.csv", 0.25, 400, 0.01)
    assert {"reference_acr", "acr_lost", "reference_certified_acc_r0.5"} <= set(m)
    assert abs(m["acr_lost"]) < 0.2  # W8A8 barely moves it


@pytest.mark.usefixtures("cli_store")
def test_shards_merge_into_the_unsharded_result(tmp_path):
    res = run_cli("train", "--model", "zoo:digits_cnn", "--epochs", "3", "--lr", "0.05", "--noise-sigma", "0.25",
                  "--out", "out", "--json", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    model = last_json(res.stdout)["stages"][0]["model"]
    common = ["certify", "--model", model, "--n0", "10", "--n", "100", "--alpha", "0.01", "--num-images", "9",
              "--batch-size", "64"]
    full = run_cli(*common, "--out", "all", cwd=tmp_path)
    assert full.returncode == 0, full.stderr[-2000:]
    # the shards also certify a reference (the same model: it must lose exactly 0), so both tables merge
    rows = []
    for i in range(3):
        part = run_cli(*common, "--reference", model, "--shard", f"{i}/3", "--out", f"shard{i}", cwd=tmp_path)
        assert part.returncode == 0, part.stderr[-2000:]
        rows += list(csv.DictReader(open(tmp_path / f"shard{i}" / "certify" / "certify.csv")))
    want = list(csv.DictReader(open(tmp_path / "all" / "certify" / "certify.csv")))
    strip = lambda rs: sorted(({k: v for k, v in r.items() if k != "seconds"} for r in rs), key=lambda r: int(r["index"]))  # noqa: E731
    assert strip(rows) == strip(want)
    merged = run_cli("certify-merge", *[f"shard{i}/certify" for i in range(3)], "--out", "merged", cwd=tmp_path)
    assert merged.returncode == 0, merged.stderr[-2000:]
    whole = json.load(open(tmp_path / "all" / "certify" / "result.json"))["metrics"]
    got = json.load(open(tmp_path / "merged" / "metrics.json"))
    same = got.keys() & whole.keys()  # the same metrics as the unsharded run (which also has its timings)
    assert {"acr", "certified_acc_r0", "certified_acc_r1.5"} <= same and all(got[k] == pytest.approx(whole[k]) for k in same)
    assert got["acr_lost"] == 0 and got["reference_acr"] == pytest.approx(whole["acr"])
    assert len(list(csv.DictReader(open(tmp_path / "merged" / "certify_reference.csv")))) == 9
    assert (tmp_path / "merged" / "certified_accuracy.png").is_file()
    from mlflow import MlflowClient  # the merged result is an MLflow run too, beside the shards' stage runs

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("deploypipe")
    (run,) = client.search_runs([exp.experiment_id], "tags.`deploypipe.kind` = 'certify-merge'")
    assert run.data.metrics["acr"] == pytest.approx(whole["acr"]) and run.data.params["certify.num_images"] == "9"
    assert {"certify.csv", "certified_accuracy.png", "metrics.json"} <= {a.path for a in client.list_artifacts(run.info.run_id)}
    # the refusals below stop before any work: the CLI's entry point in this process (run_main)
    code, _, err = run_main("certify-merge", *[f"shard{i}/certify" for i in range(3)], "--out", "m0",
                            "--tracking-uri", "http://127.0.0.1:9", cwd=tmp_path)
    assert code == 2 and "unreachable" in err and not (tmp_path / "m0").exists()
    # torchrun, one shard per rank: each rank writes <out>/rank<r>/certify, and they merge to the same result
    launch = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                             "-m", "deploypipe.cli", "--", *common, "--out", "tr"], cwd=tmp_path, capture_output=True,
                            text=True, timeout=300, env={k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"})
    assert launch.returncode == 0, launch.stderr[-3000:]
    ranks = [list(csv.DictReader(open(tmp_path / "tr" / f"rank{r}" / "certify" / "certify.csv"))) for r in range(2)]
    assert strip(sum(ranks, [])) == strip(want) and all(ranks)
    _, merged_rows, _ = merge_shards([tmp_path / "tr" / f"rank{r}" / "certify" for r in range(2)])
    got_tr = summarize(merged_rows, [0.0, 0.5, 1.0])
    assert all(got_tr[k] == pytest.approx(whole[k]) for k in got_tr)  # the ranks merge to the unsharded metrics
    code, _, err = run_main("evaluate", "--model", "zoo:digits_cnn", "--out", "tr-eval", cwd=tmp_path,
                            env={"RANK": "1", "WORLD_SIZE": "2"})  # what each torchrun rank would see
    assert code == 2 and "does not split its work" in err and not (tmp_path / "tr-eval").exists()
    # the refusals of the merge itself (the CLI turns them into exit 2, as the --out refusals below)
    shards = [tmp_path / f"shard{i}" / "certify" for i in range(3)]
    with pytest.raises(InputError, match="not all k shards"):
        merge_shards([shards[0], shards[2]])
    # each shard records which seed, data and weights it certified; a shard of another run is refused
    prov = [json.load(open(s / "provenance.json")) for s in shards]
    assert prov[0] == prov[1] == prov[2] and len(prov[0]["model"]) == 64 and prov[0]["test_images"] == 450
    shutil.copytree(shards[2], tmp_path / "other2")
    json.dump({**prov[2], "seed": prov[2]["seed"] + 1}, open(tmp_path / "other2" / "provenance.json", "w"))
    with pytest.raises(InputError, match="different seed"):
        merge_shards([shards[0], shards[1], tmp_path / "other2"])
    shutil.copytree(shards[2], tmp_path / "bad2")
    (tmp_path / "bad2" / "certify.csv").write_text("index,label,prediction,radius\n4,1,1,wide\n")
    with pytest.raises(InputError, match="is not a certify table"):
        merge_shards([shards[0], shards[1], tmp_path / "bad2"])
    # --out never replaces a shard or a folder that is not an earlier merge output; an earlier merge it does
    for target, why in (("shard0/certify", "would replace the shard"), ("all", "not an earlier merge output")):
        code, _, err = run_main("certify-merge", *[f"shard{i}/certify" for i in range(3)], "--out", target, cwd=tmp_path)
        assert code == 2 and why in err, err
    assert (tmp_path / "shard0" / "certify" / "certify.csv").is_file() and (tmp_path / "all" / "certify").is_dir()
    code, _, err = run_main("certify-merge", *[f"shard{i}/certify" for i in range(3)], "--out", "merged", cwd=tmp_path)
    assert code == 0, err[-2000:]
    assert json.load(open(tmp_path / "merged" / "metrics.json")) == got


def test_a_classifier_that_does_not_fit_the_data_is_refused_before_any_work():
    import torch

    from deploypipe.stages.certify.classifier import check_outputs, weights_hash

    x = torch.rand(2, 1, 8, 8)
    check_outputs(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10)), x, 10, "model")
    with pytest.raises(InputError, match="returns outputs of shape \\(11,\\), the data has 10 classes"):
        check_outputs(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 11)), x, 10, "reference")
    with pytest.raises(InputError, match="does not run on inputs of shape \\(1, 8, 8\\)"):
        check_outputs(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(32, 10)), x, 10, "model_right")
    a, b = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    b.load_state_dict(a.state_dict())
    assert weights_hash(a) == weights_hash(b)
    with torch.no_grad():
        b.bias[0] += 1e-6
    assert weights_hash(a) != weights_hash(b)


def test_options_are_checked():
    with pytest.raises(InputError, match="model_right is for method drs"):
        validate(CertifyConfig, {"model_right": "x"}, "certify")
    with pytest.raises(InputError, match="shard must be i/k"):
        validate(CertifyConfig, {"shard": "half"}, "certify")
    with pytest.raises(InputError, match="0 <= i < k"):
        validate(CertifyConfig, {"shard": "3/3"}, "certify")
    with pytest.raises(InputError, match="give num_images or every, not both"):
        validate(CertifyConfig, {"num_images": 100, "every": 20}, "certify")
    with pytest.raises(InputError, match="at least 1 item"):  # else it fails at the plot, after all the work
        validate(CertifyConfig, {"radii": []}, "certify")
    with pytest.raises(InputError, match="radii must be >= 0"):
        validate(CertifyConfig, {"radii": [0.5, -0.25]}, "certify")
    cfg = validate(CertifyConfig, {"every": 20}, "certify")  # the saved config names the images certified
    assert (cfg.num_images, cfg.every) == (None, 20)
    assert validate(CertifyConfig, cfg.model_dump(), "certify") == cfg


@pytest.mark.usefixtures("cli_store")
def test_bad_onnx_and_reference_inputs_are_refused_before_any_certificate(tmp_path):
    (tmp_path / "notes.onnx").write_text("not a protobuf")
    common = ["certify", "--model", "zoo:digits_cnn", "--n0", "10", "--n", "100", "--num-images", "3"]
    code, _, err = run_main(*common, "--onnx", "notes.onnx", "--out", "o1", cwd=tmp_path)
    assert code == 2 and "cannot be loaded by ONNX Runtime" in err and "Traceback" not in err, err[-2000:]
    (tmp_path / "empty").mkdir()  # the reference is checked before the model's certification, not hours after
    code, _, err = run_main(*common, "--reference", "empty", "--out", "o2", cwd=tmp_path)
    assert code == 2 and "certify reference 'empty' is not a saved model folder" in err, err[-2000:]
    assert not list((tmp_path / "o2").rglob("*.jsonl")) and not list((tmp_path / "o2").rglob("certify.csv"))


def test_autocast_wrapper_keeps_float32_at_the_boundary():
    import torch

    from deploypipe.stages.certify.classifier import Autocast
    from deploypipe.zoo import digits_cnn

    model = digits_cnn().eval()
    x = torch.rand(4, 1, 8, 8)
    out = Autocast(model, torch.device("cpu"))(x)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, model(x), atol=0.1, rtol=0.1)  # bfloat16 inside: close, not equal


@pytest.mark.usefixtures("cli_store")
def test_drs_takes_a_side_model_that_only_fits_half_images(tmp_path):
    # a side model with a fixed input size (here 1 x 8 x 4 for the 8 x 8 digits) is checked against the
    # half-images DRS feeds it, not against the data's full images
    (tmp_path / "halfmlp.py").write_text("from torch import nn\n\n\ndef mlp():\n"
                                         "    return nn.Sequential(nn.Flatten(), nn.Linear(32, 10))\n")
    common = ["certify", "--model", "halfmlp:mlp", "--n0", "10", "--n", "50", "--num-images", "2"]
    drs = run_cli(*common, "--method", "drs", "--out", "drs", cwd=tmp_path)
    assert drs.returncode == 0, drs.stderr[-2000:]
    rows = assert_sound_certificates(tmp_path / "drs" / "certify" / "certify.csv", 0.25, 50, 0.001, "drs")
    assert len(rows) == 2 and "p_lower_right" in rows[0]
    side = run_cli("train", "--model", "halfmlp:mlp", "--drs-side", "left", "--epochs", "1", "--out", "side", cwd=tmp_path)
    assert side.returncode == 0, side.stderr[-2000:]  # training a side model feeds it half-images too
    code, _, err = run_main(*common, "--out", "rs", cwd=tmp_path)  # RS feeds it full images: refused, nothing written
    assert code == 2 and "cannot take input images of shape (1, 8, 8)" in err
    assert not (tmp_path / "rs" / "certify").exists()



def test_a_later_stage_that_feeds_other_images_is_refused_before_it_starts(tmp_path, workdir, monkeypatch):
    # [certify drs, evaluate] on a half-image side model: certify runs and is kept; evaluate would feed
    # full images, so it is refused with an input error before its stage run starts
    (tmp_path / "halfmlp2.py").write_text("from torch import nn\n\n\ndef mlp():\n"
                                          "    return nn.Sequential(nn.Flatten(), nn.Linear(32, 10))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = validate(PipelineConfig, {"name": "g", "model": "halfmlp2:mlp", "data": "digits", "stages": [
        {"certify": {"method": "drs", "n0": 10, "n": 50, "num_images": 2}}, {"evaluate": {}}]}, "test")
    with pytest.raises(InputError, match=r"stage 'evaluate' feeds its model images of shape \(1, 8, 8\), but the "
                                         r"model it gets takes the images stage 'certify' fed it, \(1, 8, 4\)"):
        Pipeline(cfg, RunOptions(workdir, show_progress=False)).run()
    assert (workdir / "g" / "certify" / "result.json").is_file() and not (workdir / "g" / "evaluate").exists()
    assert not list((workdir / "g").glob(".evaluate.partial-*"))


def test_an_interrupted_certify_resumes_with_the_same_certificates(tmp_path, workdir, monkeypatch, capfd):
    # the base classifier "loses power" after a few images; the rerun reads the finished images back
    # from the stage's journal and certifies only the rest: the table equals an uninterrupted run's
    (tmp_path / "flaky.py").write_text(
        "from pathlib import Path\nfrom torch import nn\n\nCALLS = [0]\n\n\nclass Net(nn.Module):\n"
        "    def __init__(self):\n        super().__init__()\n        self.fc = nn.Linear(64, 10)\n\n"
        "    def forward(self, x):\n        CALLS[0] += 1\n"
        "        if Path(__file__).with_name('cut').exists() and CALLS[0] > 6:\n"
        "            raise RuntimeError('power cut')\n        return self.fc(x.flatten(1))\n\n\n"
        "def net():\n    return Net()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    certify = {"n0": 10, "n": 50, "alpha": 0.01, "num_images": 8, "batch_size": 60, "runtime": "torch"}
    config = lambda name: validate(PipelineConfig, {"name": name, "model": "flaky:net", "data": "digits",  # noqa: E731
                                                   "stages": [{"certify": certify}]}, "test")
    Pipeline(config("whole"), RunOptions(workdir, show_progress=False)).run()
    want = list(csv.DictReader(open(workdir / "whole" / "certify" / "certify.csv")))
    import flaky

    (tmp_path / "cut").touch()
    flaky.CALLS[0] = 0
    with pytest.raises(StageFailed):
        Pipeline(config("cut"), RunOptions(workdir, show_progress=False)).run()
    journal = (workdir / "cut" / ".work" / "certify" / "model.jsonl").read_text().splitlines()
    assert 1 < len(journal) < 9 and not (workdir / "cut" / "certify").exists()  # some images, not all
    (tmp_path / "cut").unlink()
    capfd.readouterr()
    Pipeline(config("cut"), RunOptions(workdir, show_progress=False)).run()
    assert f"resumed {len(journal) - 1} of 8 images" in capfd.readouterr().err
    got = list(csv.DictReader(open(workdir / "cut" / "certify" / "certify.csv")))
    strip = lambda rs: [{k: v for k, v in r.items() if k != "seconds"} for r in rs]  # noqa: E731
    assert strip(got) == strip(want) and not (workdir / "cut" / ".work" / "certify").exists()



def test_reuse_grows_a_certification_with_the_table_a_fresh_run_gives(tmp_path, workdir, monkeypatch, capfd):
    # 12 images (every 40th), then 23 (every 20th) reusing them: the 12 are read back (their own seconds),
    # 11 are certified, and the table equals a fresh 23-image run's; the reference table likewise
    (tmp_path / "fixedlin.py").write_text("import torch\nfrom torch import nn\n\n\ndef net():\n"
                                          "    torch.manual_seed(0)\n    return nn.Sequential(nn.Flatten(), nn.Linear(64, 10))\n")
    monkeypatch.syspath_prepend(str(tmp_path))

    def run(name, stage, model="fixedlin:net", seed=0):
        cfg = validate(PipelineConfig, {"name": name, "model": model, "data": "digits", "seed": seed,
                                        "stages": [stage]}, "test")
        Pipeline(cfg, RunOptions(workdir, show_progress=False)).run()
        return workdir / name / next(iter(stage))

    saved = str(run("t", {"train": {"epochs": 1, "lr": 0.05}}) / "model")
    base = {"n0": 10, "n": 60, "alpha": 0.01, "batch_size": 70, "runtime": "torch", "reference": saved}
    table = lambda folder, name="certify": list(csv.DictReader(open(folder / f"{name}.csv")))  # noqa: E731
    few = run("few", {"certify": {**base, "every": 40}}, saved)
    capfd.readouterr()
    grown = run("grown", {"certify": {**base, "every": 20, "reuse": str(few)}}, saved)
    err = capfd.readouterr().err
    assert "reused 12 of 23 images (model)" in err and "reused 12 of 23 images (reference)" in err
    fresh = run("fresh", {"certify": {**base, "every": 20}}, saved)
    strip = lambda rs: [{k: v for k, v in r.items() if k != "seconds"} for r in rs]  # noqa: E731
    for name in ("certify", "certify_reference"):
        assert strip(table(grown, name)) == strip(table(fresh, name)) and len(table(grown, name)) == 23
        earlier = {r["index"]: r["seconds"] for r in table(few, name)}
        assert {r["index"]: r["seconds"] for r in table(grown, name) if r["index"] in earlier} == earlier  # read back
    assert any(r["radius"] != "0.0" for r in table(fresh)) and {r["index"] for r in table(few)} < {r["index"] for r in table(grown)}
    # refused, one line each, before any certificate: other settings, another seed, not a certify folder
    for stage, seed, match in (({**base, "every": 20, "sigma": 0.5, "reuse": str(few)}, 0, r"other settings \(sigma\)"),
                               ({**base, "every": 20, "reuse": str(few)}, 1, "another seed"),
                               ({**base, "every": 20, "reuse": str(tmp_path)}, 0, "not a certify output folder"),
                               ({**base, "every": 20, "reuse": str(tmp_path / "nowhere")}, 0, "is not a folder")):
        with pytest.raises(InputError, match=match):
            run("bad", {"certify": stage}, saved, seed)
        assert not (workdir / "bad" / "certify").exists()

def test_the_journal_is_read_back_only_for_the_same_weights_and_images(tmp_path):
    from deploypipe.stages.certify.runner import read_journal

    ident = {"model": "abc", "indices": [0, 5, 10]}
    rows = [{"index": 0, "radius": 0.25}, {"index": 5, "radius": 0.5}]
    path = tmp_path / "model.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [ident, *rows]) + '\n{"index": 10, "rad')  # cut short
    assert read_journal(path, ident, [0, 5, 10]) == rows
    assert read_journal(path, {**ident, "model": "abd"}, [0, 5, 10]) == []  # other weights: certify afresh
    assert read_journal(path, ident, [5, 10]) == rows[1:]
    assert read_journal(tmp_path / "none.jsonl", ident, [0]) == []


@pytest.mark.usefixtures("cli_store")
def test_out_of_memory_halves_the_forward_chunk_first_and_keeps_the_noise(tmp_path):
    (tmp_path / "oomy.py").write_text(
        "import torch\nfrom torch import nn\n\n\nclass Net(nn.Module):\n    def __init__(self):\n"
        "        super().__init__()\n        self.fc = nn.Linear(64, 10)\n\n    def forward(self, x):\n"
        "        if x.shape[0] > 16:  # what a GPU says when the activations do not fit\n"
        "            raise torch.OutOfMemoryError('CUDA out of memory (simulated)')\n"
        "        return self.fc(x.flatten(1))\n\n\ndef net():\n    return Net()\n")
    common = ["certify", "--model", "oomy:net", "--n0", "10", "--n", "100", "--num-images", "3", "--runtime", "torch",
              "--batch-size", "64"]
    tight = run_cli(*common, "--out", "tight", cwd=tmp_path)
    assert tight.returncode == 0, tight.stderr[-2000:]
    assert "the model now sees chunks of 16 (the same noise)" in tight.stderr and "batch size halved" not in tight.stderr
    small = run_cli(*common, "--forward-batch", "16", "--out", "small", cwd=tmp_path)
    assert small.returncode == 0, small.stderr[-2000:]
    rows = [[{k: v for k, v in r.items() if k != "seconds"}
             for r in csv.DictReader(open(tmp_path / d / "certify" / "certify.csv"))] for d in ("tight", "small")]
    assert rows[0] == rows[1] and len(rows[0]) == 3


def test_merge_compares_shards_without_the_forward_chunk_and_reads_old_configs(tmp_path):
    import yaml

    from deploypipe.stages.certify.merge import merge_shards

    prov = {"seed": 0, "data": "d", "test_images": 8, "model": "m", "model_right": None, "reference": None}
    for i, (chunk, idx) in enumerate([(64, [0, 4]), (16, [2, 6])]):
        folder = tmp_path / f"s{i}"
        folder.mkdir()
        # saved before num_images and every became exclusive: both present; the forward chunks differ
        cfg = {"method": "rs", "sigma": 0.25, "n0": 10, "n": 100, "alpha": 0.01, "num_images": 500, "every": 2,
               "shard": f"{i}/2", "batch_size": 64, "forward_batch": chunk}
        (folder / "config.yaml").write_text(yaml.safe_dump({"certify": cfg}))
        (folder / "provenance.json").write_text(json.dumps(prov))
        (folder / "certify.csv").write_text("index,label,prediction,radius,correct,seconds,p_lower,count\n" + "".join(
            f"{j},1,1,0.1,1,0.5,0.6,70\n" for j in idx))
    cfg, rows, ref = merge_shards([tmp_path / "s0", tmp_path / "s1"])
    assert [r["index"] for r in rows] == [0, 2, 4, 6] and ref is None and (cfg.every, cfg.num_images) == (2, None)
    (tmp_path / "s1" / "config.yaml").write_text(yaml.safe_dump({"certify": {
        **yaml.safe_load((tmp_path / "s0" / "config.yaml").read_text())["certify"], "shard": "1/2", "n": 200}}))
    with pytest.raises(InputError, match=r"different settings \(n\)"):
        merge_shards([tmp_path / "s0", tmp_path / "s1"])
    for i, where in enumerate(("/node0/ref", "/node1/ref")):  # one reference model, copied to each node
        cfg = yaml.safe_load((tmp_path / f"s{i}" / "config.yaml").read_text())["certify"]
        (tmp_path / f"s{i}" / "config.yaml").write_text(yaml.safe_dump({"certify": {**cfg, "n": 100, "reference": where}}))
    assert merge_shards([tmp_path / "s0", tmp_path / "s1"])[0].reference == "/node0/ref"  # provenance: same weights
    (tmp_path / "s1" / "provenance.json").write_text(json.dumps({**prov, "reference": "other"}))
    with pytest.raises(InputError, match="different reference"):
        merge_shards([tmp_path / "s0", tmp_path / "s1"])
    for i in (0, 1):  # shards of an older version, without provenance: the paths are compared as given
        (tmp_path / f"s{i}" / "provenance.json").unlink()
    with pytest.raises(InputError, match=r"different settings \(reference\)"):
        merge_shards([tmp_path / "s0", tmp_path / "s1"])
    (tmp_path / "s1" / "config.yaml").write_text("certify: null\n")  # edited by hand: a one-line refusal, not a crash
    with pytest.raises(InputError, match="holds no certify settings"):
        merge_shards([tmp_path / "s0", tmp_path / "s1"])
    (tmp_path / "s1" / "config.yaml").write_text(yaml.safe_dump({"certify": {
        **yaml.safe_load((tmp_path / "s0" / "config.yaml").read_text())["certify"], "shard": "second"}}))
    with pytest.raises(InputError, match="is not a certify config \\(shard: .*shard must be i/k"):
        merge_shards([tmp_path / "s0", tmp_path / "s1"])
