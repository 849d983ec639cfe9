"""Quantize a Hugging Face BERT-style encoder with deploypipe's Python API, as one would in a notebook.

The encoder is built from a ``transformers`` config (nothing is downloaded; its weights are random,
so the point is the arithmetic, not the task). Calibration data is a list of dict batches
(``input_ids``, ``attention_mask``), passed to the model as keyword arguments. The script quantizes
it to W8A8 and W4A8 (AdaQuant), reports how close each quantized encoder's sentence embeddings (the
attention-masked mean of the last hidden states) are to FP32's on held-out batches, and exports the
W8A8 encoder to ONNX with Q/DQ nodes, checked in ONNX Runtime.

    python examples/notebook_quantize.py [--out DIR]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

import deploypipe as dp

VOCAB, SEQ = 1000, 24


def encoder(seed: int = 0) -> torch.nn.Module:
    """A 2-layer BERT encoder (hidden 64, 4 heads) with random weights, drawn 10x wider than BERT's
    initialisation (std 0.2, not 0.02) so that every layer changes the residual stream as a trained
    one does (at 0.02 the embeddings pass through almost untouched and any quantization looks free)."""
    from transformers import BertConfig, BertModel

    config = BertConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, max_position_embeddings=64, initializer_range=0.2)
    torch.manual_seed(seed)
    return BertModel(config).eval()


def token_batches(count: int, batch: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """Random token sequences, padded: each sequence keeps a random length of at least 8 tokens."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        ids = torch.randint(1, VOCAB, (batch, SEQ), generator=g)
        lengths = torch.randint(8, SEQ + 1, (batch,), generator=g)
        mask = (torch.arange(SEQ)[None, :] < lengths[:, None]).long()
        out.append({"input_ids": ids * mask, "attention_mask": mask})
    return out


@torch.no_grad()
def embeddings(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    """Sentence embeddings: the mean of the last hidden states over the unmasked tokens."""
    rows = []
    for b in batches:
        hidden = model(**b).last_hidden_state
        mask = b["attention_mask"].unsqueeze(-1).float()
        rows.append((hidden * mask).sum(1) / mask.sum(1))
    return torch.cat(rows)


def main(out: Path, iters: int = 200) -> dict[str, float]:
    fp = encoder()
    calib = token_batches(8, 16, seed=1)    # 128 sequences to calibrate on
    held_out = token_batches(4, 16, seed=2)  # never seen by the calibration
    reference = embeddings(fp, held_out)
    results = {}
    models = {}
    for name, bits in (("W8A8", 8), ("W4A8", 4)):
        config = dp.QuantizeConfig(weight_bits=bits, act_bits=8, method="adaquant", iters=iters, batch_size=32)
        q, report = dp.quantize(fp, calib, config, log=lambda msg: print(f"  [{name}] {msg}"))
        cosine = F.cosine_similarity(embeddings(q, held_out).double(), reference.double()).mean().item()
        results[f"{name}_cosine"] = cosine
        results[f"{name}_size_fraction_of_fp32"] = report.metrics["size_fraction_of_fp32"]
        print(f"{name}: {len(report.plan)} Linear layers quantized (the token embeddings stay FP32), size "
              f"{report.metrics['size_fraction_of_fp32']:.3f} of FP32; sentence-embedding cosine vs FP32 {cosine:.6f} "
              f"(1 - cosine = {1 - cosine:.1e})")
        models[name] = q
    path = dp.export_onnx(models["W8A8"], held_out[0], out / "encoder_w8a8.onnx")
    parity = dp.onnx_parity(models["W8A8"], path, held_out)
    results.update({k: parity[k] for k in ("onnx_cosine", "onnx_max_abs_diff", "onnx_exact_cosine",
                                           "onnx_exact_max_abs_diff")})
    print(f"ONNX: {path} ({path.stat().st_size / 1024:.0f} KiB). ONNX Runtime against PyTorch on the held-out "
          f"batches: cosine {parity['onnx_cosine']:.6f}, max |diff| {parity['onnx_max_abs_diff']:.1e} (its fused "
          f"integer kernels); cosine {parity['onnx_exact_cosine']:.6f}, max |diff| "
          f"{parity['onnx_exact_max_abs_diff']:.1e} (the Q/DQ arithmetic as written)")
    return results


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=None, help="folder for the ONNX file (default: a temporary one)")
    args = ap.parse_args()
    folder = args.out or Path(tempfile.mkdtemp(prefix="deploypipe-encoder-"))
    folder.mkdir(parents=True, exist_ok=True)
    main(folder)
