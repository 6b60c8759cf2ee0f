"""The sensitivity table's fast path for plain RTN options, against scoring each option's ΔW.

For every block linear of SmolLM2-135M and the plain round-to-nearest options of the joint space
(autocompress/search_spaces/joint.yaml), the Fisher proxy's costs are computed (a) from each
option's compressed weight (compress_weight, then ½ T Σ F ⊙ ΔW²) and (b) by
``quant_error_many`` (one min/max pass per group size, no codes kept), as build_table now does.
Both use the same Fisher diagonal (a random positive one: the timing and the agreement do not
depend on its values). Prints and writes experiments/results/table_fast_path.json: seconds for
each path and the largest relative difference between their costs.

    .venv/bin/python experiments/table_fast_path.py
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ResultFile, machine  # noqa: E402

from autocompress.compress.weights import compress_weight  # noqa: E402
from autocompress.model import load_model  # noqa: E402
from autocompress.search.space import SearchSpace  # noqa: E402
from autocompress.sensitivity.build import is_plain_rtn  # noqa: E402
from autocompress.sensitivity.fisher import FisherProxy  # noqa: E402

TOKENS = 255  # T of 256-token windows: only scales the costs


def main() -> None:
    torch.set_num_threads(2)
    loaded = load_model("smollm2-135m")
    space = SearchSpace.load("joint")
    proxy = FisherProxy()
    proxy.tokens = TOKENS
    gen = torch.Generator().manual_seed(0)
    proxy.fisher = {layer.name: torch.rand(layer.shape, generator=gen) * 1e-6
                    for layer in loaded.layers}
    slow_s = fast_s = 0.0
    worst = 0.0
    n_options = 0
    for layer in loaded.layers:
        options = [cfg for cfg in space.for_layer(layer) if is_plain_rtn(cfg)]
        weight = loaded.module(layer.name).weight.detach().float()
        t = time.perf_counter()
        deltas = [compress_weight(weight, cfg).weight() - weight for cfg in options]
        slow = proxy.layer_costs(layer, weight, deltas)
        slow_s += time.perf_counter() - t
        del deltas
        t = time.perf_counter()
        fast = proxy.rtn_costs(layer, weight, [(c.bits, c.group_size, c.sym) for c in options])
        fast_s += time.perf_counter() - t
        worst = max(worst, max(abs(f - s) / abs(s) for f, s in zip(fast, slow) if s))
        n_options += len(options)
    # search_spaces/default.yaml: the joint space's old path, kept so that the protocol stays
    # that of the stored entry (common.ResultFile stops on another protocol)
    protocol = {"model": "smollm2-135m", "space": "search_spaces/default.yaml, plain RTN options",
                "proxy": "fisher (random positive diagonal)", "machine": machine()}
    results = ResultFile("table_fast_path.json", protocol)
    record = {"layers": len(loaded.layers), "options_scored": n_options,
              "delta_path_s": slow_s, "fast_path_s": fast_s, "speedup": slow_s / fast_s,
              "max_relative_difference": worst}
    results.put("fisher", record)
    print(f"{len(loaded.layers)} layers, {n_options} RTN options: ΔW path {slow_s:.1f} s, "
          f"one-pass path {fast_s:.1f} s ({slow_s / fast_s:.2f}x); largest relative "
          f"difference {worst:.1e}")


if __name__ == "__main__":
    main()
