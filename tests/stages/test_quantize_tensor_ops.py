"""Quantizers on residual adds and attention matmuls: found where they should be (and nowhere else),
identity while disabled, the attention rewrite equal to scaled_dot_product_attention in float64,
Q/DQ on both inputs of every residual Add and activation MatMul in the ONNX file with ONNX Runtime
parity, and a quantized ResNet with them reloads exactly from the stage's output."""

import copy
import math

import onnx
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from deploypipe.config import DataSpec, PipelineConfig, validate
from deploypipe.data import load_data
from deploypipe.evaluation import top1_and_loss
from deploypipe.models import load_model
from deploypipe.pipeline import Pipeline, RunOptions
from deploypipe.stages.quantize.calibrate import init_ranges, init_tensor_ranges
from deploypipe.stages.quantize.modules import fold_batchnorm, quantizable_layers, wrap_layers
from deploypipe.onnx_export import export_onnx, onnx_parity
from deploypipe.stages.quantize.quantizer import fake_quant
from deploypipe.stages.quantize.tensor_ops import (ActQuant, QuantAttention, insert_tensor_quantizers, set_enabled,
                                                   tensor_quantizers)
from deploypipe.zoo import resnet20, vit_tiny


class BertLayer(nn.Module):
    """A BERT-style encoder layer with attention written out: two activation matmuls, two residual
    adds, a parameter add (not an activation pair) and shape arithmetic (not tensors)."""

    def __init__(self, dim=16, heads=2):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.ff1, self.ff2 = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)
        self.pos = nn.Parameter(torch.randn(1, 4, dim) * 0.1)

    def split(self, t):
        b, n, d = t.shape
        return t.view(b, n, self.heads, d // self.heads).transpose(1, 2)

    def forward(self, x):  # x: (B, 1, 4, dim) image-like input
        x = x.flatten(1, 2) + self.pos
        b, n, d = x.shape
        q, k, v = self.split(self.q(x)), self.split(self.k(x)), self.split(self.v(x))
        att = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(d // self.heads), dim=-1)
        ctx = torch.matmul(att, v).transpose(1, 2).reshape(b, n + 0 * (n + d), d)
        x = self.ln1(x + self.o(ctx))
        return self.ln2(x + self.ff2(F.gelu(self.ff1(x)))).mean(1)


def test_residual_adds_of_a_resnet_get_two_quantizers_each_and_nothing_changes_while_disabled():
    model = resnet20().eval()
    fold_batchnorm(model)
    x = torch.rand(4, 3, 32, 32)
    ref = model(x)
    g, records = insert_tensor_quantizers(copy.deepcopy(model), (3, 32, 32), 8, 8, enabled=False)
    assert len(records) == 2 * 9 and {r["op"] for r in records} == {"add"}  # 9 basic blocks
    torch.testing.assert_close(g(x), ref, rtol=0, atol=0)
    again, records2 = insert_tensor_quantizers(copy.deepcopy(model), (3, 32, 32), 8, 8)
    assert records2 == records  # tracing the same architecture gives the same names (reload relies on it)
    assert insert_tensor_quantizers(model, (3, 32, 32), None, None) == (model, [])


def test_bert_style_layer_quantizes_activation_pairs_only():
    layer = BertLayer().eval()
    g, records = insert_tensor_quantizers(layer, (1, 4, 16), 8, 8)
    ops = sorted(r["op"] for r in records)
    assert ops == ["add"] * 4 + ["matmul"] * 4  # 2 residual adds + 2 matmuls, both inputs; not x + pos, not n + d
    # every inserted quantizer really sits on a float tensor: run with hooks and look
    seen = {}
    for name, m in tensor_quantizers(g):
        m.register_forward_pre_hook(lambda _m, i, name=name: seen.__setitem__(name, i[0]))
    g(torch.rand(2, 1, 4, 16))
    assert len(seen) == 8 and all(t.is_floating_point() and t.ndim >= 3 for t in seen.values())


@pytest.mark.parametrize("causal", [False, True])
def test_attention_rewrite_equals_sdpa_in_float64(causal):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 5, 8, dtype=torch.float64) for _ in range(3))
    att = QuantAttention(8, is_causal=causal, enabled=False).double()
    torch.testing.assert_close(att(q, k, v), F.scaled_dot_product_attention(q, k, v, is_causal=causal))
    att = QuantAttention(8, scale=0.3, enabled=False).double()
    torch.testing.assert_close(att(q, k, v), F.scaled_dot_product_attention(q, k, v, scale=0.3))


def test_act_quant_is_the_per_tensor_fake_quantizer():
    torch.manual_seed(0)
    x = torch.randn(1000, dtype=torch.float64)
    m = ActQuant(4).double()
    with torch.no_grad():
        m.scale.fill_(0.3)
    expected = torch.clamp(torch.round(x / 0.3), -7, 7) * 0.3  # closed form of the symmetric 4-bit grid
    torch.testing.assert_close(m(x), expected)
    torch.testing.assert_close(m(x), fake_quant(x, m.scale, 4))
    m.enabled = False
    assert m(x) is x


def _quantized(model, shape, data, residual_bits=8, matmul_bits=8, w_bits=4, a_bits=8):
    model.eval()
    fold_batchnorm(model)
    fp, records = insert_tensor_quantizers(model, shape, residual_bits, matmul_bits, enabled=False)
    names = [n for n, _ in quantizable_layers(fp)]
    q = wrap_layers(copy.deepcopy(fp), {n: {"w_bits": w_bits, "a_bits": a_bits} for n in names}).eval()
    set_enabled(q, True)

    def batches():
        return (x for x, _ in data.calib.batches(64))

    init_ranges(fp, q, names, batches)
    assert len(init_tensor_ranges(fp, q, batches)) == len(tensor_quantizers(q))
    return fp, q, records


def _producers(model):
    return {o: n for n in model.graph.node for o in n.output}


def _constant(model, name):
    return name in {i.name for i in model.graph.initializer} or \
        any(n.op_type == "Constant" and name in n.output for n in model.graph.node)


@pytest.fixture(scope="module")
def digits():
    return load_data(DataSpec(source="digits", calib_size=128, limit_test=300))


def test_onnx_resnet_has_qdq_on_both_inputs_of_every_residual_add(tmp_path, digits):
    torch.manual_seed(0)
    _, q, records = _quantized(resnet20(num_classes=10, in_channels=1, mean=(0.3,), std=(0.4,)), (1, 8, 8), digits)
    path = export_onnx(q, digits.input_shape, tmp_path / "r.onnx")
    model = onnx.load(str(path))
    prod = _producers(model)
    adds = [n for n in model.graph.node if n.op_type == "Add"
            and not any(_constant(model, i) for i in n.input)]
    assert len(adds) == 9
    for n in adds:
        assert all(prod[i].op_type == "DequantizeLinear" for i in n.input), n.name
    parity = onnx_parity(q, path, digits.test)
    assert parity["onnx_top1_agreement"] >= 0.99 and parity["onnx_images_logits_differ"] <= 0.05


def test_onnx_vit_has_qdq_on_both_inputs_of_the_attention_matmuls(tmp_path, digits):
    torch.manual_seed(0)
    vit = vit_tiny(num_classes=10, in_channels=1, mean=(0.3,), std=(0.4,), image_size=8, patch=4, dim=32,
                   depth=2, heads=2, mlp_dim=64)
    fp, q, records = _quantized(vit, (1, 8, 8), digits)
    assert sorted({r["op"] for r in records}) == ["add", "attention"]
    path = export_onnx(q, digits.input_shape, tmp_path / "v.onnx")
    model = onnx.load(str(path))
    prod = _producers(model)
    act_matmuls = [n for n in model.graph.node if n.op_type == "MatMul"
                   and all(prod.get(i) is not None and prod[i].op_type == "DequantizeLinear"
                           and not _constant(model, prod[i].input[0]) and prod[prod[i].input[0]].op_type == "QuantizeLinear"
                           and not _constant(model, prod[prod[i].input[0]].input[0]) for i in n.input)]
    assert len(act_matmuls) == 2 * 2  # Q·Kᵀ and P·V in each of the two blocks
    parity = onnx_parity(q, path, digits.test)
    assert parity["onnx_top1_agreement"] >= 0.99 and parity["onnx_images_logits_differ"] <= 0.05


def test_stage_quantizes_residual_adds_and_the_model_reloads_exactly(workdir):
    resnet = {"spec": "zoo:resnet20", "kwargs": {}}
    cfg = validate(PipelineConfig, {
        "name": "r", "model": resnet, "data": {"source": "digits", "calib_size": 128, "limit_test": 200},
        "stages": [{"train": {"epochs": 1, "batch_size": 64, "lr": 0.05}},
                   {"quantize": {"weight_bits": 4, "act_bits": 8, "method": "rtn", "bn_tuning": True}}]}, "test")
    pipe = Pipeline(cfg, RunOptions(workdir, show_progress=False))
    m = pipe.run().stages[1].metrics
    model = load_model(workdir / "r" / "quantize" / "model")
    quantizers = tensor_quantizers(model)
    assert len(quantizers) == 18 and all(q.enabled and q.bits == 8 and float(q.scale) != 1.0 for _, q in quantizers)
    assert top1_and_loss(model, pipe.data.test)[1] == pytest.approx(m["test_loss"], rel=1e-5)
    # a 1-epoch model has near-tied logits: ORT's integer kernels (bias on the int32 grid) flip a few;
    # the file's own arithmetic (Q/DQ as written) agrees
    assert m["onnx_exact_top1_agreement"] >= 0.99 and m["onnx_top1_agreement"] >= 0.9


def test_torchvision_models_get_their_residual_adds_quantized():
    """torchvision's ResNet-18 (BN folded, 8 basic blocks) and VisionTransformer (its
    nn.MultiheadAttention rewritten and kept whole while tracing, so the encoder's residual adds are
    still found)."""
    import torchvision
    from torchvision.models.vision_transformer import VisionTransformer

    from deploypipe.stages.quantize.attention import convert_attention

    torch.manual_seed(0)
    resnet = torchvision.models.resnet18(num_classes=10).eval()
    assert len(fold_batchnorm(resnet)) == 20
    _, records = insert_tensor_quantizers(resnet, (3, 32, 32), 8, 8)
    assert len(records) == 2 * 8 and {r["op"] for r in records} == {"add"}
    vit = VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=64, mlp_dim=128,
                            num_classes=10).eval()
    torch.nn.init.normal_(vit.heads.head.weight)  # torchvision starts the head at zero: make the output informative
    x = torch.rand(2, 3, 32, 32)
    want = vit(x)
    assert len(convert_attention(vit, 8, enabled=False)) == 2
    g, records = insert_tensor_quantizers(vit, (3, 32, 32), 8, 8, enabled=False)
    assert len(records) == 2 * 2 * 2 and {r["op"] for r in records} == {"add"}  # two adds per encoder layer
    torch.testing.assert_close(g(x), want)


@pytest.mark.parametrize("unsigned", [True, False])
def test_a_residual_input_shares_the_unsigned_grid_of_the_convolution_reading_it_and_reloads_so(tmp_path, unsigned):
    """A ResNet-20 block's input x feeds conv1 and (through the identity shortcut) the add: with
    unsigned grids the add's quantizer is that conv's input grid (one quantizer on the tensor), and a
    saved model rebuilds it unsigned. Signed (TensorRT) grids keep their own per-add scale."""
    import deploypipe as dp
    from deploypipe.models import ModelRecord, build_model, save_model
    from deploypipe.stages.quantize.modules import TRANSFORM_MODULE, QuantLayer

    torch.manual_seed(0)
    record = ModelRecord("zoo:resnet20", {"num_classes": 10}, input_shape=[3, 16, 16], num_classes=10)
    model = build_model(record).eval()
    q, report = dp.quantize(model, torch.rand(64, 3, 16, 16), dp.QuantizeConfig(
        weight_bits=8, act_bits=8, method="rtn", unsigned_activations=unsigned))
    records = report.transform["tensor_quant"]
    # 9 blocks; the 2 downsampling ones have a padding shortcut (not the conv's tensor): 7 identity shortcuts
    sharing = [r for r in records if "shares" in r]
    assert len(sharing) == 7 and all(r["name"].endswith("_in1") for r in sharing)
    shared = [r for r in records if r.get("signed") is False]
    assert len(shared) == (7 if unsigned else 0)
    t = torch.rand(2, 16, 16, 16) * 3  # a non-negative tensor
    for r in records:
        act, layer = q.get_submodule(r["name"]), q.get_submodule(r["shares"]) if "shares" in r else None
        if r in shared:
            assert isinstance(layer, QuantLayer) and not layer.a_signed and act.signed is False
            s = layer.act_scale.detach()
            assert torch.equal(act.scale.detach(), s)
            expected = torch.clamp(torch.round(t / s), 0, 255) * s  # the unsigned 8-bit grid, closed form
            torch.testing.assert_close(act(t), expected, rtol=0, atol=0)
            torch.testing.assert_close(layer._input(t, layer.act_scale), expected, rtol=0, atol=0)
        else:
            assert act.signed is True
    save_model(q, record.with_transform("quantize", TRANSFORM_MODULE, report.transform), tmp_path / "q")
    again = load_model(tmp_path / "q")
    assert [m.signed for _, m in tensor_quantizers(again)] == [m.signed for _, m in tensor_quantizers(q)]
    x = torch.rand(3, 3, 16, 16)
    assert torch.equal(again(x), q(x))
