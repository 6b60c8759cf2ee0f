"""llama.cpp's recipes on SmolLM2-135M against searched GGUF plans of the same size, all measured
by llama.cpp. Recipes: each written as a plan
(`plan --recipe`), exported to GGUF by `export --format gguf`, loaded by llama.cpp through the
binding, perplexity on wiki.test.raw and KL to the float32 model (run in torch on the same
windows); with and without an importance matrix (calibration on wiki.valid.tokens). Writes
experiments/results/gguf.json (resumable per row); the GGUF files go to experiments/runs/gguf/
(not committed).

    .venv/bin/python experiments/gguf_bench.py [--recipes Q4_K_M,Q3_K_S] [--windows 10]

(Not experiments/gguf.py: a script of that name beside the others would shadow the gguf
package for every script in this directory.)
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CALIB_TEXT, EVAL_TEXT, MODEL_LABEL, ResultFile, check_data, eval_protocol, machine  # noqa: E402

from autocompress.compress.reproduce import build_recipe  # noqa: E402
from autocompress.data import calibration_data, load_stream  # noqa: E402
from autocompress.engines.llamacpp import PINNED_VERSION, LlamaCppEngine  # noqa: E402
from autocompress.evaluate import ReferenceCache, evaluate  # noqa: E402
from autocompress.export.gguf import export_gguf  # noqa: E402
from autocompress.gguf_recipes import recipe_plan  # noqa: E402
from autocompress.model import load_model  # noqa: E402
from autocompress.plan import Plan  # noqa: E402
from autocompress.provenance import Provenance  # noqa: E402

RUNS = Path(__file__).resolve().parent / "runs" / "gguf"
RESULTS_PNG = Path(__file__).resolve().parent / "results" / "gguf.png"
DEFAULT_RECIPES = "Q2_K,Q3_K_S,Q3_K_M,Q3_K_L,IQ4_XS,IQ4_NL,Q4_K_S,Q4_K_M,Q5_K_S,Q5_K_M,Q6_K,Q8_0"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m",
                        help="the model (a GGUF: its metadata and tokenizer are exported)")
    parser.add_argument("--label", default="",
                        help="for another model: results/gguf_LABEL.json, runs/gguf-LABEL/")
    parser.add_argument("--recipes", default=DEFAULT_RECIPES)
    parser.add_argument("--windows", type=int, default=10)
    parser.add_argument("--window-len", type=int, default=512)
    parser.add_argument("--calib-windows", type=int, default=16)
    parser.add_argument("--no-plain", action="store_true", help="only the imatrix rows")
    parser.add_argument("--search-at", default="",
                        help="recipes at whose size to run `search --space gguf` (comma list)")
    parser.add_argument("--speeds", action="store_true",
                        help="measure decode tokens/s of every row's file, all together (run "
                             "it alone: the machine's two cores are the measurement)")
    parser.add_argument("--predict", type=Path, default=None,
                        help="a llama.cpp speed profile (profile --engine llamacpp): predict "
                             "each row's decode speed from it, beside the measured one")
    parser.add_argument("--torch-eval", default="",
                        help="rows (comma list of keys, or 'all') whose plan is built as "
                             "`autocompress eval` builds it and measured in torch on the same "
                             "windows (fills torch_ppl / torch_kl)")
    parser.add_argument("--trials", type=int, default=24)
    parser.add_argument("--eval-top", type=int, default=2,
                        help="level 3 candidates (0: the chosen plan is checked in process, "
                             "without Ray: one copy of a large model in memory)")
    parser.add_argument("--search-calib", type=int, default=8,
                        help="the search's calibration windows (proxy, imatrix)")
    parser.add_argument("--fast-windows", type=int, default=2, help="level 2's windows per trial")
    parser.add_argument("--source-row", action="store_true",
                        help="also run the source GGUF itself in llama.cpp (key SOURCE): the "
                             "KL llama.cpp's kernels alone add against float32 torch")
    parser.add_argument("--search-tables", choices=["space", "recipe"], default="space",
                        help="embedding/head types of the searched plans: gguf.yaml's (q8_0, "
                             "SmolLM2's recipes' type) or the recipe's own at each size (a "
                             "large vocabulary at q8_0 would not fit the smaller recipes)")
    parser.add_argument("--final-windows", type=int, default=8,
                        help="windows of the search's final measurement (level 3 or in process)")
    args = parser.parse_args()
    global RUNS, RESULTS_PNG
    if args.label:
        RUNS = RUNS.with_name(f"gguf-{args.label}")
        RESULTS_PNG = RESULTS_PNG.with_name(f"gguf_{args.label}.png")
    check_data()
    loaded = load_model(args.model)
    windows = load_stream(loaded.tokenizer, EVAL_TEXT, "eval").windows(args.windows,
                                                                       args.window_len)
    calib = calibration_data(loaded.tokenizer, str(CALIB_TEXT), args.calib_windows, 0,
                             args.window_len)
    provenance = Provenance(calib_text=str(CALIB_TEXT), calib_windows=args.calib_windows,
                            window_len=args.window_len, calib_digest=calib.digest,
                            mode="parallel", made_by="experiments/gguf_bench.py")
    protocol = {"model": MODEL_LABEL if args.model == "smollm2-135m" else
                 f"{Path(args.model).name} (GGUF dequantized to float32)", "eval": eval_protocol(args.windows, args.window_len),
                "engine": f"llama.cpp (xllamacpp {PINNED_VERSION}, CPU), the exported GGUF",
                "kl_reference": "the float32 model in torch, same windows",
                "calibration": f"imatrix rows: {args.calib_windows} windows of "
                               f"{args.window_len} tokens of wiki.valid.tokens, mean x² per "
                               "input column of the uncompressed model (parallel)",
                "machine": machine()}
    results = ResultFile(f"gguf_{args.label}.json" if args.label else "gguf.json", protocol)
    reference = ReferenceCache(loaded.model, windows)  # once for all rows
    RUNS.mkdir(parents=True, exist_ok=True)
    for recipe in filter(None, args.recipes.split(",")):
        for imatrix in ([True] if args.no_plain else [False, True]):
            key = f"{recipe}{' imatrix' if imatrix else ''}"
            if results.has(key):
                continue
            start = time.time()
            plan = recipe_plan(loaded, recipe, imatrix, provenance=provenance)
            path = RUNS / f"{recipe}{'-imatrix' if imatrix else ''}.gguf"
            made = export_gguf(loaded, plan, path, build_recipe(loaded, plan), progress=False)
            built = time.time() - start
            engine = LlamaCppEngine(path, n_ctx=args.window_len, threads=2)
            result = evaluate(engine, windows, reference=reference, progress=True, desc=key)
            engine.close()
            results.put(key, {"recipe": recipe, "imatrix": imatrix, "ppl": result.ppl,
                              "kl": result.kl, "file_bytes": made.file_bytes,
                              "tensor_bytes": made.planned_bytes, "types": made.types,
                              "tensor_weights": tensor_weights(loaded),
                              "export_s": round(built, 1),
                              "eval_s": round(time.time() - start - built, 1)})
            print(f"{key}: ppl {result.ppl:.2f}, KL {result.kl:.4f}, "
                  f"{made.file_bytes / 1e6:.1f} MB", flush=True)
    if args.source_row and not results.has("SOURCE"):
        from autocompress.export.gguf import source_gguf

        path = source_gguf(loaded)
        start = time.time()
        engine = LlamaCppEngine(path, n_ctx=args.window_len, threads=2)
        result = evaluate(engine, windows, reference=reference, progress=True, desc="SOURCE")
        engine.close()
        results.put("SOURCE", {"recipe": path.name, "imatrix": False, "ppl": result.ppl,
                               "kl": result.kl, "file_bytes": path.stat().st_size,
                               "tensor_bytes": 0, "types": {}, "export_s": 0.0,
                               "eval_s": round(time.time() - start, 1)})
        print(f"SOURCE: ppl {result.ppl:.2f}, KL {result.kl:.4f}", flush=True)
    if args.torch_eval:
        torch_eval(results, loaded, provenance, windows, reference, args.torch_eval)
    if args.speeds:
        measure_speeds(results)
    if args.predict:
        predict_speeds(results, loaded, provenance, args.predict)
    for recipe in filter(None, args.search_at.split(",")):
        key = f"search@{recipe}"
        if results.has(key):
            continue
        results.put(key, searched_row(loaded, recipe, provenance, windows, reference, args))
        row = results.data["entries"][key]
        print(f"{key}: ppl {row['ppl']:.2f}, KL {row['kl']:.4f}, "
              f"{row['file_bytes'] / 1e6:.1f} MB", flush=True)
    plot(results)


SPEED_PROTOCOL = ("decode at batch 1 after a 16-token prompt, 64 tokens, 2 threads; all files "
                  "measured in 5 interleaved rounds, each file's best round")


def measure_speeds(results: ResultFile) -> None:
    """Decode tokens/s of every row's file (``measure_decode``: interleaved rounds, best of
    each), all rows measured again together so that they share one protocol and one state of
    the machine."""
    from autocompress.hardware.llamacpp_speed import measure_decode

    rows = []
    for key, entry in results.data["entries"].items():
        if key.startswith("search@"):
            path = RUNS / f"search-{entry['recipe']}" / "model.gguf"
        else:
            path = RUNS / f"{entry['recipe']}{'-imatrix' if entry['imatrix'] else ''}.gguf"
        if path.is_file():
            rows.append((key, path))
        else:
            print(f"{key}: {path} is gone; its speed is not measured", flush=True)
    rates = measure_decode([path for _, path in rows], threads=2,
                           progress=lambda what, _: print(f"decode speeds: {what}", flush=True))
    for (key, _), rate in zip(rows, rates):
        entry = results.data["entries"][key]
        results.put(key, {**{k: v for k, v in entry.items() if k != "measured_at"},
                          "decode_tps": rate, "speed_protocol": SPEED_PROTOCOL})
        print(f"{key}: {rate:.1f} tokens/s", flush=True)


def _row_plan(loaded, key: str, entry: dict, provenance: Provenance) -> Plan:
    if key.startswith("search@"):
        return Plan.load(RUNS / f"search-{entry['recipe']}" / "plan.json")
    return recipe_plan(loaded, entry["recipe"], entry["imatrix"], provenance=provenance)


def torch_eval(results: ResultFile, loaded, provenance: Provenance, windows, reference,
               rows: str) -> None:
    """What `autocompress eval PLAN` measures for each row's plan (the torch model its build
    makes, the same windows), beside llama.cpp's figure for the exported file."""
    from autocompress.compress.reproduce import build_model

    wanted = None if rows == "all" else set(rows.split(","))
    for key, entry in list(results.data["entries"].items()):
        if "torch_ppl" in entry or (wanted is not None and key not in wanted):
            continue
        model = build_model(loaded, _row_plan(loaded, key, entry, provenance), progress=False)
        result = evaluate(model, windows, reference=reference, progress=True,
                          desc=f"{key} (torch)")
        del model
        results.put(key, {**{k: v for k, v in entry.items() if k != "measured_at"},
                          "torch_ppl": result.ppl, "torch_kl": result.kl})
        print(f"{key}: torch ppl {result.ppl:.2f} (llama.cpp {entry['ppl']:.2f})", flush=True)


def predict_speeds(results: ResultFile, loaded, provenance: Provenance, profile: Path) -> None:
    """Each row's decode speed as the llama.cpp speed profile predicts it (from the weights
    each stored type holds in the row's plan)."""
    from autocompress.hardware.llamacpp_speed import LlamaCppSpeed, plan_entries, weights_by_type

    speed = LlamaCppSpeed.load(profile)
    for key, entry in list(results.data["entries"].items()):
        if key.startswith("search@") and not (RUNS / f"search-{entry['recipe']}").is_dir():
            print(f"{key}: its plan is gone (another checkout's runs/); prediction kept as it "
                  "was", flush=True)
            continue
        plan = _row_plan(loaded, key, entry, provenance)
        weights = weights_by_type(plan_entries(loaded, plan.resolve_model(loaded)))
        predicted = 1 / speed.predict_s(weights)
        # a row that stores every weight as one of the profile's own files did is no test of
        # the model's predictions: only the others (mixed files) are
        mixed = all(f["weights"] != weights for f in speed.files)
        if entry.get("predicted_tps") != predicted or entry.get("mixed_types") != mixed:
            results.put(key, {**{k: v for k, v in entry.items() if k != "measured_at"},
                              "predicted_tps": predicted, "mixed_types": mixed,
                              "speed_profile": f"{profile.name} ({len(speed.files)} uniform "
                                               f"files, {speed.threads} threads)"})


def plot(results: ResultFile) -> None:
    """experiments/results/gguf.png: llama.cpp perplexity against file size, recipes with and
    without imatrix, searched plans marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    entries = results.data["entries"]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for imatrix, style, label in ((False, "o--", "llama.cpp recipes"),
                                  (True, "s-", "llama.cpp recipes + imatrix")):
        rows = sorted((e["file_bytes"] / 1e6, e["ppl"], e["recipe"]) for k, e in entries.items()
                      if not k.startswith("search@") and e["imatrix"] == imatrix)
        if rows:
            ax.plot([r[0] for r in rows], [r[1] for r in rows], style, label=label, alpha=0.8)
            if imatrix:
                for x, y, name in rows:
                    ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, 4),
                                fontsize=7)
    searched = [(e["file_bytes"] / 1e6, e["ppl"]) for k, e in entries.items()
                if k.startswith("search@")]
    if searched:
        ax.plot(*zip(*searched), "*", markersize=13, color="crimson",
                label="search --space gguf (at a recipe's bytes)")
    ax.set_xlabel("GGUF file size (MB)")
    ax.set_ylabel("llama.cpp perplexity, wiki.test.raw")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    model = results.data["protocol"]["model"].split(" (")[0]
    ax.set_title(f"{model} in llama.cpp: recipes and searched plans")
    fig.tight_layout()
    tmp = RESULTS_PNG.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(RESULTS_PNG)


def tensor_weights(loaded) -> int:
    """Weights in the plan's entries (block linears, embedding, untied head): what
    tensor_bytes holds, for bits per weight."""
    return sum(info.out_features * info.in_features for info in loaded.layers + loaded.tables)


def seed_sensitivity_cache(out: Path) -> None:
    """Start a search's sensitivity cache from an earlier search's of this benchmark: the table
    does not depend on the budget, and the cache checks its own key (model, space, proxy,
    calibration digest), rebuilding itself when it does not match."""
    target = out / "sensitivity.cache.json"
    if target.exists():
        return
    earlier = sorted(RUNS.glob("search-*/sensitivity.cache.json"))
    if earlier:
        import shutil

        out.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(earlier[0], target)


def searched_row(loaded, recipe: str, provenance: Provenance, windows, reference, args) -> dict:
    """`search --space gguf` at the bytes of ``recipe``'s plan; its GGUF run in llama.cpp."""
    from autocompress.accounting import model_footprint
    from autocompress.search.engine import SearchSettings, run_search
    from autocompress.plan import table_configs
    from autocompress.search.space import SearchSpace

    target = recipe_plan(loaded, recipe, True, provenance=provenance)
    budget = model_footprint(loaded, target.resolve_model(loaded)).total
    out = RUNS / f"search-{recipe}"
    seed_sensitivity_cache(out)
    start = time.time()
    settings = SearchSettings(
        budget=budget, calib_text=str(CALIB_TEXT), trials=args.trials, eval_top=args.eval_top,
        n_calib=args.search_calib, fast_windows=args.fast_windows,
        eval_windows=args.final_windows, n_holdout=args.final_windows, num_cpus=2,
        resume=(out / "study.journal").is_file())
    space = SearchSpace.load("gguf")
    if args.search_tables == "recipe":
        space = dataclasses.replace(space, tables=table_configs(
            target, [table.name for table in loaded.tables]))
    found = run_search(loaded, space, settings, out_dir=out, progress=False)
    searched = time.time() - start
    made = export_gguf(loaded, found.plan, out / "model.gguf", build_recipe(loaded, found.plan),
                       progress=False)
    engine = LlamaCppEngine(made.path, n_ctx=args.window_len, threads=2)
    result = evaluate(engine, windows, reference=reference, progress=True, desc=f"search@{recipe}")
    engine.close()
    return {"recipe": recipe, "search": True, "budget_bytes": budget, "ppl": result.ppl,
            "kl": result.kl, "file_bytes": made.file_bytes, "tensor_bytes": made.planned_bytes,
            "types": made.types, "tensor_weights": tensor_weights(loaded),
            "chosen": found.chosen.label,
            "search_s": round(searched, 1), "timings_s": found.timings,
            "settings": f"space gguf.yaml, proxy {settings.proxy}, {settings.trials} trials "
                        f"on {settings.fast_windows} windows, "
                        + (f"eval-top {settings.eval_top}" if settings.eval_top else
                           "the chosen plan checked in process")
                        + f" on {settings.final_windows} windows; {settings.mode} calibration "
                        f"({settings.n_calib} windows of {Path(settings.calib_text).name}), "
                        "budget = the recipe's plan footprint"
                        + ("; embedding and head at the recipe's types"
                           if args.search_tables == "recipe" else "")}


if __name__ == "__main__":
    main()
