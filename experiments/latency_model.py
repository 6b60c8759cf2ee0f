"""The latency model against measurements. Writes experiments/results/latency_model.json.

(a) This CPU: `autocompress profile` measures the machine (saved as
    experiments/results/this-cpu.yaml), then SmolLM2-135M runs for real in the packed runtime
    (backend auto: ONNX Runtime for 2-8 bits, 3/5/6 widened, sparse densified) under several
    plans, and the
    measured seconds per decoded token (greedy, KV cache, batch 1, median over the tokens) are
    compared with the model's prediction for the same plan, context and head (float32, as the
    runtime holds it).
(b) Published decode speeds kept in the device profiles (`published:`), predicted from the
    models' configs (experiments/configs/) with the profiles' figures; the efficiencies in the
    profiles are one assumption per device family, not fitted to these figures.

    .venv/bin/python experiments/latency_model.py [--tokens 32] [--reprofile]
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ResultFile, machine  # noqa: E402
from kernels import PROMPT, mixed_plan  # noqa: E402

from autocompress.hardware.architecture import Architecture, read_config  # noqa: E402
from autocompress.hardware.latency import LatencyModel  # noqa: E402
from autocompress.hardware.measure import ProfileSettings, decode_seconds, measure_profile  # noqa: E402
from autocompress.hardware.profile import available_profiles, profile_to_yaml, read_profile  # noqa: E402
from autocompress.io_utils import atomic_write_text  # noqa: E402
from autocompress.model import load_model  # noqa: E402
from autocompress.plan import LayerConfig, Plan, uniform_plan  # noqa: E402
from autocompress.runtime.convert import pack_model  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
CONFIGS = Path(__file__).resolve().parent / "configs"
PROFILE_PATH = RESULTS / "this-cpu.yaml"


def plans(loaded) -> dict[str, tuple[Plan, bool]]:
    """name -> (plan, slow): slow plans run layers on the torch unpack path (few tokens)."""
    identity, n_blocks = loaded.identity, loaded.config.num_hidden_layers
    q = {b: LayerConfig(bits=b, group_size=64) for b in (2, 3, 4, 8)}

    def by_kind(default: LayerConfig, **kinds: dict) -> Plan:
        plan = uniform_plan(identity, default)
        for kind, partial in kinds.items():
            plan.overrides[f"re:.*\\.{kind}"] = partial
        return plan

    return {
        "uniform 16-bit": (uniform_plan(identity, LayerConfig(bits=16)), False),
        "uniform 8-bit": (uniform_plan(identity, q[8]), False),
        "uniform 4-bit": (uniform_plan(identity, q[4]), False),
        "uniform 2-bit": (uniform_plan(identity, q[2]), False),
        "mixed 4/8 (llama.cpp-style)": (mixed_plan(identity, q[4], {"bits": 8}, n_blocks), False),
        "mixed attention 8, MLP 2": (by_kind(q[8], **{"mlp\\.(gate|up|down)_proj": {"bits": 2}}),
                                     False),
        "4-bit, MLP low rank 0.5": (by_kind(q[4], **{"mlp\\.(gate|up|down)_proj":
                                                     {"rank_ratio": 0.5}}), False),
        "mixed 3/4 (llama.cpp-style)": (mixed_plan(identity, q[3], {"bits": 4}, n_blocks), False),
        "4-bit, MLP 2:4 (densified)": (by_kind(q[4], **{"mlp\\.(gate|up|down)_proj":
                                                        {"pattern": "2:4", "sparsity": 0.5,
                                                         "prune_method": "magnitude"}}), False),
    }


def measure_cpu(results: ResultFile, tokens: int, slow_tokens: int, reprofile: bool) -> None:
    loaded = load_model("smollm2-135m")
    arch = Architecture.from_loaded(loaded)
    if reprofile or not PROFILE_PATH.is_file():
        print("profiling this machine ...", flush=True)
        t0 = time.perf_counter()
        profile = measure_profile(arch, ProfileSettings(name="this-cpu"))
        atomic_write_text(PROFILE_PATH, profile_to_yaml(profile))
        results.put("profile", {"seconds": time.perf_counter() - t0,
                                "bandwidth_gbps": profile.memory.bandwidth_gbps,
                                "block_us": profile.overhead.block_us,
                                "token_us": profile.overhead.token_us,
                                "launch_us": profile.overhead.launch_us,
                                "load_average_1min": os.getloadavg()[0]})
    profile = read_profile(PROFILE_PATH)
    model_of_latency = LatencyModel(profile)
    ids = loaded.tokenizer(PROMPT, return_tensors="pt").input_ids
    for name, (plan, slow) in plans(loaded).items():
        key = f"cpu: {name}"
        if results.has(key):
            continue
        print(f"measuring {name} ...", flush=True)
        n = slow_tokens if slow else tokens
        model = pack_model(loaded, plan, backend="auto", progress=False)
        measured = decode_seconds(model, ids, n)
        context = ids.shape[1] + n // 2
        configs = [plan.config_for(layer.name) for layer in arch.layers]
        predicted = model_of_latency.decode(arch, configs, context, head_format="f32")
        kernels = {}
        for module in model.modules():
            backend = getattr(module, "backend", None)
            if isinstance(backend, str):
                kernels[backend] = kernels.get(backend, 0) + 1
        del model
        gc.collect()
        results.put(key, {
            "plan": name, "tokens": n, "context": context, "kernels": kernels,
            "measured_s": measured, "predicted_s": predicted.seconds_per_token,
            "error": (predicted.seconds_per_token - measured) / measured,
            "predicted_parts_s": {"layers": predicted.layers_s, "head": predicted.head_s,
                                  "kv": predicted.kv_s, "overhead": predicted.overhead_s},
            "sources": predicted.sources, "load_average_1min": os.getloadavg()[0]})


def predict_published(results: ResultFile) -> None:
    for name, path in available_profiles().items():
        profile = read_profile(path)
        model = LatencyModel(profile)
        for run in profile.published:
            arch = read_config(CONFIGS / run.config)
            cfg = LayerConfig(bits=run.bits, group_size=run.group_size, sym=run.sym)
            est = model.decode(arch, [cfg] * len(arch.layers), run.context, run.head_format)
            results.put(f"published: {name}: {run.model}", {
                "device": name, "model": run.model, "engine": run.engine,
                "power_mode": run.power_mode, "format": f"{run.bits}-bit g{run.group_size}, "
                f"head {run.head_format}", "context": run.context,
                "published_tps": run.tokens_per_s, "predicted_tps": est.tokens_per_s,
                "error": (est.tokens_per_s - run.tokens_per_s) / run.tokens_per_s,
                "bytes_per_token": est.bytes_per_token, "source": run.source})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--slow-tokens", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reprofile", action="store_true", help="measure the profile again")
    parser.add_argument("--redo", action="store_true", help="measure every plan again")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    protocol = {"model": "smollm2-135m (weights Q4_1-rounded)", "threads": args.threads,
                "prompt": PROMPT, "decode": "greedy, KV cache, batch 1, median s/token",
                "runtime": "packed, backend auto (ORT MatMulNBits 2/4/8 bits, 3/5/6 widened to "
                           "4/8, sparse densified), head float32", "machine": machine()}
    results = ResultFile("latency_model.json", protocol)
    if args.redo or args.reprofile:
        results.data["entries"] = {k: v for k, v in results.data["entries"].items()
                                   if not k.startswith(("cpu:", "profile"))}
    measure_cpu(results, args.tokens, args.slow_tokens, args.reprofile)
    predict_published(results)
    print_tables(results.data)


def print_tables(data: dict) -> None:
    entries = data["entries"]
    cpu = [e for k, e in entries.items() if k.startswith("cpu:")]
    print(f"\nmachine: {data['protocol']['machine']}")
    print(f"{'plan':<30} {'measured ms':>11} {'predicted ms':>12} {'error':>7}  sources")
    for e in cpu:
        print(f"{e['plan']:<30} {e['measured_s'] * 1e3:>11.1f} {e['predicted_s'] * 1e3:>12.1f} "
              f"{e['error']:>+7.1%}  {e['sources']}")
    if cpu:
        median = statistics.median(abs(e["error"]) for e in cpu)
        print(f"median |error| over {len(cpu)} plans: {median:.1%}")
    print(f"\n{'device':<28} {'model':<22} {'published':>9} {'predicted':>9} {'error':>7}")
    for k, e in entries.items():
        if k.startswith("published:"):
            print(f"{e['device']:<28} {e['model']:<22} {e['published_tps']:>9.1f} "
                  f"{e['predicted_tps']:>9.1f} {e['error']:>+7.1%}")


if __name__ == "__main__":
    main()
