"""Zoo architectures, saving/reloading without pickle, user factories and checkpoint checks."""

import json
import sys
import textwrap

import pytest
import torch
from torch import nn

from deploypipe.config import ModelSpec
from deploypipe.errors import InputError
from deploypipe.models import (ModelRecord, build_model, content_hash, load_model, model_from_spec,
                               register_transform, save_model)
from deploypipe.evaluation import parameter_count as count_parameters
from deploypipe.zoo import ZOO


def resnet_depth(model: nn.Module) -> int:
    """Weighted layers (convs + the classifier), as He et al. count depth."""
    return sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in model.modules())


@pytest.mark.parametrize("name, params, depth", [
    # He et al. 2016, Table 6: ResNet-20 0.27M, ResNet-56 0.85M, ResNet-110 1.7M parameters (option-A shortcuts)
    ("resnet20", 269_722, 20), ("resnet56", 853_018, 56), ("resnet110", 1_727_962, 110)])
def test_cifar_resnets_match_the_paper(name, params, depth):
    m = ZOO[name]()
    assert count_parameters(m) == params
    paper, digit = {"resnet20": (0.27, 0.01), "resnet56": (0.85, 0.01), "resnet110": (1.7, 0.1)}[name]
    assert abs(count_parameters(m) / 1e6 - paper) < digit / 2  # the paper's figure, to its last digit
    assert resnet_depth(m) == depth
    assert m(torch.rand(2, 3, 32, 32)).shape == (2, 10)


def test_resnet8_is_one_block_per_stage():
    # by hand: stem conv 3*16*9; blocks (cin*cout + cout*cout)*9 for 16->16, 16->32, 32->64;
    # BatchNorm (gamma, beta) after the stem and each of the 6 block convs; the 64->10 classifier
    convs = 3 * 16 * 9 + sum((cin * cout + cout * cout) * 9 for cin, cout in ((16, 16), (16, 32), (32, 64)))
    norms = 2 * (16 + 2 * 16 + 2 * 32 + 2 * 64)
    m = ZOO["resnet8"]()
    assert count_parameters(m) == convs + norms + 64 * 10 + 10 == 75_290
    assert resnet_depth(m) == 8 and m(torch.rand(2, 3, 32, 32)).shape == (2, 10)


def test_vit_tokens_and_output():
    m = ZOO["vit_tiny"](num_classes=7, image_size=32, patch=4)
    assert m.pos_embed.shape[1] == 8 * 8 + 1
    assert m(torch.rand(3, 3, 32, 32)).shape == (3, 7)
    with pytest.raises(ValueError, match="multiple of the patch"):
        ZOO["vit_tiny"](image_size=30)


def test_normalize_is_part_of_the_model():
    m = ZOO["digits_cnn"](mean=(0.25,), std=(0.5,)).eval()
    x = torch.rand(4, 1, 8, 8)
    manual = nn.Sequential(*list(m.children())[1:]).eval()
    torch.testing.assert_close(m(x), manual((x - 0.25) / 0.5))


def test_save_load_roundtrip_is_exact(tmp_path):
    spec = ModelSpec(spec="zoo:resnet20")
    model, record = model_from_spec(spec, (3, 32, 32), 10, [0.5] * 3, [0.25] * 3)
    with torch.no_grad():  # non-trivial BN statistics and weights
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
                m.weight.uniform_(0.5, 1.5)
    model.eval()
    save_model(model, record, tmp_path / "m")
    saved = json.loads((tmp_path / "m" / "model.json").read_text())
    assert saved["factory"] == "zoo:resnet20" and saved["kwargs"]["mean"] == [0.5] * 3
    again = load_model(tmp_path / "m")
    x = torch.rand(5, 3, 32, 32)
    assert torch.equal(model(x), again(x))
    save_model(again, record, tmp_path / "m2")  # a second, separate save has the same identity
    assert content_hash(tmp_path / "m") == content_hash(tmp_path / "m2")
    with torch.no_grad():
        again.fc.bias[0] += 1e-3
    save_model(again, record, tmp_path / "m3")
    assert content_hash(tmp_path / "m3") != content_hash(tmp_path / "m")


class Doubler(nn.Module):
    def __init__(self, inner, factor):
        super().__init__()
        self.inner, self.factor = inner, factor
        self.register_buffer("scale", torch.ones(1))

    def forward(self, x):
        return self.inner(x) * self.factor * self.scale


@register_transform("test-doubler")
def _apply_doubler(model, params):
    return Doubler(model, params["factor"])


def test_transform_records_are_replayed_on_load(tmp_path):
    record = ModelRecord("zoo:digits_cnn", {"num_classes": 10}, input_shape=[1, 8, 8], num_classes=10)
    base = build_model(record).eval()
    rec2 = record.with_transform("test-doubler", __name__, {"factor": 3.0})
    model = _apply_doubler(base, {"factor": 3.0})
    model.scale.fill_(0.5)  # state that only the state dict carries
    save_model(model, rec2, tmp_path / "m")
    with pytest.raises(InputError, match="imports only its own transform modules"):
        load_model(tmp_path / "m")  # a transform module nobody named is not imported
    again = load_model(tmp_path / "m", trusted=[__name__])
    assert isinstance(again, Doubler) and again.factor == 3.0
    x = torch.rand(2, 1, 8, 8)
    assert torch.equal(again(x), model(x))


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "user_models_for_test.py").write_text(textwrap.dedent("""
        import torch.nn as nn
        def make(num_classes=10, width=8):
            return nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.ReLU(), nn.Flatten(),
                                 nn.Linear(width * 64, num_classes))
        def not_a_model():
            return 3
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    yield tmp_path
    sys.modules.pop("user_models_for_test", None)


def test_user_factory_with_checkpoint_and_normalisation(user_module, tmp_path):
    import user_models_for_test as um

    net = um.make(width=4)
    torch.save(net.state_dict(), tmp_path / "ck.pt")
    spec = ModelSpec(spec="user_models_for_test:make", checkpoint=tmp_path / "ck.pt", kwargs={"width": 4},
                     mean=[0.5], std=[0.2])
    model, record = model_from_spec(spec, (1, 8, 8), 10, [0.0], [1.0])
    x = torch.rand(3, 1, 8, 8)
    torch.testing.assert_close(model(x), net((x - 0.5) / 0.2))
    save_model(model, record, tmp_path / "saved")
    torch.testing.assert_close(load_model(tmp_path / "saved")(x), net((x - 0.5) / 0.2))


@pytest.mark.parametrize("spec, kwargs, match", [
    ("user_models_for_test:make", {"width": 16}, "does not fit .*shape mismatch"),
    ("user_models_for_test:nothing", {}, "has no callable 'nothing'"),
    ("no_such_module_xyz:make", {}, "cannot import module"),
    ("user_models_for_test:not_a_model", {}, "not an nn.Module"),
    ("zoo:resnet99", {}, "unknown zoo model"),
    ("user_models_for_test:make", {"widht": 4}, "rejected its arguments"),
    ("just-a-name", {}, "neither zoo:NAME"),
])
def test_bad_model_specs(user_module, tmp_path, spec, kwargs, match):
    import user_models_for_test as um

    torch.save(um.make(width=4).state_dict(), tmp_path / "ck.pt")
    s = ModelSpec(spec=spec, kwargs=kwargs, checkpoint=tmp_path / "ck.pt" if "make" in spec else None)
    with pytest.raises(InputError, match=match):
        model_from_spec(s, (1, 8, 8), 10, [0.0], [1.0])


def test_model_that_does_not_fit_the_data(user_module):
    with pytest.raises(InputError, match="outputs shape .* 3 classes"):
        model_from_spec(ModelSpec(spec="user_models_for_test:make"), (1, 8, 8), 3, [0.0], [1.0])
    with pytest.raises(InputError, match="cannot take input images of shape"):
        model_from_spec(ModelSpec(spec="user_models_for_test:make"), (3, 32, 32), 10, [0.0], [1.0])


def test_pickled_module_is_refused(tmp_path):
    torch.save(nn.Linear(2, 2), tmp_path / "whole_model.pt")  # a pickled module, not a state dict
    s = ModelSpec(spec="zoo:digits_cnn", checkpoint=tmp_path / "whole_model.pt")
    with pytest.raises(InputError, match="weights_only=True"):
        model_from_spec(s, (1, 8, 8), 10, [0.0], [1.0])
    with pytest.raises(InputError, match="does not exist"):
        model_from_spec(ModelSpec(spec="zoo:digits_cnn", checkpoint=tmp_path / "nope.pt"), (1, 8, 8), 10, [0.0], [1.0])


def test_wrapped_checkpoints_are_unwrapped(tmp_path):
    m = ZOO["digits_cnn"]()
    torch.save({"state_dict": {f"module.{k}": v for k, v in m.state_dict().items()}, "epoch": 3}, tmp_path / "ck.pt")
    loaded, _ = model_from_spec(ModelSpec(spec="zoo:digits_cnn", checkpoint=tmp_path / "ck.pt"), (1, 8, 8), 10, [0.3], [0.4])
    x = torch.rand(2, 1, 8, 8)
    assert torch.equal(loaded.eval()(x), m.eval()(x))


def test_a_model_folder_cannot_run_code_it_names(tmp_path, cli_store):
    """A copied or downloaded model/ folder whose model.json names ``os:system`` (with a command in its
    kwargs) or a transform module of its own is refused with one line before anything is imported or
    called; a factory the user names (--trust-factory) loads."""
    import json

    from conftest import run_main
    from deploypipe.models import ModelRecord, build_model, save_model

    record = ModelRecord(factory="zoo:digits_cnn", input_shape=[1, 8, 8], num_classes=10)
    good = save_model(build_model(record), record, tmp_path / "good")
    evil = tmp_path / "evil"
    evil.mkdir()
    (evil / "weights.pt").write_bytes((good / "weights.pt").read_bytes())
    spec = json.loads((good / "model.json").read_text())
    marker = tmp_path / "PWNED"
    (evil / "model.json").write_text(json.dumps({**spec, "factory": "os:system",
                                                 "kwargs": {"command": f"touch {marker}"}}))
    code, _, err = run_main("evaluate", "--model", str(evil), "--out", "e1", cwd=tmp_path)
    assert code == 2 and "'os:system', a factory nobody named" in err and "--trust-factory os:system" in err
    assert not marker.exists() and not (tmp_path / "e1" / "evaluate").exists()
    (tmp_path / "sneaky.py").write_text(f"open({str(marker)!r}, 'w').write('imported')\n")
    (evil / "model.json").write_text(json.dumps({**spec, "transforms": [
        {"kind": "sneaky", "module": "sneaky", "params": {}}]}))
    code, _, err = run_main("evaluate", "--model", str(evil), "--out", "e2", cwd=tmp_path)
    assert code == 2 and "import 'sneaky'" in err and not marker.exists()
    (tmp_path / "trusty_nets.py").write_text("import torch\n\ndef net(num_classes=10):\n"
                                              "    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, num_classes))\n")
    user = ModelRecord(factory="trusty_nets:net", kwargs={"num_classes": 10}, input_shape=[1, 8, 8], num_classes=10)
    import sys

    sys.path.insert(0, str(tmp_path))
    try:
        mine = save_model(build_model(user, trusted=["trusty_nets:net"]), user, tmp_path / "mine")
    finally:
        sys.path.remove(str(tmp_path))
    code, _, err = run_main("evaluate", "--model", str(mine), "--out", "e3", cwd=tmp_path)
    assert code == 2 and "trusty_nets:net" in err
    code, out, err = run_main("evaluate", "--model", str(mine), "--trust-factory", "trusty_nets:net", "--out", "e3",
                              "--limit-test", "50", cwd=tmp_path)
    assert code == 0, err
