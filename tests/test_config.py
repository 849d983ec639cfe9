"""Pipeline YAML schema: shorthand forms, stage ids, and errors that name the key path."""

import textwrap
from pathlib import Path

import pytest

from deploypipe.config import PipelineConfig, load_pipeline, validate
from deploypipe.errors import InputError


def write(tmp_path, text):
    p = tmp_path / "p.yaml"
    p.write_text(textwrap.dedent(text))
    return p


def test_shorthands_and_ids(tmp_path):
    cfg = load_pipeline(write(tmp_path, """
        name: demo
        model: zoo:digits_cnn
        data: digits
        stages:
          - train: {epochs: 2}
          - evaluate
          - evaluate: {batch_size: 8}
          - evaluate: {}
            id: last
    """))
    assert cfg.model.spec == "zoo:digits_cnn" and cfg.data.source == "digits"
    assert [(s.stage, s.id) for s in cfg.stages] == [("train", "train"), ("evaluate", "evaluate"),
                                                     ("evaluate", "evaluate-2"), ("evaluate", "last")]
    assert cfg.stages[0].config == {"epochs": 2}
    assert cfg.tracking.experiment == "deploypipe"


def test_yaml_syntax_error_names_line(tmp_path):
    p = write(tmp_path, """
        name: demo
        model: zoo:digits_cnn
        stages:
          - train: {epochs: 2
          - evaluate
    """)
    with pytest.raises(InputError) as e:
        load_pipeline(p)
    msg = str(e.value)
    assert "YAML syntax error" in msg and f"{p}:" in msg and "line" in msg
    assert "\n" not in msg


@pytest.mark.parametrize("text, expected", [
    ("name: d\nmodel: zoo:x\ndata: digits\nstages: [train]\nmodle: 3\n", "modle: unknown key"),
    ("name: d\nmodel: zoo:x\ndata: {source: digits, calib_sise: 3}\nstages: [train]\n", "data.calib_sise: unknown key (did you mean 'calib_size'?)"),
    ("name: d\nmodel: zoo:x\ndata: {source: digits, calib_size: many}\nstages: [train]\n", "data.calib_size = 'many'"),
    ("name: d\nmodel: zoo:x\ndata: digits\nstages: []\n", "stages = []"),
    ("name: d\ndata: digits\nstages: [train]\n", "model: required key is missing"),
    ("name: d\nmodel: zoo:x\ndata: digits\nstages: [{train: {}, evaluate: {}}]\n", "exactly one stage"),
])
def test_errors_name_the_key_path(tmp_path, text, expected):
    p = tmp_path / "p.yaml"
    p.write_text(text)
    with pytest.raises(InputError) as e:
        load_pipeline(p)
    assert expected in str(e.value)
    assert "\n" not in str(e.value)


def test_missing_file_and_non_mapping(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        load_pipeline(tmp_path / "nope.yaml")
    p = tmp_path / "list.yaml"
    p.write_text("- a\n- b\n")
    with pytest.raises(InputError, match="top level must be a mapping"):
        load_pipeline(p)


def test_mean_requires_std():
    with pytest.raises(InputError, match="mean and std together"):
        validate(PipelineConfig, {"name": "x", "model": {"spec": "m:f", "mean": [0.5]}, "data": "digits",
                                  "stages": ["train"]}, "cli")


def test_logged_yaml_round_trips(tmp_path):
    cfg = load_pipeline(write(tmp_path, """
        name: demo
        model: {spec: zoo:resnet20, kwargs: {num_classes: 10}}
        data: {source: digits, calib_size: 7}
        stages:
          - train: {epochs: 2}
          - evaluate
    """))
    again = tmp_path / "again.yaml"
    again.write_text(cfg.to_yaml())
    assert load_pipeline(again) == cfg


@pytest.mark.parametrize("name", ["demo.yaml", "cifar_ship.yaml", "robust_cifar.yaml"])
def test_example_pipelines_validate(name):
    """Every example a user copies parses, and each stage entry validates against its stage's config."""
    from deploypipe.config import load_pipeline
    from deploypipe.stage import load_stages

    cfg = load_pipeline(Path(__file__).resolve().parents[1] / "examples" / name)
    stages = load_stages()
    for entry in cfg.stages:
        stages[entry.stage].config.model_validate(entry.config)
