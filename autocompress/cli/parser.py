"""The sub-commands and their options. Builds without torch: the signal handlers are
in place before it runs, and a SIGTERM then must not wait for torch to import."""

from __future__ import annotations

import argparse

from .args import (_Parser, _add_build, _add_calib, _add_device, _add_force, _add_memory,
                   _add_model, _add_placement, _add_recover, _bits_list, _group_size,
                   _non_negative_int, _positive_int)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="autocompress",
        description="Find per-layer compression plans for LLMs under a memory budget.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("layers", help="list the compressible linear layers of a model")
    _add_model(p)

    p = sub.add_parser("plan", help="write a uniform plan (a baseline)")
    p.add_argument("--config", default=None,
                   help="a model's config.json instead of --model (no weights needed)")
    _add_model(p)
    p.add_argument("--bits", type=int, default=None, help="native format's bits (or --gguf)")
    p.add_argument("--group-size", type=_group_size, default=64)
    p.add_argument("--sym", action="store_true", help="symmetric grid (default asymmetric)")
    p.add_argument("--method", choices=["rtn", "gptq", "signround"], default="rtn")
    p.add_argument("--gguf", default=None, metavar="TYPE",
                   help="a GGUF type for every block linear instead of --bits (q4_k, q8_0, "
                        "iq4_xs, ...), made by llama.cpp's quantizer")
    p.add_argument("--recipe", default=None, metavar="NAME",
                   help="one of llama.cpp's recipes (Q4_K_M, Q3_K_S, IQ4_XS, ...): the type "
                        "llama-quantize gives each tensor, as a plan")
    p.add_argument("--pure", action="store_true",
                   help="with --recipe: its default type everywhere (llama-quantize --pure)")
    p.add_argument("--imatrix", action="store_true",
                   help="with --gguf or --recipe: weight llama.cpp's rounding by the mean x² of "
                        "each input column over the calibration windows (as llama-imatrix)")
    p.add_argument("--token-embedding-type", default=None, metavar="TYPE",
                   help="GGUF type of the token embedding (default float16), as llama-quantize's "
                        "flag of that name")
    p.add_argument("--output-tensor-type", default=None, metavar="TYPE",
                   help="GGUF type of an untied output head (default float16)")
    p.add_argument("--sparsity", type=float, default=0.0)
    p.add_argument("--pattern", choices=["unstructured", "2:4"], default="unstructured")
    p.add_argument("--prune-method", choices=["magnitude", "wanda"], default="wanda")
    p.add_argument("--rank-ratio", type=float, default=1.0)
    p.add_argument("--clip", action="store_true",
                   help="clipped grids: each group's range shrunk to the least error weighted "
                        "by the input's mean x² (--bits formats; same bytes)")
    p.add_argument("--awq", action="store_true",
                   help="activation-aware scaling: input columns scaled by their calibration "
                        "activations before quantizing (--bits formats, rtn or gptq; 2 bytes "
                        "per input column)")
    p.add_argument("--out", required=True, help="plan JSON to write")
    _add_force(p, "the plan")
    p.add_argument("--mode", choices=["sequential", "parallel"], default="sequential",
                   help="how GPTQ/Wanda will be calibrated (recorded in the plan)")
    _add_calib(p, 16)
    _add_memory(p)

    p = sub.add_parser("apply", help="write the compressed model (safetensors + plan)")
    p.add_argument("plan")
    _add_model(p, None)
    p.add_argument("--out", required=True,
                   help="output directory (an earlier apply output there is replaced whole)")
    _add_force(p, "the model")
    _add_placement(p, from_plan=True)
    p.add_argument("--packed", action="store_true",
                   help="write bit-packed low-bit storage (runtime format) instead of float16")
    _add_build(p)
    _add_recover(p)

    p = sub.add_parser("export", help="write the plan's model as a file an engine runs (GGUF)")
    p.add_argument("plan")
    _add_model(p, None)
    p.add_argument("--format", choices=["gguf"], required=True,
                   help="gguf: llama.cpp's file, every tensor in its plan type")
    p.add_argument("--out", required=True, help="file to write (e.g. model.gguf)")
    _add_force(p, "the file")
    _add_build(p)
    _add_placement(p, from_plan=True)
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")

    p = sub.add_parser("eval", help="perplexity and KL of a plan on evaluation text")
    p.add_argument("plan")
    _add_model(p, None)
    p.add_argument("--eval-text", default=None,
                   help="evaluation text file (default: the embedded pydoc corpus, eval part)")
    p.add_argument("--windows", type=_positive_int, default=None,
                   help="evaluation windows (default: 40, or as many as the text holds)")
    p.add_argument("--holdout", action="store_true",
                   help="evaluate on the held-out windows the search measured the plan on "
                        "(and compare with the KL it reported)")
    p.add_argument("--window-len", type=_positive_int, default=512,
                   help="tokens per evaluation window")
    p.add_argument("--no-kl", action="store_true", help="skip KL (halves the time)")
    p.add_argument("--engine", choices=["torch", "llamacpp"], default="torch",
                   help="what runs the model: torch (the plan built as the search measured "
                        "it) or llamacpp (a GGUF file in llama.cpp, --gguf)")
    p.add_argument("--gguf", default=None,
                   help="with --engine llamacpp: the GGUF file to run (KL against the "
                        "uncompressed model on the same windows)")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    _add_device(p, required=False)
    _add_build(p)
    _add_memory(p)
    _add_placement(p, from_plan=True)

    p = sub.add_parser("sensitivity",
                       help="build a sensitivity table (layers x options) and a heat map")
    _add_model(p)
    p.add_argument("--proxy", default="fisher", help="fisher | hessian | hutchinson | measured")
    p.add_argument("--space", default="joint",
                   help="search space: a bundled name (joint, bits, gguf) or a YAML path")
    p.add_argument("--out", required=True, help="table JSON to write (the PNG goes beside it)")
    _add_force(p, "the table")
    _add_calib(p, 8)
    _add_placement(p)

    p = sub.add_parser("search", help="search a per-layer plan under a memory budget")
    _add_model(p)
    p.add_argument("--budget", default=None,
                   help="whole footprint: 4GB, 3.5GiB, 80MB, 62000000 (default with --device: "
                        "the memory the device lets a model use)")
    _add_device(p, required=False)
    p.add_argument("--speed-profile", default=None,
                   help="a llama.cpp speed profile (profile --engine llamacpp): --latency and "
                        "--min-tps then predict llama.cpp's decode of GGUF plans from it")
    p.add_argument("--latency", default=None,
                   help="most predicted time per decoded token on --device, e.g. 30ms")
    p.add_argument("--min-tps", type=float, default=None,
                   help="fewest predicted decoded tokens/s on --device (batch 1)")
    p.add_argument("--bits", type=_bits_list, default=None,
                   help="RTN bit widths to choose from, e.g. 2,3,4,8, instead of a space")
    p.add_argument("--group-size", type=_group_size, default=64)
    p.add_argument("--space", default=None,
                   help="search space: a bundled name (joint, bits, gguf) or a YAML path "
                        "(default: joint, the space of bits, groups, GPTQ, sparsity and low "
                        "rank; with --bits: RTN at those bit widths)")
    p.add_argument("--mode", choices=["sequential", "parallel"], default="sequential",
                   help="how the measured candidates are calibrated, as apply will build the "
                        "plan (recorded in it): through the compressed prefix (sequential, "
                        "better, slower) or from the uncompressed model")
    p.add_argument("--out", required=True, help="output directory (plan.json, tables)")
    p.add_argument("--export", choices=["gguf", "none"], default=None,
                   help="write the chosen plan as OUT/model.gguf and check it in llama.cpp "
                        "(default: gguf when every option of the space is a GGUF type)")
    p.add_argument("--proxy", default="fisher", help="fisher | hessian | hutchinson | measured")
    p.add_argument("--holdout-windows", type=_positive_int, default=4,
                   help="held-out windows to measure candidates on in process (--eval-top 0)")
    p.add_argument("--trials", type=_non_negative_int, default=40,
                   help="level 2: Optuna trials, each plan measured at low fidelity (0 skips)")
    p.add_argument("--sampler", default="tpe", choices=["tpe", "nsga2", "gp", "random"],
                   help="level 2's Optuna sampler")
    p.add_argument("--fast-windows", type=_positive_int, default=2,
                   help="held-out windows per level-2 trial")
    p.add_argument("--eval-top", type=_non_negative_int, default=4,
                   help="level 3: the best level-2 plans evaluated as Ray Tune trials with ASHA, "
                        "besides level 1's (0: measure level 1's in process instead)")
    p.add_argument("--eval-windows", type=_positive_int, default=8,
                   help="held-out windows per level-3 candidate")
    p.add_argument("--storage", default=None,
                   help="Optuna storage: an RDB URL (sqlite:///study.db) or a journal file "
                        "(default: OUT/study.journal; optuna-dashboard opens either)")
    p.add_argument("--resume", action="store_true",
                   help="continue the study and the Ray Tune experiment left in --out")
    _add_force(p, "the search (an earlier search in --out is replaced)")
    p.add_argument("--address", default=None,
                   help="Ray cluster to join for level 3 (default: a local Ray in process)")
    p.add_argument("--num-cpus", type=_positive_int, default=None,
                   help="CPUs of the local Ray and torch threads of level 3 (default: all); "
                        "with --address, CPUs per level-3 trial (default 1), as many trials "
                        "at once as the cluster's CPUs hold")
    p.add_argument("--level2-workers", type=_non_negative_int, default=0,
                   help="Ray workers measuring level 2's trials side by side, one CPU and one "
                        "torch thread each (default 0: in this process)")
    p.add_argument("--level2-batch", type=_positive_int, default=None,
                   help="level-2 trials asked at once (default: --level2-workers, at least 1); "
                        "the same batch asks the same trials with any number of workers")
    p.add_argument("--seed", type=int, default=0, help="the Optuna sampler's seed")
    p.add_argument("--rounding", choices=["signround"], default=None,
                   help="signround: the chosen plan's RTN/GPTQ layers get learned rounding "
                        "(same formats and bytes), kept where it lowers the held-out KL")
    _add_recover(p)
    _add_calib(p, 8)
    _add_memory(p)
    _add_placement(p)
    p = sub.add_parser("study", help="a research study, one command: fronts (quality x memory "
                                     "x predicted speed on several devices), families "
                                     "(quantization, pruning, low rank, joint at equal bytes), "
                                     "layers (which layers tolerate a format, across models), "
                                     "proxies (each proxy's fidelity per option family)")
    p.add_argument("name", choices=["fronts", "families", "layers", "proxies"],
                   help="the study")
    _add_model(p)
    p.add_argument("--models", default=None,
                   help="layers, proxies: the models, comma-separated (default: --model)")
    p.add_argument("--proxies", default="fisher,hessian,hutchinson",
                   help="proxies: the proxies compared (default: %(default)s)")
    p.add_argument("--plans-per-family", type=_positive_int, default=8,
                   help="proxies: random plans measured per option family (default: %(default)s)")
    p.add_argument("--tables", default=None,
                   help="layers: a sensitivity table per model (e.g. a search's "
                        "sensitivity.json), comma-separated, 'build' to build one")
    p.add_argument("--layer-bits", type=int, default=3,
                   help="layers: the RTN format profiled, bits (default: %(default)s)")
    p.add_argument("--layer-group", type=int, default=64,
                   help="layers: the RTN format profiled, group size (default: %(default)s)")
    p.add_argument("--measure-windows", type=int, default=2,
                   help="layers: held-out windows each layer alone is measured on (0: proxy "
                        "only; default: %(default)s)")
    p.add_argument("--measure-every", type=_positive_int, default=1,
                   help="layers: measure the layers of every k-th block (default: all)")
    p.add_argument("--devices", default=None,
                   help="fronts: device profiles to compare, comma-separated (at least two), "
                        "e.g. jetson-orin-nano-8gb,raspberry-pi-5-8gb,rtx-4090")
    p.add_argument("--min-tps", default=None, metavar="DEVICE=TPS,...",
                   help="fronts: the decode speed (tokens/s, the device's latency model) each "
                        "named device's plans must reach, e.g. raspberry-pi-5-8gb=50")
    p.add_argument("--bits", default="2.5,3,3.5,4",
                   help="families: budgets as the bytes of uniform b-bit (default: %(default)s)")
    p.add_argument("--families", default=None,
                   help="families: which, comma-separated (default: quantization, "
                        "'pruning, 16-bit', 'pruning, 8-bit', 'low rank, 16-bit', joint)")
    p.add_argument("--space", default="joint",
                   help="search space: a bundled name (joint, bits, gguf) or a YAML path")
    p.add_argument("--points", type=_positive_int, default=6, help="plans per device front")
    p.add_argument("--eval-windows", type=_positive_int, default=4,
                   help="held-out windows each plan is measured on")
    p.add_argument("--context", type=_positive_int, default=2048,
                   help="context of the memory and speed predictions")
    p.add_argument("--proxy", default="fisher", help="fisher | hessian | hutchinson | measured")
    p.add_argument("--out", required=True, help="directory for the study's results and figures")
    p.add_argument("--resume", action="store_true",
                   help="continue the study left in --out (plans measured are kept)")
    _add_force(p, "the study (an earlier study in --out is replaced)")
    _add_calib(p, 8)
    _add_placement(p)

    p = sub.add_parser("devices", help="list the device profiles with memory and bandwidth")

    p = sub.add_parser("profile", help="measure this machine and write a device profile")
    p.add_argument("--out", required=True,
                   help="profile YAML to write, e.g. my-box.yaml (then --device my-box.yaml)")
    p.add_argument("--name", default=None, help="profile name (default: the file's stem)")
    _add_force(p, "the profile")
    _add_model(p)
    p.add_argument("--config", default=None,
                   help="measure at the layer shapes of this config.json instead of --model's")
    p.add_argument("--threads", type=_positive_int, default=None, help="torch threads")
    p.add_argument("--formats", default=None,
                   help="formats to measure, e.g. f16,q4,q8 (default: every runtime format: "
                        "f16, q2-q6, q8, q4+2:4, q4+sparse)")
    p.add_argument("--engine", choices=["autocompress", "llamacpp"], default="autocompress",
                   help="llamacpp: llama.cpp's decode of --model's GGUF files, one per type "
                        "(--formats: GGUF types), for predicting mixed files")

    p = sub.add_parser("estimate",
                       help="predict a plan's memory and decode speed on a device from a config")
    p.add_argument("plan", help="plan JSON")
    _add_device(p, required=False)
    p.add_argument("--speed-profile", default=None,
                   help="a llama.cpp speed profile (profile --engine llamacpp): predict "
                        "llama.cpp's decode of the plan's GGUF on the machine it measured "
                        "(with or instead of --device)")
    p.add_argument("--config", default=None,
                   help="model config.json (default: the plan's model's, without loading weights)")
    p.add_argument("--model", default=None, help="model whose config to use (default: the plan's)")
    _add_memory(p)
    p.add_argument("--kv-bits", type=int, choices=[4, 8, 16], default=16, help="KV-cache bits")
    p.add_argument("--head-format", default=None,
                   help="format of embeddings and head: f16, bf16, f32, q4, q8 ... "
                        "(default: the device's float dtype)")
    p.add_argument("--prompt-tokens", type=_positive_int, default=512,
                   help="prompt length for the prefill estimate")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    return parser
