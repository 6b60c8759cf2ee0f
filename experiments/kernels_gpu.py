"""The Triton kernels on a GPU: fused dequantize-and-multiply against the device's copy
bandwidth and cuBLAS float16. Writes experiments/results/kernels_gpu.json (device name in the
protocol) and prints the table.

For each shape (default 4096x4096 and 4096x11008, [out, in]), bit width (2, 3, 4, 8; group 64,
asymmetric) and layout (dense, 2:4):
- GEMV (decode, 1 row of x) and GEMM (prefill, ``--prefill`` rows), median of CUDA-event timed
  runs after the autotuner has settled (runtime/triton/tuned.py);
- bytes read = the packed matrix as held (codes, scales, zeros, 2:4 metadata); achieved
  bandwidth = bytes / GEMV time, and its share of the measured copy bandwidth (a 1 GiB
  device-to-device copy, bytes read + written);
- cuBLAS float16 ``x @ W.T`` at the same shape as the reference.

Needs a CUDA GPU. ``--smoke`` runs two tiny shapes under the Triton interpreter on the CPU
(timings meaningless; it writes to --out, not to results/) so the script is tested where no
GPU is lent:

    .venv/bin/python experiments/kernels_gpu.py
    TRITON_INTERPRET=1 .venv/bin/python experiments/kernels_gpu.py --smoke --out /tmp/k.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS  # noqa: E402

from autocompress.compress.weights import compress_weight  # noqa: E402
from autocompress.io_utils import atomic_write_text  # noqa: E402
from autocompress.plan import LayerConfig  # noqa: E402
from autocompress.runtime.packed import PackedLinear  # noqa: E402

SHAPES = "4096x4096,4096x11008"
SMOKE_SHAPES = "48x64,40x128"


def timed(fn, device: str, runs: int) -> float:
    """Median seconds of ``fn()``: CUDA events on a GPU, wall clock otherwise."""
    fn()  # compile / autotune / warm caches
    times = []
    for _ in range(runs):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def copy_bandwidth(device: str, nbytes: int) -> float:
    src = torch.ones(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    return 2 * nbytes / timed(lambda: dst.copy_(src), device, 10)


def packed_matrix(out_features: int, in_features: int, bits: int, layout: str, device: str):
    extra = dict(pattern="2:4", sparsity=0.5, prune_method="magnitude") if layout == "2:4" else {}
    cfg = LayerConfig(bits=bits, group_size=64, **extra)
    w = torch.randn(out_features, in_features) * 0.02
    return PackedLinear.from_compressed(compress_weight(w, cfg), cfg).matrices[0].to(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default=None, help=f"[out]x[in],... (default {SHAPES})")
    parser.add_argument("--bits", default="2,3,4,8")
    parser.add_argument("--layouts", default="dense,2:4")
    parser.add_argument("--prefill", type=int, default=512, help="rows of x for the GEMM")
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--smoke", action="store_true",
                        help="tiny shapes under the Triton interpreter (no GPU needed)")
    parser.add_argument("--out", type=Path, default=RESULTS / "kernels_gpu.json")
    args = parser.parse_args()
    if args.smoke:
        if os.environ.get("TRITON_INTERPRET") != "1":
            raise SystemExit("--smoke runs under the interpreter: set TRITON_INTERPRET=1")
        device, shapes, prefill, runs = "cpu", args.shapes or SMOKE_SHAPES, 4, 1
    else:
        if not torch.cuda.is_available():
            raise SystemExit("kernels_gpu.py needs a CUDA GPU (or --smoke under "
                             "TRITON_INTERPRET=1 to check the script)")
        device, shapes, prefill, runs = "cuda", args.shapes or SHAPES, args.prefill, args.runs
    from autocompress.runtime.triton.kernels import packed_matmul

    name = torch.cuda.get_device_name() if device == "cuda" else "cpu (Triton interpreter)"
    bandwidth = copy_bandwidth(device, (1 << 30) if device == "cuda" else (16 << 20))
    rows = []
    for shape in shapes.split(","):
        n, k = (int(v) for v in shape.split("x"))
        x1 = torch.randn(1, k, device=device, dtype=torch.float16)
        xm = torch.randn(prefill, k, device=device, dtype=torch.float16)
        w16 = (torch.randn(n, k, device=device) * 0.02).half()
        if device == "cuda":
            gemv = timed(lambda: x1 @ w16.T, device, runs)
            gemm = timed(lambda: xm @ w16.T, device, runs)
            rows.append(dict(shape=shape, kernel="cuBLAS f16", bits=16, layout="dense",
                             bytes=w16.numel() * 2, gemv_us=gemv * 1e6, gemm_us=gemm * 1e6,
                             gemv_gb_s=w16.numel() * 2 / gemv / 1e9,
                             share_of_copy=w16.numel() * 2 / gemv / bandwidth))
        for layout in args.layouts.split(","):
            for bits in (int(b) for b in args.bits.split(",")):
                matrix = packed_matrix(n, k, bits, layout, device)
                reference = x1.float() @ matrix.dequantize_rows(0, n).to(device).T \
                    if device == "cpu" else None
                y = torch.empty(1, n, device=device)
                gemv = timed(lambda: packed_matmul(x1, matrix, out=y, kind="gemv"), device, runs)
                gemm = timed(lambda: packed_matmul(xm, matrix, kind="gemm"), device, runs)
                if reference is not None:  # the smoke run also checks the result
                    torch.testing.assert_close(y, reference, rtol=2e-2, atol=2e-2)
                nbytes = matrix.nbytes()
                rows.append(dict(shape=shape, kernel="triton", bits=bits, layout=layout,
                                 bytes=nbytes, gemv_us=gemv * 1e6, gemm_us=gemm * 1e6,
                                 gemv_gb_s=nbytes / gemv / 1e9,
                                 share_of_copy=nbytes / gemv / bandwidth))
                print(f"{shape:<12} {layout:<6} {bits}b  GEMV {gemv * 1e6:9.1f} us "
                      f"({nbytes / gemv / 1e9:7.1f} GB/s, {nbytes / gemv / bandwidth:5.1%} of "
                      f"copy)  GEMM[{prefill}] {gemm * 1e6:9.1f} us", flush=True)
    record = {"protocol": {"device": name, "copy_gb_s": bandwidth / 1e9, "group_size": 64,
                           "prefill_rows": prefill, "runs": runs, "torch": torch.__version__,
                           "measured_at": time.strftime("%Y-%m-%d %H:%M:%S")},
              "rows": rows}
    atomic_write_text(args.out, json.dumps(record, indent=2) + "\n")
    print(f"copy bandwidth {bandwidth / 1e9:.1f} GB/s on {name}; wrote {args.out}")


if __name__ == "__main__":
    main()
