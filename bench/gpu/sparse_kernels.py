"""The N:M kernels on a GPU: correctness against the PyTorch references, then speed.

One script for a lent GPU (run it in one call). For weights of 4096x4096 and 4096x11008 (out x in),
fp16 and bf16:
- correctness: every Triton kernel (mask, fused mask+decay, SR-STE backward, compress, compressed
  matmul) against its PyTorch reference, and our 2:4 CUTLASS packing against PyTorch's;
- fused mask + decay and SR-STE backward: achieved bandwidth as a share of the device's copy bandwidth
  (a large tensor copy measured in the same run), and against the unfused PyTorch reference;
- y = x·Wᵀ at batch 1, 16, 128, 4096: dense cuBLAS (F.linear), our weight-compressed N:M matmul at
  1:8, 1:4 and 2:4, and for 2:4 PyTorch's semi-structured sparse tensor (cuSPARSELt or CUTLASS) —
  median of CUDA-event timings, reported as time relative to dense.
Writes a markdown report (card, date, numbers) to --out.

    python bench/gpu/sparse_kernels.py --out bench/gpu/RESULTS.md
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import subprocess
import sys

os.environ.setdefault("TRITON_INTERPRET", "0")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from deploypipe.kernels.effective_weight import decayed_weight_reference, srste_grad_reference  # noqa: E402
from deploypipe.kernels.effective_weight_triton import decayed_weight_triton, srste_grad_triton  # noqa: E402
from deploypipe.kernels.nm_compress import nm_compress_reference  # noqa: E402
from deploypipe.kernels.nm_compress_triton import nm_compress_triton  # noqa: E402
from deploypipe.kernels.nm_mask import nm_mask_reference  # noqa: E402
from deploypipe.kernels.nm_mask_triton import nm_mask_triton  # noqa: E402
from deploypipe.kernels.nm_matmul import nm_matmul_reference  # noqa: E402
from deploypipe.kernels.nm_matmul_triton import nm_matmul_triton  # noqa: E402
from deploypipe.kernels.semi_structured import semi_structured_pack, to_semi_structured  # noqa: E402

SHAPES = [(4096, 4096), (4096, 11008)]
BATCHES = [1, 16, 128, 4096]
DTYPES = [torch.float16, torch.bfloat16]


def timed(fn, repeats: int = 50, warmup: int = 10, inner: int = 20) -> float:
    """Milliseconds per call of ``fn()``: the median over ``repeats`` CUDA-event measurements of
    ``inner`` back-to-back calls each (so a ~10 µs small-batch kernel is not drowned by the host's
    per-call overhead and a sync)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(inner):
            fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / inner)
    return statistics.median(times)


def copy_bandwidth() -> float:
    """GB/s of a 1 GiB device-to-device copy (read + write)."""
    src = torch.empty(1 << 29, dtype=torch.float16, device="cuda")
    dst = torch.empty_like(src)
    ms = timed(lambda: dst.copy_(src), repeats=10, inner=5)
    return 2 * src.numel() * 2 / ms / 1e6


def check(lines: list[str]) -> bool:
    ok = True
    for dtype in DTYPES:
        for rows, k in SHAPES:
            w = torch.randn(rows, k, device="cuda").to(dtype)
            for n, m in [(2, 4), (1, 8), (1, 16)]:
                mask = nm_mask_triton(w, n, m)
                same_mask = torch.equal(mask, nm_mask_reference(w, n, m))
                eff, _ = decayed_weight_triton(w, n, m, 0.37)
                same_eff = torch.equal(eff, decayed_weight_reference(w, n, m, 0.37)[0])
                g = torch.randn_like(w)
                grad_err = (srste_grad_triton(g, w, mask, 2e-4).float() - srste_grad_reference(g, w, mask, 2e-4).float()).abs().max().item()
                values, positions = nm_compress_triton(w, n, m)
                rv, rp = nm_compress_reference(w, n, m)
                same_comp = torch.equal(values, rv) and torch.equal(positions, rp)
                x = torch.randn(16, k, device="cuda").to(dtype)
                y = nm_matmul_triton(x, values, positions, n, m)
                ref = nm_matmul_reference(x, values, positions, n, m)
                mm_err = ((y.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
                good = same_mask and same_eff and same_comp and grad_err < 1e-2 and mm_err < 2e-2
                ok &= good
                lines.append(f"| {str(dtype)[6:]} | {rows}x{k} | {n}:{m} | {same_mask} | {same_eff} | {grad_err:.1e} | "
                             f"{same_comp} | {mm_err:.1e} | {'ok' if good else 'FAIL'} |")
            sparse = w * nm_mask_reference(w, 2, 4)
            try:
                from torch.sparse._semi_structured_conversions import sparse_semi_structured_from_dense_cutlass

                packed, meta = semi_structured_pack(sparse)
                rp, rm = sparse_semi_structured_from_dense_cutlass(sparse)
                same = torch.equal(packed, rp) and torch.equal(meta, rm)
                ok &= same
                lines.append(f"| {str(dtype)[6:]} | {rows}x{k} | 2:4 CUTLASS packing equals PyTorch's: {same} |||||||")
            except ImportError:
                lines.append("| | | 2:4 CUTLASS packing: PyTorch has no conversion to compare with |||||||")
    return ok


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="bench/gpu/RESULTS.md")
    ap.add_argument("--repeats", type=int, default=50)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: this benchmark needs a GPU")
    card = torch.cuda.get_device_name()
    lines = [f"# N:M kernels on {card}", "",
             f"{datetime.date.today().isoformat()}, torch {torch.__version__}, "
             f"triton {__import__('triton').__version__}, CUDA {torch.version.cuda}. "
             "Command: `python bench/gpu/sparse_kernels.py`.", ""]

    tests = subprocess.run([sys.executable, "-m", "pytest", "-q", "tests/kernels"], capture_output=True, text=True,
                           env={**os.environ, "TRITON_INTERPRET": "0"})
    lines += [f"Kernel tests compiled on this GPU (`TRITON_INTERPRET=0 pytest tests/kernels`): "
              f"`{tests.stdout.strip().splitlines()[-1] if tests.stdout.strip() else tests.stderr[-300:]}`", ""]

    lines += ["## Correctness against the PyTorch references", "",
              "| dtype | weight | pattern | mask equal | mask+decay equal | SR-STE grad max err | compress equal | matmul rel err | |",
              "|---|---|---|---|---|---|---|---|---|"]
    ok = check(lines)

    bw = copy_bandwidth()
    lines += ["", f"## Fused mask + decay and SR-STE backward (copy bandwidth {bw:.0f} GB/s)", "",
              "| dtype | weight | pattern | kernel | ms | GB/s | share of copy | PyTorch reference ms | speed-up |",
              "|---|---|---|---|---|---|---|---|---|"]
    for dtype in DTYPES:
        for rows, k in SHAPES:
            w = torch.randn(rows, k, device="cuda").to(dtype)
            g = torch.randn_like(w)
            for n, m in [(2, 4), (1, 8)]:
                mask = nm_mask_triton(w, n, m)
                numel = w.numel()
                rows_out = [
                    ("mask + decay (reads W, writes W_eff and mask)", 5 * numel,
                     lambda: decayed_weight_triton(w, n, m, 0.5), lambda: decayed_weight_reference(w, n, m, 0.5)),
                    ("SR-STE backward (reads g, W, mask, writes g')", 7 * numel,
                     lambda: srste_grad_triton(g, w, mask, 2e-4), lambda: srste_grad_reference(g, w, mask, 2e-4)),
                    ("mask only (reads W, writes mask)", 3 * numel,
                     lambda: nm_mask_triton(w, n, m), lambda: nm_mask_reference(w, n, m)),
                ]
                for label, nbytes, fast, ref in rows_out:
                    ms, ms_ref = timed(fast, args.repeats), timed(ref, max(5, args.repeats // 5), inner=2)
                    gbs = nbytes / ms / 1e6
                    lines.append(f"| {str(dtype)[6:]} | {rows}x{k} | {n}:{m} | {label} | {ms:.3f} | {gbs:.0f} | "
                                 f"{100 * gbs / bw:.0f}% | {ms_ref:.3f} | {ms_ref / ms:.1f}x |")

    lines += ["", "## y = x·Wᵀ: time relative to dense cuBLAS (lower is faster)", "",
              "| dtype | weight | batch | dense ms | N:M compressed 1:8 | 1:4 | 2:4 | 2:4 PyTorch semi-structured |",
              "|---|---|---|---|---|---|---|---|"]
    for dtype in DTYPES:
        for rows, k in SHAPES:
            w = torch.randn(rows, k, device="cuda").to(dtype)
            compressed = {p: nm_compress_triton(w, *p) for p in [(1, 8), (1, 4), (2, 4)]}
            w24 = w * nm_mask_triton(w, 2, 4)
            try:
                sparse24 = torch.sparse.to_sparse_semi_structured(w24)
                ours24 = to_semi_structured(w24)
            except Exception as err:  # noqa: BLE001 - report why, keep going
                sparse24, ours24 = None, f"{type(err).__name__}: {err}"
            for batch in BATCHES:
                x = torch.randn(batch, k, device="cuda").to(dtype)
                dense = timed(lambda: F.linear(x, w), args.repeats)
                cells = []
                for (n, m), (v, p) in compressed.items():
                    cells.append(f"{timed(lambda: nm_matmul_triton(x, v, p, n, m), args.repeats) / dense:.2f}")
                if sparse24 is not None:
                    semi = f"{timed(lambda: F.linear(x, sparse24), args.repeats) / dense:.2f}"
                    if batch == 16 and not isinstance(ours24, str):
                        err = (F.linear(x, ours24).float() - F.linear(x, w24).float()).abs().max().item()
                        semi += f" (our packing: max err {err:.1e})"
                else:
                    semi = "n/a"
                lines.append(f"| {str(dtype)[6:]} | {rows}x{k} | {batch} | {dense:.3f} | " + " | ".join(cells) + f" | {semi} |")
            if isinstance(ours24, str):
                lines.append(f"| | | | 2:4 semi-structured unavailable: {ours24} |||||")
    lines += ["", f"All correctness checks passed: {ok}."]
    text = "\n".join(lines) + "\n"
    with open(args.out, "w") as fh:
        fh.write(text)
    print(text)


if __name__ == "__main__":
    main()
