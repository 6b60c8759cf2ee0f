"""CPU kernels and SmolLM2-135M decode at batch 1 on this machine: fp32, bf16, int8, packed int4
and mixed plans. Writes experiments/results/kernels.json and prints the tables. (Not named
kernels.py: that would shadow Hugging Face's `kernels` package, which transformers imports.)

Measured:
- the machine's memory bandwidth: best of several copies of a 512 MiB tensor, counting the bytes
  read and written (2 × size per copy);
- per-kernel GEMV time at SmolLM2's shapes and 4096 × 4096 (median of repeated calls, x of 1 row),
  and its achieved bandwidth = weight bytes as the kernel holds them / time;
- decode: greedy generation with the KV cache after a short prompt, median time per token;
  bytes read per token = the block linears as held in memory (measured: heap in use, via
  mallinfo2, before and after building the packed layers' kernels; ORT prepacks into its own
  layout, ~1.3x the plan's bytes) + the head (the tied embedding, in the model's dtype) + the
  KV cache; achieved bandwidth = bytes per token × tokens/s, and its share of the copy bandwidth;
- the memory model's figure for the same layers (hardware/memory.py with this machine's profile,
  experiments/results/this-cpu.yaml: the format each is held in, times the measured resident
  ratio), against the resident bytes measured here.

SmolLM2's float weights are already Q4_1-rounded (the model ships as a Q4_1 GGUF).

    .venv/bin/python experiments/kernel_bench.py [--tokens 64] [--threads 2] [--only fp32,int4]

With --threads other than 2 the results go to kernels_threads{N}.json.
"""

from __future__ import annotations

import argparse
import copy
import gc
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ResultFile, machine  # noqa: E402

from autocompress.accounting import layer_bytes  # noqa: E402
from autocompress.compress.weights import compress_weight  # noqa: E402
from autocompress.hardware.measure import copy_bandwidth, decode_seconds, median_seconds  # noqa: E402
from autocompress.hardware.memory import held_layer_bytes  # noqa: E402
from autocompress.hardware.profile import read_profile  # noqa: E402
from autocompress.model import load_model  # noqa: E402
from autocompress.plan import LayerConfig, Plan, uniform_plan  # noqa: E402
from autocompress.runtime.convert import (  # noqa: E402
    install_packed,
    load_packed_layers,
    pack_layers,
    save_packed,
)
from autocompress.runtime.cpu_kernels import (  # noqa: E402
    DEFAULT_ORT_THREADS,
    OrtMatMulNBitsKernel,
    TorchUnpackKernel,
    warm_up_ort,
)
from autocompress.runtime.memory import heap_in_use  # noqa: E402
from autocompress.runtime.modules import QuantLinear  # noqa: E402
from autocompress.runtime.packed import PackedLinear  # noqa: E402
from autocompress.search.recipes import boosted_blocks  # noqa: E402

PROMPT = "The history of the city begins in the"
# written by experiments/latency_model.py (`autocompress profile` of this machine)
PROFILE_PATH = Path(__file__).resolve().parent / "results" / "this-cpu.yaml"
SHAPES = [(1536, 576), (576, 1536), (576, 576), (4096, 4096)]


# -- measuring --------------------------------------------------------------------------------

def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def median_time(fn, min_runs: int = 5, budget_s: float = 1.0) -> float:
    return median_seconds(fn, min_runs=min_runs, budget_s=budget_s)


# -- kernels ----------------------------------------------------------------------------------

def kernel_table(shapes) -> list[dict]:
    rows = []
    warm_up_ort()  # ORT's one-off set-up, not counted
    gen = torch.Generator().manual_seed(0)
    for n, k in shapes:
        w = torch.randn(n, k, generator=gen) * 0.02
        x = torch.randn(1, k, generator=gen)

        def add(name, fn, nbytes):
            seconds = median_time(fn, budget_s=0.5)
            rows.append(dict(shape=f"{n}x{k}", kernel=name, us=seconds * 1e6,
                             weight_bytes=nbytes, gb_s=nbytes / seconds / 1e9))

        add("torch fp32 x@W.T", lambda: x @ w.T, w.numel() * 4)
        wb, xb = w.bfloat16(), x.bfloat16()
        add("torch bf16 x@W.T", lambda: xb @ wb.T, w.numel() * 2)
        w8 = torch.randint(-128, 127, (n, k), dtype=torch.int8, generator=gen)
        s8 = torch.rand(n, generator=gen)
        add("torch _weight_int8pack_mm", lambda: torch._weight_int8pack_mm(x, w8, s8),
            w8.numel() + n * 4)
        w4 = torch._convert_weight_to_int4pack_for_cpu(
            torch.randint(0, 16, (n, k), dtype=torch.int32, generator=gen), 2)
        sz = torch.rand(k // 64, n, 2, generator=gen)
        add("torch _weight_int4pack_mm_for_cpu g64",
            lambda: torch._weight_int4pack_mm_for_cpu(x, w4, 64, sz), w4.numel() + sz.numel() * 4)
        for bits in (2, 3, 4, 8):
            cfg = LayerConfig(bits=bits, group_size=64)
            matrix = PackedLinear.from_compressed(compress_weight(w, cfg), cfg).matrices[0]
            if bits != 3:
                ort = None  # the previous kernel is freed before measuring this one
                gc.collect()
                heap0 = heap_in_use()
                ort = OrtMatMulNBitsKernel(matrix)
                gc.collect()
                held = heap_in_use() - heap0
                add(f"ORT MatMulNBits {bits}b g64 acc4", lambda: ort(x), held)
                rows[-1]["plan_bytes"] = matrix.nbytes()
            if bits in (3, 4):
                torch_kernel = TorchUnpackKernel(matrix)
                add(f"torch unpack+mm {bits}b g64", lambda: torch_kernel(x), matrix.nbytes())
    return rows


# -- decode -----------------------------------------------------------------------------------

def mixed_plan(identity, default: LayerConfig, sensitive: dict, n_blocks: int) -> Plan:
    """llama.cpp-style mix: v_proj and down_proj get ``sensitive`` in the first and last eighth
    of the blocks and in every third block (the block set of search/recipes.py's baseline)."""
    plan = uniform_plan(identity, default)
    alternation = "|".join(str(b) for b in boosted_blocks(n_blocks))
    plan.overrides = {f"re:.*layers\\.({alternation})\\.(self_attn\\.v_proj|mlp\\.down_proj)":
                      sensitive}
    plan.figures = {"kind": "mixed"}
    return plan


def mlp_plan(identity, default: LayerConfig, mlp: dict) -> Plan:
    """``default`` everywhere, ``mlp`` (a partial config) on gate/up/down."""
    plan = uniform_plan(identity, default)
    plan.overrides = {"re:.*mlp\\.(gate|up|down)_proj": mlp}
    return plan


def decode_speed(model, tokenizer, n_tokens: int) -> tuple[float, int]:
    """Median seconds per generated token (greedy, KV cache, batch 1) and the mean context."""
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    return decode_seconds(model, ids, n_tokens), ids.shape[1] + n_tokens // 2


def other_bytes_per_token(loaded, dtype_bytes: int, context: int) -> int:
    """The head (tied embedding) in the model's dtype, and the KV cache read at ``context``."""
    cfg = loaded.config
    head = cfg.vocab_size * cfg.hidden_size * dtype_bytes
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    kv = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * context * dtype_bytes
    return head + kv


def dense_entry(loaded, dtype, n_tokens) -> dict:
    model = loaded.model if dtype == torch.float32 else copy.deepcopy(loaded.model).to(dtype)
    item = torch.finfo(dtype).bits // 8
    seconds, context = decode_speed(model, loaded.tokenizer, n_tokens)
    layers = sum(layer.n_params for layer in loaded.layers) * item
    return dict(seconds_per_token=seconds, layer_bytes_plan=layers, layer_bytes_resident=layers,
                bytes_per_token=layers + other_bytes_per_token(loaded, item, context),
                kernels={"torch": len(loaded.layers)})


def packed_entry(loaded, plan: Plan, backend: str, n_tokens: int, workdir: Path,
                 ort_threads: int | None = None) -> dict:
    """Pack, save, then load the layers back while measuring the heap they take as run."""
    configs = plan.resolve(layer.name for layer in loaded.layers)
    directory = workdir / "packed"
    if not (directory / "packed.safetensors").is_file() or \
            getattr(packed_entry, "_plan", None) != plan.to_dict():
        scratch = copy.deepcopy(loaded.model)
        packed = pack_layers(scratch, loaded.layers, configs, progress=False)
        install_packed(scratch, packed, backend="torch")
        save_packed(scratch, directory, plan)
        del scratch, packed
        packed_entry._plan = plan.to_dict()
    model = copy.deepcopy(loaded.model)
    for layer in loaded.layers:  # free the float linears before measuring
        parent, _, child = layer.name.rpartition(".")
        setattr(model.get_submodule(parent), child, torch.nn.Identity())
    warm_up_ort(ort_threads)  # ORT's one-off state is no layer's
    gc.collect()
    heap0 = heap_in_use()
    layers, _ = load_packed_layers(directory)
    install_packed(model, layers, backend, biases={}, ort_threads=ort_threads)
    del layers
    gc.collect()
    resident = heap_in_use() - heap0
    seconds, context = decode_speed(model, loaded.tokenizer, n_tokens)
    kernels: dict[str, int] = {}
    for module in model.modules():
        if isinstance(module, QuantLinear):
            kernels[module.backend] = kernels.get(module.backend, 0) + 1
    plan_bytes = sum(layer_bytes(*layer.shape, configs[layer.name]) for layer in loaded.layers)
    predicted = None
    if backend == "auto" and PROFILE_PATH.is_file():  # the memory model, from the CPU's profile
        profile = read_profile(PROFILE_PATH)
        predicted = sum(held_layer_bytes(*layer.shape, configs[layer.name], profile)
                        for layer in loaded.layers)
    return dict(seconds_per_token=seconds, layer_bytes_plan=plan_bytes,
                layer_bytes_resident=resident, resident_over_plan=resident / plan_bytes,
                layer_bytes_predicted=predicted,
                bytes_per_token=resident + other_bytes_per_token(loaded, 4, context),
                kernels=kernels, plan=plan.to_dict()["overrides"] or plan.default.short())


# -- main -------------------------------------------------------------------------------------

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--slow-tokens", type=int, default=3,
                        help="tokens for the slow torch-fallback configurations")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", default="", help="comma-separated entry names")
    parser.add_argument("--ort-threads", type=int, default=None,
                        help="ONNX Runtime threads (default: the runtime's, 1); one value per "
                             "process")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    protocol = {"model": "smollm2-135m", "threads": args.threads, "tokens": args.tokens,
                "prompt": PROMPT, "machine": machine()}
    # the reference run uses 2 threads; other counts keep their own file
    result_name = "kernels.json" if args.threads == 2 else f"kernels_threads{args.threads}.json"
    results = ResultFile(result_name, protocol)
    only = set(filter(None, args.only.split(",")))
    want = lambda key: (not only or key in only) and not results.has(key)  # noqa: E731

    if want("bandwidth"):
        results.put("bandwidth", {"copy_gb_s": copy_bandwidth() / 1e9,
                                  "load_average_1min": os.getloadavg()[0]})
    bandwidth = results.data["entries"]["bandwidth"]["copy_gb_s"] * 1e9
    if want("kernels"):
        results.put("kernels", {"rows": kernel_table(SHAPES),
                                "load_average_1min": os.getloadavg()[0]})

    loaded = load_model("smollm2-135m")
    n_blocks = loaded.config.num_hidden_layers
    q4, q8 = LayerConfig(bits=4, group_size=64), LayerConfig(bits=8, group_size=64)
    q3 = LayerConfig(bits=3, group_size=64)
    # magnitude pruning: the stored format is what is measured, and it needs no calibration
    two_four = {"pattern": "2:4", "sparsity": 0.5, "prune_method": "magnitude"}
    sparse30 = LayerConfig(bits=4, group_size=64, sparsity=0.3, prune_method="magnitude")
    entries = {
        "fp32": lambda: dense_entry(loaded, torch.float32, args.tokens),
        "bf16": lambda: dense_entry(loaded, torch.bfloat16, args.tokens),
        "int8": lambda: packed_entry(loaded, uniform_plan(loaded.identity, q8), "auto",
                                     args.tokens, workdir),
        "int4": lambda: packed_entry(loaded, uniform_plan(loaded.identity, q4), "auto",
                                     args.tokens, workdir, args.ort_threads),
        "int4_ort_2threads": lambda: packed_entry(loaded, uniform_plan(loaded.identity, q4),
                                                  "auto", args.tokens, workdir, ort_threads=2),
        "int4_torch_fallback": lambda: packed_entry(loaded, uniform_plan(loaded.identity, q4),
                                                    "torch", args.slow_tokens, workdir),
        "mixed_q4_q8": lambda: packed_entry(loaded, mixed_plan(loaded.identity, q4, {"bits": 8},
                                                               n_blocks),
                                            "auto", args.tokens, workdir),
        "mixed_q3_q4": lambda: packed_entry(loaded, mixed_plan(loaded.identity, q3, {"bits": 4},
                                                               n_blocks),
                                            "auto", args.tokens, workdir),
        "q4_mlp_2to4": lambda: packed_entry(loaded, mlp_plan(loaded.identity, q4, two_four),
                                            "auto", args.tokens, workdir),
        "q4_sparse30": lambda: packed_entry(loaded, uniform_plan(loaded.identity, sparse30),
                                            "auto", args.tokens, workdir),
    }
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        for key, run in entries.items():
            # ORT's thread count is fixed per process (its global pool): measured in a child
            if key == "int4_ort_2threads" and args.ort_threads != 2 and want(key):
                subprocess.run([sys.executable, __file__, "--only", key, "--ort-threads", "2",
                                "--threads", str(args.threads), "--tokens", str(args.tokens),
                                "--slow-tokens", str(args.slow_tokens)], check=True)
                results = ResultFile(result_name, protocol)  # what the child wrote
                continue
            if want(key):
                print(f"measuring {key} ...", flush=True)
                record = run()
                record["ort_threads"] = args.ort_threads or DEFAULT_ORT_THREADS
                # other work on the machine slows every figure: keep what it was
                record["load_average_1min"] = os.getloadavg()[0]
                record["tokens_per_s"] = 1 / record["seconds_per_token"]
                record["achieved_gb_s"] = record["bytes_per_token"] * record["tokens_per_s"] / 1e9
                record["share_of_copy_bandwidth"] = record["achieved_gb_s"] * 1e9 / bandwidth
                results.put(key, record)
    print_tables(results.data)


def print_tables(data: dict) -> None:
    entries = data["entries"]
    print(f"\nmachine: {data['protocol']['machine']}")
    loads = [e["load_average_1min"] for e in entries.values() if "load_average_1min" in e]
    if loads:
        print(f"load average while measuring: {min(loads):.1f} to {max(loads):.1f} "
              f"(other processes share the {os.cpu_count()} cores)")
    if "bandwidth" in entries:
        print(f"copy bandwidth (read + write): {entries['bandwidth']['copy_gb_s']:.1f} GB/s")
    if "kernels" in entries:
        print(f"\n{'shape':<10} {'kernel':<40} {'us':>9} {'bytes':>11} {'GB/s':>6}")
        for row in entries["kernels"]["rows"]:
            print(f"{row['shape']:<10} {row['kernel']:<40} {row['us']:>9.1f} "
                  f"{row['weight_bytes']:>11,} {row['gb_s']:>6.1f}")
    print(f"\n{'decode':<20} {'tok/s':>7} {'MB/token':>9} {'layers MB':>10} {'plan MB':>8} "
          f"{'res/plan':>8} {'model MB':>9} {'GB/s':>6} {'share':>6}  kernels")
    for key, e in entries.items():
        if "tokens_per_s" not in e:
            continue
        ratio = e.get("resident_over_plan", 1.0)
        predicted = e.get("layer_bytes_predicted")
        predicted = f"{predicted / 1e6:>9.1f}" if predicted else f"{'-':>9}"
        print(f"{key:<20} {e['tokens_per_s']:>7.1f} {e['bytes_per_token'] / 1e6:>9.1f} "
              f"{e['layer_bytes_resident'] / 1e6:>10.1f} {e['layer_bytes_plan'] / 1e6:>8.1f} "
              f"{ratio:>8.3f} {predicted} {e['achieved_gb_s']:>6.1f} "
              f"{e['share_of_copy_bandwidth']:>6.1%}  {e['kernels']}")


if __name__ == "__main__":
    main()
