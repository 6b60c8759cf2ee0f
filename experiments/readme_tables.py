"""Render experiments/results/*.json as the README's tables (between marker comments), so the
README never shows a number that a benchmark did not write.

    .venv/bin/python experiments/readme_tables.py          # rewrite README.md in place
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, RESULTS  # noqa: E402

LABELS = {
    "base": "uncompressed (float; weights already Q4_1-rounded)",
    "rtn8": "RTN 8-bit", "rtn4": "RTN 4-bit", "rtn3": "RTN 3-bit", "rtn2": "RTN 2-bit",
    "gptq4": "GPTQ 4-bit", "gptq3": "GPTQ 3-bit", "gptq2": "GPTQ 2-bit",
    "wanda50": "Wanda 50% unstructured (fp16 values)", "wanda2:4": "Wanda 2:4 (fp16 values)",
    "svd0.5": "SVD rank ratio 0.5, whitened (fp16 factors)",
    "search@rtn3": "`search` at the total bytes of RTN 3-bit",
}


def _fmt_ppl(ppl: float) -> str:
    return f"{ppl:.3g}" if ppl >= 1e4 else f"{ppl:.2f}"


def baselines() -> str:
    data = json.loads((RESULTS / "baselines.json").read_text())
    p = data["protocol"]
    rows = ["| plan | perplexity | bits/weight (block linears) | block-linear bytes | "
            "total footprint (ctx 2048) | compress s | eval s |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for key, label in LABELS.items():
        e = data["entries"].get(key)
        if e is None:
            continue
        extra = ""
        if key == "search@rtn3":
            extra = f" (chosen: {e['chosen']}; search {e['search_s']:.0f} s)"
        rows.append(f"| {label}{extra} | {_fmt_ppl(e['ppl'])} | {e['bits_per_weight']:.2f} | "
                    f"{e['layer_weight_bytes'] / 1e6:.1f} MB | {e['total_bytes'] / 1e6:.1f} MB | "
                    f"{e['compress_s']:.0f} | {e['eval_s']:.0f} |")
    protocol = (f"Protocol: {p['model']}; evaluation {p['eval']}; calibration {p['calibration']}; "
                f"{p['formats']}; machine {p['machine']}.")
    return "\n".join(rows) + "\n\n" + protocol


def search_candidates() -> str:
    data = json.loads((RESULTS / "baselines.json").read_text())
    e = data["entries"].get("search@rtn3")
    if e is None:
        return "(not measured yet)"
    rows = ["| candidate | total bytes | predicted Δloss (Fisher) | held-out KL | held-out ppl |",
            "| --- | ---: | ---: | ---: | ---: |"]
    for c in e["candidates"]:
        m = c["measured"]
        pred = "" if c["predicted"] is None else f"{c['predicted']:.3f}"
        rows.append(f"| {c['label']} | {c['total_bytes'] / 1e6:.2f} MB | {pred} | "
                    f"{m['kl']:.4f} | {m['ppl']:.2f} |")
    t = e["timings_s"]
    return "\n".join(rows) + (
        f"\n\nHeld-out: 4 windows of 512 tokens from the end of wiki.valid.tokens (never the test "
        f"split). Timings: sensitivity {t['sensitivity_s']:.0f} s, solve {t['solve_s']:.1f} s, "
        f"measured check {t['measure_s']:.0f} s.")


def gptq_study() -> str:
    out = []
    base = json.loads((RESULTS / "baselines.json").read_text())["entries"]
    for path in sorted(RESULTS.glob("gptq_study_*bit.json")):
        data = json.loads(path.read_text())
        p = data["protocol"]
        bits = path.stem.split("_")[-1].removesuffix("bit")
        rows = ["| variant | calibration | perplexity | compress s |", "| --- | --- | ---: | ---: |"]
        if f"rtn{bits}" in base:
            rows.append(f"| RTN (baselines) | none | {_fmt_ppl(base[f'rtn{bits}']['ppl'])} | |")
        if f"gptq{bits}" in base:
            e = base[f"gptq{bits}"]
            rows.append(f"| GPTQ as in the baselines | sequential, 16 × 512 tokens of wiki, "
                        f"damp 0.01 | {_fmt_ppl(e['ppl'])} | {e['compress_s']:.0f} |")
        for key, e in data["entries"].items():
            g = e["gptq"]
            knobs = f"damp {g['damp']}" + (", act-order" if g["act_order"] else "")
            calib = f"{e['mode']}, {e['calib_windows']} × 512 tokens of {e['calib_text']}, {knobs}"
            rows.append(f"| {key} | {calib} | {_fmt_ppl(e['ppl'])} | {e['compress_s']:.0f} |")
        out.append(f"{p['format']}:\n\n" + "\n".join(rows) +
                   f"\n\nProtocol: {p['model']}; {p['eval']}; machine {p['machine']}.")
    return "\n\n".join(out) or "(not measured yet)"


def kernels() -> str:
    out = []
    for name in ("kernels.json", "kernels_threads1.json"):
        path = RESULTS / name
        if not path.is_file():
            continue
        data = json.loads(path.read_text())
        p, e = data["protocol"], data["entries"]
        bw = e.get("bandwidth", {})
        rows = [f"{p['threads']} thread(s); measured copy bandwidth {bw.get('copy_gb_s', 0):.1f} GB/s",
                "", "| decode | tokens/s | MB read/token | layer MB resident / plan | memory model MB (error) | share of bandwidth | kernels | load avg |",
                "| --- | ---: | ---: | ---: | ---: | ---: | --- | ---: |"]
        for key, r in e.items():
            if "tokens_per_s" not in r:
                continue
            kernels_used = ", ".join(f"{k} {v}" for k, v in r["kernels"].items())
            predicted = r.get("layer_bytes_predicted")
            model = "—" if not predicted else (
                f"{predicted / 1e6:.1f} ({100 * (predicted / r['layer_bytes_resident'] - 1):+.1f}%)")
            rows.append(f"| {key} | {r['tokens_per_s']:.1f} | {r['bytes_per_token'] / 1e6:.0f} | "
                        f"{r['layer_bytes_resident'] / 1e6:.1f} / {r['layer_bytes_plan'] / 1e6:.1f} | "
                        f"{model} | "
                        f"{100 * r.get('share_of_copy_bandwidth', 0):.0f}% | {kernels_used} | "
                        f"{r['load_average_1min']:.1f} |")
        out.append("\n".join(rows) + f"\n\nProtocol: {p['model']}, batch 1, {p['tokens']} decoded "
                   f"tokens after the prompt {p['prompt']!r}; machine {p['machine']}.")
    return "\n\n".join(out) or "(not measured yet)"


def proxy_fidelity() -> str:
    data = json.loads((RESULTS / "proxy_fidelity.json").read_text())
    p, e = data["protocol"], data["entries"]
    rows = ["| proxy | Spearman | Kendall | table build s |", "| --- | ---: | ---: | ---: |"]
    for key, r in e.items():
        if key == "plans":
            continue
        build = f"{r['table_build_s']:.0f}" if "table_build_s" in r else \
            f"(the {key.split(',')[0]} table; {r['folds']}-fold cross-validated)"
        rows.append(f"| {key} | {r['spearman']:.3f} | {r['kendall']:.3f} | {build} |")
    kls = [plan["kl"] for plan in e.get("plans", {}).values()]
    bpw = [plan["bits_per_weight"] for plan in e.get("plans", {}).values()]
    span = (f"{len(kls)} plans, {min(bpw):.2f} to {max(bpw):.2f} bits/weight, measured KL "
            f"{min(kls):.3f} to {max(kls):.3f} nats/token") if kls else ""
    return "\n".join(rows) + (f"\n\nProtocol: {p['model']}; space {p['space']}; {p['plans']} "
                               f"({span}); proxies calibrated on {p['proxy_calibration']}; "
                               f"measured {p['measured']}; machine {p['machine']}.")


def joint_vs_bits() -> str:
    out = []
    base = json.loads((RESULTS / "baselines.json").read_text())["entries"]
    for path in sorted(RESULTS.glob("joint_vs_bits_*.json")):
        data = json.loads(path.read_text())
        p, e = data["protocol"], data["entries"]
        rows = ["| budget (total bytes) | joint space | bits only | uniform RTN | uniform GPTQ |",
                "| --- | ---: | ---: | ---: | ---: |"]
        budgets = sorted({k.split("@")[1] for k in e}, key=float)
        for b in budgets:
            joint, bits = e.get(f"joint@{b}"), e.get(f"bits@{b}")
            whole = str(int(float(b))) if float(b) == int(float(b)) else None
            rtn = base.get(f"rtn{whole}") if whole else None
            gptq = base.get(f"gptq{whole}") if whole else None
            budget = (joint or bits)["budget_bytes"]
            cell = lambda r: "" if r is None else f"{_fmt_ppl(r['ppl'])}"  # noqa: E731
            rows.append(f"| uniform {b}-bit: {budget / 1e6:.2f} MB | {cell(joint)} | {cell(bits)} | "
                        f"{cell(rtn)} | {cell(gptq)} |")
        chosen = "; ".join(f"{k}: {v['chosen']}" for k, v in e.items())
        out.append("\n".join(rows) + f"\n\nChosen by the measured check: {chosen}.\n\nProtocol: "
                   f"{p['model']}; search {p['search']}; evaluation {p['eval']}; machine {p['machine']}.")
    return "\n\n".join(out) or "(not measured yet)"


def _token_counts(rows: list[dict]) -> str:
    counts = sorted({r["tokens"] for r in rows}, reverse=True)
    if len(counts) == 1:
        return f"{counts[0]} tokens"
    return f"{counts[0]} tokens ({', '.join(map(str, counts[1:]))} for the slow plans)"


def latency_model() -> str:
    import statistics

    data = json.loads((RESULTS / "latency_model.json").read_text())
    p, e = data["protocol"], data["entries"]
    prof = e.get("profile", {})
    cpu = [r for k, r in e.items() if k.startswith("cpu:")]
    rows = [f"(a) This CPU, after `autocompress profile` ({prof.get('seconds', 0):.0f} s; copy "
            f"bandwidth {prof.get('bandwidth_gbps', 0):.1f} GB/s, per-block work "
            f"{prof.get('block_us', 0):.0f} µs, per-token {prof.get('token_us', 0):.0f} µs):",
            "", "| plan | kernels | measured ms/token | predicted ms/token | error | from |",
            "| --- | --- | ---: | ---: | ---: | --- |"]
    for r in cpu:
        kernels_used = ", ".join(f"{k} {v}" for k, v in r["kernels"].items())
        sources = ", ".join(f"{k} {v}" for k, v in r["sources"].items())
        rows.append(f"| {r['plan']} | {kernels_used} | {r['measured_s'] * 1e3:.1f} | "
                    f"{r['predicted_s'] * 1e3:.1f} | {r['error']:+.1%} | {sources} |")
    if cpu:
        median = statistics.median(abs(r["error"]) for r in cpu)
        rows.append(f"\nMedian |predicted − measured| / measured over {len(cpu)} plans: "
                    f"**{median:.1%}**. Protocol: {p['model']}; {p['decode']} over "
                    f"{_token_counts(cpu)} after the prompt {p['prompt']!r}; {p['runtime']}; "
                    f"machine {p['machine']}.")
    rows += ["", "(b) Published decode speeds, predicted from the models' configs with the "
             "profiles' figures:", "",
             "| device | model | format | engine | published tok/s | predicted tok/s | error |",
             "| --- | --- | --- | --- | ---: | ---: | ---: |"]
    for k, r in e.items():
        if k.startswith("published:"):
            rows.append(f"| {r['device']} | {r['model']} | {r['format']} | {r['engine']} | "
                        f"{r['published_tps']:.1f} | {r['predicted_tps']:.1f} | "
                        f"{r['error']:+.1%} |")
    return "\n".join(rows)


def search() -> str:
    data = json.loads((RESULTS / "search.json").read_text())
    p, e = data["protocol"], data["entries"]
    base = json.loads((RESULTS / "baselines.json").read_text())["entries"]["base"]["ppl"]
    rows = ["| budget (total bytes) | searched | proxy optimum | llama.cpp-style recipe | "
            "uniform RTN | uniform GPTQ | chosen | search s (table / L1 / L2 / L3) |",
            "| --- | ---: | ---: | ---: | ---: | ---: | --- | --- |"]
    notes = []

    def order(key: str) -> tuple:  # joint space by budget, then device runs, then other spaces
        space, _, rest = key.rpartition(":")
        bits, _, device = rest.partition("@")
        return (bool(space), bool(device), float(bits))

    for key in sorted(e, key=order):
        r = e[key]
        t = r["timings_s"]
        timing = (f"{r['search_s']:.0f} ({t.get('sensitivity_s', 0):.0f} / "
                  f"{t.get('level1_s', 0):.0f} / {t.get('level2_s', 0):.0f} / "
                  f"{t.get('level3_s', 0):.0f})")
        recipe = r.get("recipe")
        rtn, gptq = r.get("uniform_rtn"), r.get("uniform_gptq")
        where = f" on {r['device']}, ≥ {r['min_tps']:g} tok/s" if r.get("device") else ""
        space, _, bits = key.split("@")[0].rpartition(":")
        where += f", **{space}-only space**" if space else ""
        rows.append(
            f"| uniform {bits}-bit: {r['budget_bytes'] / 1e6:.2f} MB{where} | "
            f"**{_fmt_ppl(r['searched_ppl'])}** | {_fmt_ppl(r['proxy_optimum_ppl'])} | "
            + (f"{_fmt_ppl(recipe['ppl'])} "
               f"({recipe['label'].split(' (')[0].removeprefix('llama.cpp-style ')}) | "
               if recipe else "| ")
            + (f"{_fmt_ppl(rtn['ppl'])} ({rtn['bits']}-bit) | " if rtn else "| ")
            + (f"{_fmt_ppl(gptq['ppl'])} ({gptq['bits']}-bit) | " if gptq else "| ")
            + f"{r['chosen']} | {timing} |")
        if key == "3" and rtn:
            closed = (rtn["ppl"] - r["searched_ppl"]) / (rtn["ppl"] - base)
            notes.append(f"At the bytes of uniform 3-bit the searched plan closes **{closed:.0%}** "
                         f"of the gap between uniform RTN 3-bit ({rtn['ppl']:.2f}) and the "
                         f"uncompressed model ({base:.2f}).")
            study = RESULTS / "gptq_study_3bit.json"
            if study.is_file():
                act = json.loads(study.read_text())["entries"].get("sequential-16-actorder")
                if act:
                    notes.append(f"Uniform GPTQ above is the baselines' (sequential, without "
                                 f"act-order); with act-order, now the default, uniform GPTQ "
                                 f"3-bit measures {act['ppl']:.2f} (gptq_study.py).")
        if r.get("decode"):
            notes.append(f"{key}: predicted {r['decode']['tokens_per_s']:.0f} tokens/s on "
                         f"{r['device']} (limit {r['min_tps']:g}).")
    return "\n".join(rows) + ("\n\n" + " ".join(notes) if notes else "") + (
        f"\n\nProtocol: {p['model']}; {p['search']}; evaluation {p['eval']}; "
        f"machine {p['machine']}.")


def table_fast_path() -> str:
    path = RESULTS / "table_fast_path.json"
    if not path.is_file():
        return "(not measured yet)"
    data = json.loads(path.read_text())
    p, r = data["protocol"], data["entries"]["fisher"]
    return (f"| path | seconds |\n| --- | ---: |\n"
            f"| each option's ΔW (compress_weight) | {r['delta_path_s']:.1f} |\n"
            f"| one pass per group size (quant_error_many) | {r['fast_path_s']:.1f} |\n\n"
            f"{r['layers']} layers × their plain RTN options ({r['options_scored']} in all), "
            f"{r['speedup']:.1f}× faster, largest relative difference between the costs "
            f"{r['max_relative_difference']:.1e}. Protocol: {p['model']}; {p['space']}; proxy "
            f"{p['proxy']}; machine {p['machine']}.")


SECTIONS = {"table-fast-path": table_fast_path, "search": search, "latency-model": latency_model, "kernels": kernels, "proxy-fidelity": proxy_fidelity, "joint-vs-bits": joint_vs_bits, "baselines": baselines, "search-candidates": search_candidates, "gptq-study": gptq_study}


def main() -> None:
    readme = REPO / "README.md"
    text = readme.read_text()
    for name, render in SECTIONS.items():
        try:
            body = render()
        except FileNotFoundError:
            continue
        pattern = re.compile(rf"(<!-- results:{name} -->\n).*?(\n<!-- /results:{name} -->)", re.S)
        text = pattern.sub(lambda m: m.group(1) + body + m.group(2), text)
    readme.write_text(text)


if __name__ == "__main__":
    main()
