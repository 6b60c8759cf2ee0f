"""On paper: the scale benchmark's search for an 8B model (Llama-3.1-8B's shapes), on this CPU,
on one 24 GB GPU and on 8 GPUs, projected from what was measured on Qwen2.5-Coder-1.5B. Writes
experiments/results/projection_8b.json; nothing here is a measurement of an 8B model.

How each figure is made (the README prints this next to the table):

- **Work ratio.** Each stage's measured wall time on the 1.5B (scale.json) is multiplied by how
  much more work the 8B's shapes make: forward/backward passes (Fisher, level 2, level 3's
  windows) grow with the parameters of the matrix products (linears and head), the table's
  GPTQ and low-rank options with each linear's factorization, d_in^3 + d_in^2 d_out. The two
  ratios bound each stage (the lower for a stage of forwards, the higher for one of
  factorizations); both are printed.
- **This CPU.** The 1.5B's stage times times the ratios; memory: the 1.5B's peak times the
  ratio of parameters (the peak follows the model's size: weights, codes, statistics).
- **One GPU.** The same work at an assumed sustained rate (ASSUMED below: a vendor peak times
  an efficiency, not a measurement) in place of this CPU's measured one (level2_workers.json's
  ceiling: single-thread forwards of SmolLM2, both cores). This treats all of a stage's
  measured time as arithmetic, so it is a floor: loading the model, starting Ray's workers and
  Python's per-layer work do not shrink with FLOP/s (the 1.5B's level-2 worker, for one,
  loaded its model in the seconds printed). Memory: bf16 weights plus the largest per-block
  working set (one block's fp32 gradients, one fp32 Hessian and its inverse, one window's
  logits).
- **Eight GPUs.** The table as on one GPU (the driver builds it alone); levels 2 and 3 split
  over 8 workers at the parallel efficiency measured for two workers on this CPU
  (level2_workers.json: speed-up / workers).

    .venv/bin/python experiments/project_8b.py [--entry qwen1.5b@4/solo]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, ResultFile  # noqa: E402


@dataclass(frozen=True)
class Shapes:
    """A decoder's matrix shapes, from its config.json."""
    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool

    def linears(self) -> list[tuple[int, int]]:
        """(d_in, d_out) of every linear of the blocks."""
        kv = self.hidden // self.heads * self.kv_heads
        h, i = self.hidden, self.intermediate
        block = [(h, h), (h, kv), (h, kv), (h, h), (h, i), (h, i), (i, h)]
        return block * self.layers

    def matmul_params(self) -> int:
        """Parameters a token's forward multiplies by: the linears and the head."""
        return sum(a * b for a, b in self.linears()) + self.hidden * self.vocab

    def params(self) -> int:
        """All parameters (norms and q/k/v biases aside: under 0.1%)."""
        embed = self.hidden * self.vocab
        return sum(a * b for a, b in self.linears()) + embed * (1 if self.tied else 2)

    def factorization(self) -> int:
        return sum(a ** 3 + a * a * b for a, b in self.linears())

    def largest_block_params(self) -> int:
        return sum(a * b for a, b in self.linears()[:7])


SMOLLM2 = Shapes("SmolLM2-135M", 576, 1536, 30, 9, 3, 49152, tied=True)
QWEN_1_5B = Shapes("Qwen2.5-Coder-1.5B", 1536, 8960, 28, 12, 2, 151936, tied=False)
LLAMA_8B = Shapes("Llama-3.1-8B", 4096, 14336, 32, 32, 8, 128256, tied=False)

# Not measured here: a 24 GB data-centre GPU (NVIDIA L4: 121 TFLOP/s dense bf16 tensor peak,
# 30 TFLOP/s fp32, per its datasheet) at 40% of peak on the forwards and 30% on the fp32
# factorizations. Change these to project another card.
ASSUMED = {"gpu": "NVIDIA L4 (24 GB)", "bf16_peak_tflops": 121.0, "fp32_peak_tflops": 30.3,
           "forward_efficiency": 0.4, "factorization_efficiency": 0.3, "gpus": 8}
STAGES = ("sensitivity_s", "level2_s", "level3_s")


def cpu_rate_flops(ceiling: dict) -> float:
    """This CPU's measured rate on forwards, both cores: the ceiling's single-thread forwards
    of SmolLM2 (512-token windows), two processes side by side."""
    per_forward = 2 * SMOLLM2.matmul_params() * 512
    return 2 * ceiling["forwards"] * per_forward / max(ceiling["together_s"])


def project(entry: dict, ceiling: dict, parallel_efficiency: float) -> dict:
    forward_ratio = LLAMA_8B.matmul_params() / QWEN_1_5B.matmul_params()
    factor_ratio = LLAMA_8B.factorization() / QWEN_1_5B.factorization()
    low, high = sorted((forward_ratio, factor_ratio))
    measured = {k: entry["timings_s"][k] for k in STAGES if k in entry["timings_s"]}
    cpu = {k: [v * low, v * high] for k, v in measured.items()}
    cpu_rate = cpu_rate_flops(ceiling)
    gpu_rate = ASSUMED["bf16_peak_tflops"] * 1e12 * ASSUMED["forward_efficiency"]
    fp32_rate = ASSUMED["fp32_peak_tflops"] * 1e12 * ASSUMED["factorization_efficiency"]
    # the table's factorizations run in fp32 on a GPU too: the slower of the two rates bounds it
    speedup = {"sensitivity_s": min(gpu_rate, fp32_rate) / cpu_rate,
               "level2_s": gpu_rate / cpu_rate, "level3_s": gpu_rate / cpu_rate}
    one_gpu = {k: [lo / speedup[k], hi / speedup[k]] for k, (lo, hi) in cpu.items()}
    n = ASSUMED["gpus"]
    eight = {k: ([lo, hi] if k == "sensitivity_s" else
                 [lo / (n * parallel_efficiency), hi / (n * parallel_efficiency)])
             for k, (lo, hi) in one_gpu.items()}
    bf16_weights = 2 * LLAMA_8B.params()
    block_grads = 4 * LLAMA_8B.largest_block_params()
    hessian = 2 * 4 * LLAMA_8B.intermediate ** 2  # ffn_down's Hessian and its inverse, fp32
    logits = 4 * 512 * LLAMA_8B.vocab
    gpu_memory = bf16_weights + block_grads + hessian + logits
    param_ratio = LLAMA_8B.params() / QWEN_1_5B.params()
    return {
        "source": entry["model"], "source_params": entry["params"],
        "shapes_params_1_5b": QWEN_1_5B.params(), "params_8b": LLAMA_8B.params(),
        "forward_ratio": round(forward_ratio, 3), "factorization_ratio": round(factor_ratio, 3),
        "measured_s": measured, "cpu_s": cpu, "one_gpu_s": one_gpu, "eight_gpus_s": eight,
        "cpu_peak_bytes": round(entry["peak_pss_bytes"] * param_ratio),
        "cpu_bf16_weights_x2_bytes": 2 * bf16_weights,
        "gpu_memory_bytes": gpu_memory, "gpu_weights_bytes": bf16_weights,
        "cpu_rate_gflops": round(cpu_rate / 1e9, 1),
        "gpu_speedup_forward": round(speedup["level2_s"], 1),
        "gpu_speedup_table": round(speedup["sensitivity_s"], 1),
        "parallel_efficiency": round(parallel_efficiency, 3),
        "assumed": ASSUMED,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    # the solo run: the first 1.5B entry's stages shared the machine and undercount
    parser.add_argument("--entry", default="qwen1.5b@4/solo",
                        help="scale.json entry to project from")
    args = parser.parse_args()
    scale = json.loads((RESULTS / "scale.json").read_text())["entries"]
    if args.entry not in scale:
        raise SystemExit(f"scale.json has no entry {args.entry}; run experiments/scale.py "
                         "--models qwen1.5b --bits 4 --tag solo first, alone on the machine")
    entry = scale[args.entry]
    # the shapes' arithmetic checked against the measured model: off by more than the norms
    # and biases it leaves out, the ratios would be wrong too
    if not math.isclose(QWEN_1_5B.params(), entry["params"], rel_tol=2e-3):
        raise SystemExit(f"Qwen shapes give {QWEN_1_5B.params():,} parameters, the model has "
                         f"{entry['params']:,}")
    workers = json.loads((RESULTS / "level2_workers.json").read_text())["entries"]
    pairs = [(workers[k], workers[k.replace("workers=2", "workers=1")])
             for k in workers if k.startswith("workers=2")
             and k.replace("workers=2", "workers=1") in workers]
    efficiency = min(one["level2_s"] / two["level2_s"] for two, one in pairs) / 2
    record = project(entry, workers["ceiling"], efficiency)
    results = ResultFile("projection_8b.json", {
        "what": "a projection on paper, from measured 1.5B stage times; no 8B model was run",
        "method": "stage time x work ratio (forward: matmul parameters; factorization: "
                  "sum of d_in^3 + d_in^2 d_out over linears); GPU: this CPU's measured "
                  "forward rate replaced by an assumed sustained rate (a floor: fixed costs do "
                  "not shrink); 8 GPUs: levels 2 and 3 divided by 8 x the two-worker parallel "
                  "efficiency measured here, the table not divided"})
    results.put(f"llama3-8b from {args.entry}", record)
    lo, hi = (sum(v[i] for v in record["cpu_s"].values()) / 3600 for i in (0, 1))
    print(f"8B on this CPU: {lo:.1f}–{hi:.1f} h; one GPU: "
          f"{sum(v[1] for v in record['one_gpu_s'].values()) / 60:.1f} min at most of compute")


if __name__ == "__main__":
    main()
