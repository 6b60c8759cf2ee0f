"""Render experiments/results/*.json as the README's tables (between marker comments), so the
README never shows a number that a benchmark did not write.

    .venv/bin/python experiments/readme_tables.py           # rewrite README.md (atomically)
    .venv/bin/python experiments/readme_tables.py --check   # exit 1 and show a diff per section
                                                            # that differs; writes nothing
    ... [--readme PATH] [--results DIR]                     # other files (tests)

Each section is rendered from files validated against experiments/results_schema.py first; a
file the renderer cannot use stops it with one line naming the file and the field (exit 2).
A section whose file is missing renders as "(not measured yet ...)".
"""

from __future__ import annotations

import argparse
import difflib
import re
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, RESULTS  # noqa: E402
from results_schema import SEARCH_KEY, STUDY_RUNS, Results, ResultsError, Rhos, validate, validate_study  # noqa: E402

LABELS = {
    "base": "uncompressed (float; weights already Q4_1-rounded)",
    "rtn8": "RTN 8-bit", "rtn4": "RTN 4-bit", "rtn3": "RTN 3-bit", "rtn2": "RTN 2-bit",
    "gptq4": "GPTQ 4-bit", "gptq3": "GPTQ 3-bit", "gptq2": "GPTQ 2-bit",
    "wanda50": "Wanda 50% unstructured (fp16 values)", "wanda2:4": "Wanda 2:4 (fp16 values)",
    "svd0.5": "SVD rank ratio 0.5, whitened (fp16 factors)",
    "search@rtn3": "`search` at the total bytes of RTN 3-bit",
}

# the search engine's timings_s keys, in the order it runs them (older versions wrote solve_s)
TIMINGS = {"sensitivity_s": "sensitivity", "solve_s": "solve", "level1_s": "level 1 (proxy)",
           "level2_s": "level 2 (Optuna)", "level3_s": "level 3 (Ray Tune)",
           "measure_s": "measured check"}

# proxy_fidelity's calibrated families (level 2's knobs)
FAMILIES = {"w_2bit": "2-bit options", "w_3bit": "3-bit", "w_sparse": "sparse", "w_2to4": "2:4",
            "w_lowrank": "low rank", "w_coarse": "coarse groups", "w_gptq": "GPTQ"}

NOT_MEASURED = "(not measured yet)"


class Store:
    """The results directory: each file validated once, on first use."""

    def __init__(self, root: Path):
        self.root = root
        self._cache: dict[str, Results] = {}

    def get(self, name: str) -> Results:
        if name not in self._cache:
            self._cache[name] = validate(self.root / name)
        return self._cache[name]

    def has(self, name: str) -> bool:
        return (self.root / name).is_file()

    def glob(self, pattern: str) -> list[Results]:
        return [self.get(p.name) for p in sorted(self.root.glob(pattern))]


def _fmt_ppl(ppl: float) -> str:
    return f"{ppl:.3g}" if ppl >= 1e4 else f"{ppl:.2f}"


def _secs(s: float) -> str:
    return f"{s:.1f}" if s < 10 else f"{s:.0f}"


def _range(values, fmt: str = ".1f", sep: str = "–") -> str:
    lo, hi = min(values), max(values)
    return f"{lo:{fmt}}" if f"{lo:{fmt}}" == f"{hi:{fmt}}" else f"{lo:{fmt}}{sep}{hi:{fmt}}"


def _timings(t: dict[str, float]) -> str:
    """Every timing the engine wrote, in its order; none is made up for the ones it did not."""
    known = [f"{TIMINGS[k]} {_secs(t[k])} s" for k in TIMINGS if k in t]
    other = [f"{k.removesuffix('_s')} {_secs(v)} s" for k, v in t.items() if k not in TIMINGS]
    return ", ".join(known + other) or "not recorded"


def baselines(store: Store) -> str:
    data = store.get("baselines.json")
    p = data.protocol
    rows = ["| plan | perplexity | bits/weight (block linears) | block-linear bytes | "
            "total footprint (ctx 2048) | compress s | eval s |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for key, label in LABELS.items():
        e = data.entries.get(key)
        if e is None:
            continue
        extra = ""
        if key == "search@rtn3":
            extra = f" (chosen: {e.chosen}; search {e.search_s:.0f} s)"
        rows.append(f"| {label}{extra} | {_fmt_ppl(e.ppl)} | {e.bits_per_weight:.2f} | "
                    f"{e.layer_weight_bytes / 1e6:.1f} MB | {e.total_bytes / 1e6:.1f} MB | "
                    f"{e.compress_s:.0f} | {e.eval_s:.0f} |")
    protocol = (f"Protocol: {p.model}; evaluation {p.eval}; calibration {p.calibration}; "
                f"{p.formats}; machine {p.machine}.")
    return "\n".join(rows) + "\n\n" + protocol


def search_candidates(store: Store) -> str:
    e = store.get("baselines.json").entries.get("search@rtn3")
    if e is None:
        return NOT_MEASURED
    rows = ["| candidate | total bytes | predicted Δloss (Fisher) | held-out KL | held-out ppl |",
            "| --- | ---: | ---: | ---: | ---: |"]
    for c in e.candidates:
        pred = "" if c.predicted is None else f"{c.predicted:.3f}"
        rows.append(f"| {c.label} | {c.total_bytes / 1e6:.2f} MB | {pred} | "
                    f"{c.measured.kl:.4f} | {c.measured.ppl:.2f} |")
    measured = [c.measured for c in e.candidates]
    if measured and all(m.windows is not None for m in measured):
        over = f"{_range([m.windows for m in measured], 'd')} held-out windows"
    elif measured:
        over = f"{_range([m.tokens for m in measured], 'd')} next-token predictions in held-out " \
               f"windows"
    else:
        over = "held-out windows"
    return "\n".join(rows) + (
        f"\n\nHeld-out: {over} from the end of wiki.valid.tokens (never the test split). "
        f"Timings: {_timings(e.timings_s)}.")


def gptq_study(store: Store) -> str:
    out = []
    baseline = store.get("baselines.json")
    base = baseline.entries
    for data in store.glob("gptq_study_*bit.json"):
        p = data.protocol
        bits = data.path.stem.split("_")[-1].removesuffix("bit")
        rtn, gptq = base.get(f"rtn{bits}"), base.get(f"gptq{bits}")
        rows = ["| variant | calibration | perplexity | compress s |",
                "| --- | --- | ---: | ---: |"]
        if rtn:
            rows.append(f"| RTN (baselines) | none | {_fmt_ppl(rtn.ppl)} | |")
        if gptq:
            rows.append(f"| GPTQ as in the baselines | the baselines' protocol: "
                        f"{baseline.protocol.calibration} | {_fmt_ppl(gptq.ppl)} | "
                        f"{gptq.compress_s:.0f} |")
        for key, e in data.entries.items():
            knobs = f"damp {e.gptq.damp}" + (", act-order" if e.gptq.act_order else "")
            # gptq_study.py cuts calibration windows as long as the evaluation's
            calib = f"{e.mode}, {e.calib_windows} windows of {e.calib_text}, {knobs}"
            rows.append(f"| {key} | {calib} | {_fmt_ppl(e.ppl)} | {e.compress_s:.0f} |")
        notes = []
        if rtn and rtn.ppl > base["base"].ppl:
            def excess(ppl: float, rtn=rtn) -> float:
                return (ppl - base["base"].ppl) / (rtn.ppl - base["base"].ppl)

            shares = [f"{key} {excess(e.ppl):.0%}" for key, e in data.entries.items()]
            if gptq:
                shares.insert(0, f"GPTQ as in the baselines {excess(gptq.ppl):.0%}")
            notes.append(f"Excess perplexity over the uncompressed model ({base['base'].ppl:.2f})"
                         f" as a share of RTN {bits}-bit's: " + ", ".join(shares) + ".")
        out.append(f"{p.format}:\n\n" + "\n".join(rows) + "\n\n" +
                   "".join(n + " " for n in notes) +
                   f"Protocol: {p.model}; {p.eval}; calibration windows of the same length; "
                   f"machine {p.machine}.")
    return "\n\n".join(out) or NOT_MEASURED


QUALITY_OPERATORS = {"rtn": "RTN", "rtn+clip": "RTN, clipped grid", "rtn+awq": "RTN, AWQ scaling",
                     "rtn+awq+clip": "RTN, AWQ scaling, clipped grid", "gptq": "GPTQ",
                     "gptq+clip": "GPTQ, clipped grid", "gptq+awq": "GPTQ, AWQ scaling",
                     "gptq+awq+clip": "GPTQ, AWQ scaling, clipped grid",
                     "signround": "learned rounding (signround)",
                     "signround+awq": "learned rounding, AWQ scaling"}


def quality(store: Store) -> str:
    data = store.get("quality.json")
    p, entries = data.protocol, data.entries
    formats = sorted({k.split("-")[0] for k in entries if k != "uncompressed"},  # 3g64, 3g128..
                     key=lambda f: tuple(int(n) for n in f.split("g")))
    rows = ["| operator | " + " | ".join(f"{f.replace('g', '-bit g', 1)}" for f in formats) + " |",
            "| --- |" + " ---: |" * len(formats)]
    for op, label in QUALITY_OPERATORS.items():
        for kd in (False, True):
            keys = [f"{f}-{op}{'+kd' if kd else ''}" for f in formats]
            if not any(k in entries for k in keys):
                continue
            cells = []
            for key in keys:
                e = entries.get(key)
                if e is None:
                    cells.append("")
                elif e.kd is None:
                    cells.append(f"{_fmt_ppl(e.ppl)} ({_secs(e.build_s)} s)")
                else:
                    cells.append(f"{_fmt_ppl(e.ppl)} ({_secs(e.build_s)} s; val KL "
                                 f"{e.kd.kl_before:.3f} → {e.kd.kl_after:.3f}, "
                                 f"{e.kd.steps} steps)")
            rows.append(f"| {label}{' + KD recovery' if kd else ''} | " + " | ".join(cells) + " |")
    learned = {(e.signround.steps, e.signround.lr, e.signround.eval_every)
               for e in entries.values() if getattr(e, "signround", None) is not None}
    signround = "".join(f"; signround {steps} steps per block, one calibration window each, "
                        f"signed-gradient lr {lr:g} decayed linearly, the best state over all "
                        f"windows checked every {every} steps kept" for steps, lr, every in learned)
    return ("\n".join(rows) + f"\n\nTest perplexity (build time; for KD rows build + recovery, and "
            f"the held-out KL on the validation windows before and after). Uncompressed: "
            f"{_fmt_ppl(entries['uncompressed'].ppl)}. Protocol: {p.model}; {p.eval}; {p.format}; "
            f"calibration {p.calibration}{signround}; recovery {p.recovery}; machine {p.machine}.")


def recovery(store: Store, name: str = "recovery.json", options: str = "") -> str:
    data = store.get(name)
    p, entries = data.protocol, data.entries
    before = entries["before"]
    rows = ["| recovery | trained on | learning rate | steps (best) | held-out KL | change | "
            "test ppl | time |", "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |",
            f"| none (the plan after learned rounding) | | | | {before.holdout_kl:.4f} | | "
            f"{_fmt_ppl(before.test_ppl)} | |"]
    for key, e in entries.items():
        if key == "before":
            continue
        schedule = e.settings.get("schedule", "constant")
        lr = f"{_rate_path(e.kd.lr, e.kd.lr_abandoned)}, {schedule}"
        if e.kd.lr_abandoned:  # the rate it started at made the first validation worse
            lr += " (backed off)"
        rows.append(f"| {key} | {e.kd.train_windows} windows | {lr} | {e.kd.steps} ({e.kd.best_step}) "
                    f"| {e.holdout_kl_after:.4f} | {100 * e.holdout_kl_change:+.1f}% | "
                    f"{_fmt_ppl(e.test_ppl)} | {_secs(e.recover_s)} s |")
    return ("\n".join(rows) + f"\n\nThe search reported held-out KL {before.search_reported_kl:.4f} "
            f"for this plan before its recovery; measured here {before.holdout_kl:.4f}. Protocol: "
            f"{p.model}; plan {p.plan}; held-out: {p.holdout}; test: {p.eval}; {p.recovery}; "
            f"machine {p.machine}. Reproduce: `.venv/bin/python experiments/recovery.py"
            f"{options}`.")


def _kernels_notes(e: dict) -> str:
    decode = {k: r for k, r in e.items() if k not in ("bandwidth", "kernels")}
    packed = {k: r for k, r in decode.items() if r.resident_over_plan is not None}
    ort = {k: r for k, r in packed.items()
           if all(name.startswith("ort") for name in r.kernels) and r.ort_threads == 1}
    held = {k: r for k, r in ort.items() if any("-" in name for name in r.kernels)}
    plain = {k: r for k, r in ort.items() if k not in held}
    torch = {k: r for k, r in packed.items() if set(r.kernels) == {"torch"}}
    notes = []
    if decode:
        loads = [r.load_average_1min for r in decode.values()]
        notes.append(f"Load average during the runs: {_range(loads)}.")
    if ort:
        ratios = f"{_range([r.resident_over_plan for r in plain.values()], '.2f')}× " \
                 f"the plan's accounting" if plain else ""
        if held:
            ratios += ("; " if ratios else "") + (
                f"{_range([r.resident_over_plan for r in held.values()], '.2f')}× for plans with "
                f"layers held widened or densified")
        notes.append(f"Packed plans on ONNX Runtime (one-thread pool): "
                     f"{_range([r.tokens_per_s for r in ort.values()])} tokens/s; resident layer "
                     f"bytes {ratios}.")
    for k, r in torch.items():
        faster = f", {ort['int4'].tokens_per_s / r.tokens_per_s:.0f}× slower than int4 on ONNX " \
                 f"Runtime" if "int4" in ort else ""
        notes.append(f"{k} (torch unpack path): {r.tokens_per_s:.1f} tokens/s at "
                     f"{r.resident_over_plan:.3f}× the plan's bytes{faster}.")
    for k, r in packed.items():
        if r.ort_threads is not None and r.ort_threads > 1:
            notes.append(f"{k}: ONNX Runtime on a {r.ort_threads}-thread pool beside torch's, "
                         f"{r.tokens_per_s:.1f} tokens/s.")
    model = [abs(r.layer_bytes_predicted / r.layer_bytes_resident - 1) for r in packed.values()
             if r.layer_bytes_predicted]
    if model:
        notes.append(f"Memory model: largest error {max(model):.2%} over {len(model)} plans.")
    return " ".join(notes)


def kernels(store: Store) -> str:
    out = []
    for name in ("kernels.json", "kernels_threads1.json"):
        if not store.has(name):
            continue
        data = store.get(name)
        p, e = data.protocol, data.entries
        bw = e.get("bandwidth")
        bandwidth = f"measured copy bandwidth {bw.copy_gb_s:.1f} GB/s" if bw else \
            "copy bandwidth not measured"
        rows = [f"{p.threads} thread(s); {bandwidth}",
                "", "| decode | tokens/s | MB read/token | layer MB resident / plan | "
                    "memory model MB (error) | share of bandwidth | kernels | load avg |",
                "| --- | ---: | ---: | ---: | ---: | ---: | --- | ---: |"]
        for key, r in e.items():
            if key in ("bandwidth", "kernels"):
                continue
            kernels_used = ", ".join(f"{k} {v}" for k, v in r.kernels.items())
            predicted = r.layer_bytes_predicted
            model = "—" if not predicted else (
                f"{predicted / 1e6:.1f} ({100 * (predicted / r.layer_bytes_resident - 1):+.1f}%)")
            share = "—" if r.share_of_copy_bandwidth is None else \
                f"{100 * r.share_of_copy_bandwidth:.0f}%"
            rows.append(f"| {key} | {r.tokens_per_s:.1f} | {r.bytes_per_token / 1e6:.0f} | "
                        f"{r.layer_bytes_resident / 1e6:.1f} / {r.layer_bytes_plan / 1e6:.1f} | "
                        f"{model} | {share} | {kernels_used} | {r.load_average_1min:.1f} |")
        notes = _kernels_notes(e) if name == "kernels.json" else ""
        out.append("\n".join(rows) + "\n\n" + (notes + "\n\n" if notes else "") +
                   f"Protocol: {p.model}, batch 1, {p.tokens} decoded tokens after the prompt "
                   f"{p.prompt!r}; machine {p.machine}.")
    return "\n\n".join(out) or NOT_MEASURED


def proxy_fidelity(store: Store) -> str:
    data = store.get("proxy_fidelity.json")
    p, e = data.protocol, data.entries
    rows = ["| proxy | Spearman | Kendall | table build s |", "| --- | ---: | ---: | ---: |"]
    notes = []
    for key, r in e.items():
        if key == "plans":
            continue
        build = f"{r.table_build_s:.0f}" if r.table_build_s is not None else \
            f"(the {key.split(',')[0]} table; {r.folds}-fold cross-validated)"
        rows.append(f"| {key} | {r.spearman:.3f} | {r.kendall:.3f} | {build} |")
        if r.folds:
            fit = (f"{key}: fitted by least squares on {r.folds - 1}/{r.folds} of the plans and "
                   f"scored on the other 1/{r.folds}, {r.folds} times")
            coef = dict(zip(r.families or [], r.coefficients_all_plans or []))
            common = coef.pop("all", None)
            mult = [f"{(common + b) / common:.2g} for {FAMILIES.get(f, f)}"
                    for f, b in coef.items() if b != 0.0] if common else []
            if mult:  # a family with no option in the space gets exactly 0: left out
                fit += ("; fitted on all plans, the multipliers on the proxy's cost are "
                        + ", ".join(mult))
            notes.append(fit + ".")
    plans = e["plans"].root if "plans" in e else {}
    kls = [plan.kl for plan in plans.values()]
    bpw = [plan.bits_per_weight for plan in plans.values()]
    span = (f"{len(kls)} plans, {min(bpw):.2f} to {max(bpw):.2f} bits/weight, measured KL "
            f"{min(kls):.3f} to {max(kls):.3f} nats/token") if kls else ""
    return "\n".join(rows) + "\n\n" + "".join(n + " " for n in notes) + (
        f"Protocol: {p.model}; space {p.space}; {p.plans} ({span}); proxies calibrated on "
        f"{p.proxy_calibration}; measured {p.measured}; machine {p.machine}.")


def joint_vs_bits(store: Store) -> str:
    out = []
    base = store.get("baselines.json").entries
    for data in store.glob("joint_vs_bits_*.json"):
        p, e = data.protocol, data.entries
        rows = ["| budget (total bytes) | joint space | bits only | uniform RTN | uniform GPTQ |",
                "| --- | ---: | ---: | ---: | ---: |"]
        notes = []
        budgets = sorted({k.split("@")[1] for k in e}, key=float)
        for b in budgets:
            joint, bits = e.get(f"joint@{b}"), e.get(f"bits@{b}")
            whole = str(int(float(b))) if float(b) == int(float(b)) else None
            rtn = base.get(f"rtn{whole}") if whole else None
            gptq = base.get(f"gptq{whole}") if whole else None
            budget = (joint or bits).budget_bytes
            cell = lambda r: "" if r is None else f"{_fmt_ppl(r.ppl)}"  # noqa: E731
            rows.append(f"| uniform {b}-bit: {budget / 1e6:.2f} MB | {cell(joint)} | "
                        f"{cell(bits)} | {cell(rtn)} | {cell(gptq)} |")
            if joint and rtn and rtn.ppl > base["base"].ppl:
                closed = (rtn.ppl - joint.ppl) / (rtn.ppl - base["base"].ppl)
                notes.append(
                    f"At uniform {b}-bit's bytes the joint plan closes {closed:.0%} of the gap "
                    f"between uniform RTN {b}-bit and the uncompressed model "
                    f"({base['base'].ppl:.2f})." if closed >= 0 else
                    f"At uniform {b}-bit's bytes the joint plan is worse than uniform RTN "
                    f"{b}-bit.")
        chosen = "; ".join(f"{k}: {v.chosen}" for k, v in e.items())
        out.append("\n".join(rows) + "\n\n" + "".join(n + " " for n in notes) +
                   f"Chosen by the measured check: {chosen}.\n\nProtocol: {p.model}; search "
                   f"{p.search}; evaluation {p.eval}; machine {p.machine}.")
    return "\n\n".join(out) or NOT_MEASURED


def _token_counts(rows: list) -> str:
    counts = sorted({r.tokens for r in rows}, reverse=True)
    if len(counts) == 1:
        return f"{counts[0]} tokens"
    return f"{counts[0]} tokens ({', '.join(map(str, counts[1:]))} for the slow plans)"


def latency_model(store: Store) -> str:
    data = store.get("latency_model.json")
    p, e = data.protocol, data.entries
    prof = e.get("profile")
    cpu = [r for k, r in e.items() if k.startswith("cpu:")]
    profile = (f"{prof.seconds:.0f} s; copy bandwidth {prof.bandwidth_gbps:.1f} GB/s, per-block "
               f"work {prof.block_us:.0f} µs, per-token {prof.token_us:.0f} µs") if prof else \
        "the profile's figures not recorded"
    rows = [f"(a) This CPU, after `autocompress profile` ({profile}):",
            "", "| plan | kernels | measured ms/token | predicted ms/token | error | from |",
            "| --- | --- | ---: | ---: | ---: | --- |"]
    for r in cpu:
        kernels_used = ", ".join(f"{k} {v}" for k, v in r.kernels.items())
        sources = ", ".join(f"{k} {v}" for k, v in r.sources.items())
        rows.append(f"| {r.plan} | {kernels_used} | {r.measured_s * 1e3:.1f} | "
                    f"{r.predicted_s * 1e3:.1f} | {r.error:+.1%} | {sources} |")
    if cpu:
        median = statistics.median(abs(r.error) for r in cpu)
        rows.append(f"\nMedian |predicted − measured| / measured over {len(cpu)} plans: "
                    f"**{median:.1%}**. Protocol: {p.model}; {p.decode} over "
                    f"{_token_counts(cpu)} after the prompt {p.prompt!r}; {p.runtime}; "
                    f"machine {p.machine}.")
    rows += ["", "(b) Published decode speeds, predicted from the models' configs with the "
             "profiles' figures:", "",
             "| device | model | format | engine | published tok/s | predicted tok/s | error |",
             "| --- | --- | --- | --- | ---: | ---: | ---: |"]
    published = [r for k, r in e.items() if k.startswith("published:")]
    for r in published:
        rows.append(f"| {r.device} | {r.model} | {r.format} | {r.engine} | "
                    f"{r.published_tps:.1f} | {r.predicted_tps:.1f} | {r.error:+.1%} |")
    if published:
        rows.append(f"\nLargest |error| over the {len(published)} published figures: "
                    f"**{max(abs(r.error) for r in published):.1%}**.")
    return "\n".join(rows)


def _search_parts(key: str) -> tuple[str, str, str]:
    m = re.fullmatch(SEARCH_KEY, key)  # the schema checked every key
    return m["space"] or "", m["bits"], m["device"] or ""


def _search_order(key: str) -> tuple:  # joint space by budget, then device runs, other spaces
    space, bits, device = _search_parts(key)
    return (bool(space), bool(device), float(bits))


def _stage_names(r) -> str:
    """The final stages a search row ran, in words ('' for none)."""
    if not r.stages:
        return ""
    names = []
    if r.stages.rounding:
        names.append(f"learned rounding ({r.stages.rounding['method']})")
    tried = r.stages.recovery or r.stages.recovery_tried
    if tried:
        said = [f"lr {_rate_path(tried['lr'], tried.get('lr_abandoned'))}"] \
            if "lr" in tried else []
        if not r.stages.recovery:
            said.append("tried, not kept")
        names.append(f"{tried['method'].upper()} recovery"
                     + (f" ({', '.join(said)})" if said else ""))
    return " + ".join(names)


def _rate_path(lr: float, abandoned: list[float] | None) -> str:
    """The rates a recovery went through: those it backed off from, then the one it kept."""
    return " → ".join(f"{r:g}" for r in [*(abandoned or []), lr])


def _rate(record: dict) -> str:
    """The recovery's learning rate, and the rates it backed off from."""
    if "lr" not in record:  # rows from before the rate was recorded
        return ""
    text = f", at lr {record['lr']:g}"
    abandoned = record.get("lr_abandoned") or []
    if abandoned:
        text += (f" (backed off from {', '.join(f'{r:g}' for r in abandoned)}: the first "
                 "validation was worse)")
    return text


def _stages_note(key: str, stages) -> str:
    """Held-out KL of the chosen plan through each final stage (the plan's own records)."""
    h = stages.holdout
    first = h.get("before_rounding") or h.get("before_recovery") or h["reported"]
    steps = [f"searched {first['kl']:.4f}"]
    rounding, recovery = stages.rounding, stages.recovery
    if rounding:
        steps.append(f"learned rounding of {rounding['layers']} layers "
                     f"{rounding['measured']['kl']:.4f}"
                     + ("" if rounding["kept"] else " (not lower: not kept)"))
    if recovery:
        steps.append(f"{recovery['method'].upper()} recovery {h['reported']['kl']:.4f}")
    text = (f"{key}: held-out KL of the chosen plan ({h['windows']} windows) through its final "
            f"stages: {' → '.join(steps)} ({h['reported']['kl'] / first['kl'] - 1:+.1%} in all")
    if recovery and h.get("before_recovery"):
        text += f"; recovery alone {h['reported']['kl'] / h['before_recovery']['kl'] - 1:+.1%}"
        text += (f"; trained on {recovery['train_windows']} calibration windows, on its own "
                 f"{recovery['val_windows']} validation windows "
                 f"{recovery['kl_before']:.4f} → {recovery['kl_after']:.4f}, best step "
                 f"{recovery['best_step']} of {recovery['steps']}{_rate(recovery)}")
    tried = stages.recovery_tried
    if not recovery and tried:  # refused: it did not lower the held-out KL
        text += (f"; {tried['method'].upper()} recovery tried and not kept: held-out KL "
                 f"{tried['measured']['kl']:.4f}, best step {tried['best_step']} of "
                 f"{tried['steps']}{_rate(tried)}")
    return text + ")."


def search(store: Store, name: str = "search.json") -> str:
    data = store.get(name)
    p, e = data.protocol, data.entries
    base = store.get("baselines.json").entries["base"].ppl
    act_order = any(r.uniform_gptq_act_order for r in e.values())
    rows = ["| budget (total bytes) | searched | proxy optimum | llama.cpp-style recipe | "
            "uniform RTN | uniform GPTQ | " + ("uniform GPTQ act-order, as searched | "
                                               if act_order else "")
            + "chosen | search s (table / L1 / L2 / L3) |",
            "| --- | ---: | ---: | ---: | ---: | ---: | " + ("---: | " if act_order else "")
            + "--- | --- |"]
    notes = []
    levels = ("sensitivity_s", "level1_s", "level2_s", "level3_s")
    for key in sorted(e, key=_search_order):
        r = e[key]
        t = r.timings_s
        timing = f"{r.search_s:.0f} (" + " / ".join(
            f"{t[k]:.0f}" if k in t else "—" for k in levels) + ")"
        other = [f"{TIMINGS.get(k, k)} {t[k]:.0f}" for k in t if k not in levels]
        timing += f"; {', '.join(other)}" if other else ""
        recipe, rtn, gptq = r.recipe, r.uniform_rtn, r.uniform_gptq
        space, bits, _ = _search_parts(key)
        where = f" on {r.device}, ≥ {r.min_tps:g} tok/s" if r.device else ""
        stages = _stage_names(r)
        where += f", joint space **+ {stages}**" if stages else \
            f", **{space}-only space**" if space else ""
        if stages:
            notes.append(_stages_note(key, r.stages))
        act = r.uniform_gptq_act_order
        rows.append(
            f"| uniform {bits}-bit: {r.budget_bytes / 1e6:.2f} MB{where} | "
            f"**{_fmt_ppl(r.searched_ppl)}** | {_fmt_ppl(r.proxy_optimum_ppl)} | "
            + (f"{_fmt_ppl(recipe.ppl)} "
               f"({recipe.label.split(' (')[0].removeprefix('llama.cpp-style ')}) | "
               if recipe else "| ")
            + (f"{_fmt_ppl(rtn.ppl)} ({rtn.bits}-bit) | " if rtn else "| ")
            + (f"{_fmt_ppl(gptq.ppl)} ({gptq.bits}-bit) | " if gptq else "| ")
            + ((f"{_fmt_ppl(act.ppl)} ({act.bits}-bit) | " if act else "| ") if act_order
               else "")
            + f"{r.chosen} | {timing} |")
        if key == "3" and rtn:
            closed = (rtn.ppl - r.searched_ppl) / (rtn.ppl - base)
            notes.append(f"At the bytes of uniform 3-bit the searched plan closes **{closed:.0%}** "
                         f"of the gap between uniform RTN 3-bit ({rtn.ppl:.2f}) and the "
                         f"uncompressed model ({base:.2f}).")
            if store.has("gptq_study_3bit.json"):
                study = store.get("gptq_study_3bit.json").entries.get("sequential-16-actorder")
                if study:
                    notes.append(f"Uniform GPTQ is the baselines' (sequential, without "
                                 f"act-order); with act-order and 16 calibration windows, "
                                 f"uniform GPTQ 3-bit measures {study.ppl:.2f} "
                                 f"(gptq_study.py).")
        if r.decode:
            notes.append(f"{key}: predicted {r.decode.tokens_per_s:.0f} tokens/s on "
                         f"{r.device} (limit {r.min_tps:g}).")
    beats = [k for k in e if e[k].searched_ppl < e[k].proxy_optimum_ppl]
    notes.append(f"The searched plan beats its proxy optimum in {len(beats)} of {len(e)} runs.")
    whole = [r.search_s for r in e.values() if not r.stages]  # stage runs were resumed
    if whole:
        notes.append(f"Whole searches took {_range([s / 60 for s in whole])} minutes here"
                     + (" (rows with final stages left out: their search s is the last "
                        "attempt's)" if len(whole) < len(e) else "") + ".")
    again = [(k, r.reproduced) for k, r in sorted(e.items(), key=lambda kv: _search_order(kv[0]))
             if r.reproduced]
    if again:
        notes.append("`autocompress eval plan.json --holdout` against the KL the search "
                     "reported for its plan (level-3 windows): " + "; ".join(
                         f"{k}: {x.reported_kl:.4f} → {x.eval_kl:.4f} ({x.relative_difference:+.2%}"
                         f", {x.windows} windows)" for k, x in again) + ".")
    if name == "search.json" and store.has("search_v1.json"):
        old = store.get("search_v1.json").entries
        moved = [f"{k}: {old[k].searched_ppl:.2f} → {e[k].searched_ppl:.2f}"
                 for k in sorted(e, key=_search_order) if k in old]
        if moved:
            notes.append("Searched perplexity against the table below (level 3 calibrated in "
                         "parallel, plans then applied in parallel too): " + "; ".join(moved)
                         + ".")
    return "\n".join(rows) + "\n\n" + " ".join(notes) + (
        f"\n\nProtocol: {p.model}; {p.search}; evaluation {p.eval}; machine {p.machine}.")


def search_v1(store: Store) -> str:
    return search(store, "search_v1.json")


def table_fast_path(store: Store) -> str:
    data = store.get("table_fast_path.json")
    p, r = data.protocol, data.entries["fisher"]
    return (f"| path | seconds |\n| --- | ---: |\n"
            f"| each option's ΔW (compress_weight) | {r.delta_path_s:.1f} |\n"
            f"| one pass per group size (quant_error_many) | {r.fast_path_s:.1f} |\n\n"
            f"{r.layers} layers × their plain RTN options ({r.options_scored} in all), "
            f"{r.speedup:.1f}× faster, largest relative difference between the costs "
            f"{r.max_relative_difference:.1e}. Protocol: {p.model}; {p.space}; proxy "
            f"{p.proxy}; machine {p.machine}.")


def peak_memory(store: Store) -> str:
    data = store.get("peak_memory.json")
    rows = ["| run | peak memory (PSS, summed) | RSS summed | largest process | processes | "
            "wall | measured |", "| --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    for key, e in data.entries.items():
        rows.append(f"| {key} | {e.peak_pss_bytes / 2**30:.2f} GiB | "
                    f"{e.peak_rss_sum_bytes / 2**30:.2f} GiB | "
                    f"{e.largest_process_rss_bytes / 2**30:.2f} GiB | {e.processes} | "
                    f"{e.wall_s / 60:.1f} min | {e.measured_at} |")
    commands = "; ".join(f"{key}: `{e.command}`" for key, e in data.entries.items())
    return "\n".join(rows) + (f"\n\nCommands: {commands}. Sampler: {data.protocol.sampler}; "
                              f"machine {data.protocol.machine}.")


def scale(store: Store) -> str:
    data = store.get("scale.json")
    p = data.protocol
    rows = ["| model @ uniform bits | budget | search wall (table / level 2 / level 3) | "
            "peak memory | 2 × bf16 weights | test ppl: searched | uniform RTN | uniform GPTQ "
            "| windows | measured |",
            "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for key, e in data.entries.items():
        t = e.timings_s
        stages = " / ".join(f"{t[k] / 60:.1f}" if k in t else "–"
                            for k in ("sensitivity_s", "level2_s", "level3_s"))
        resumed = f", {e.attempts} attempts" if e.attempts > 1 else ""
        rows.append(f"| {key} | {e.budget_bytes / 1e6:,.0f} MB | {e.wall_s / 60:.1f} min "
                    f"({stages} min{resumed}) | {e.peak_pss_bytes / 2**30:.2f} GiB | "
                    f"{e.bf16_weight_bytes * 2 / 2**30:.2f} GiB | {e.searched.ppl:.2f} | "
                    f"{e.uniform_rtn.ppl:.2f} | {e.uniform_gptq.ppl:.2f} | {e.eval_windows} | "
                    f"{e.measured_at} |")
    models = "; ".join(dict.fromkeys(f"{k.split('@')[0]}: {e.model}"
                                     for k, e in data.entries.items()))
    commands = "; ".join(f"{k}: `{e.command}`" for k, e in data.entries.items())
    return "\n".join(rows) + (f"\n\nModels: {models}. Search: {p.search}. Budget: {p.budget}. "
                              f"Memory: {p.memory}. Test: {p.eval}. Machine: {p.machine}. "
                              f"Commands: {commands}. Reproduce: `.venv/bin/python "
                              "experiments/scale.py`.")


def seed_spread(store: Store) -> str:
    """Each seed's search beside scale.json's run of the same search (seed 0, the default)."""
    data = store.get("seed_spread.json")
    scale_runs = store.get("scale.json").entries if store.has("scale.json") else {}
    rows = ["| search | seed | test ppl | test KL | held-out KL (level 3) | chosen | wall |",
            "| --- | ---: | ---: | ---: | ---: | --- | ---: |"]
    by_search: dict[str, list[float]] = {}
    for key, e in sorted(data.entries.items(), key=lambda kv: (kv[0].split("/")[0], kv[1].seed)):
        name = key.split("/")[0]
        if name not in by_search and name in scale_runs:
            s = scale_runs[name]
            by_search[name] = [s.searched.ppl]
            rows.append(f"| {name} | 0 (scale.json) | {s.searched.ppl:.2f} | "
                        f"{s.searched.kl:.4f} | – | {s.chosen} | {s.wall_s / 60:.1f} min |")
        by_search.setdefault(name, []).append(e.ppl)
        rows.append(f"| {name} | {e.seed} | {e.ppl:.2f} | {e.kl:.4f} | {e.holdout_kl:.4f} | "
                    f"{e.chosen} | {e.wall_s / 60:.1f} min |")
    notes = []
    for name, ppls in by_search.items():
        if len(ppls) > 1:
            mean = sum(ppls) / len(ppls)
            sd = (sum((x - mean) ** 2 for x in ppls) / (len(ppls) - 1)) ** 0.5
            width = max(ppls) - min(ppls)
            notes.append(f"{name}: {len(ppls)} seeds, test ppl {min(ppls):.2f}–{max(ppls):.2f} "
                         f"(spread {width:.2f}, {width / mean:.1%} of the mean; sample "
                         f"standard deviation {sd:.2f}).")
    p = data.protocol
    return "\n".join(rows) + "\n\n" + " ".join(notes) + (
        f"\n\nSearch: {p.search}. Budget: {p.budget}. Test: {p.eval}. Machine: {p.machine}. "
        "Reproduce: `.venv/bin/python experiments/seed_spread.py --bits 3 --seeds 1,2`.")


def projection_8b(store: Store) -> str:
    data = store.get("projection_8b.json")
    names = {"sensitivity_s": "sensitivity table", "level2_s": "level 2 (Optuna)",
             "level3_s": "level 3 (Ray Tune)"}

    def span(pair, unit=60.0, suffix="min") -> str:
        lo, hi = (v / unit for v in pair)
        return f"{lo:.1f}–{hi:.1f} {suffix}" if hi >= 0.05 else f"< 0.1 {suffix}"

    out = []
    for key, e in data.entries.items():
        a = e.assumed
        rows = [f"| stage | measured, 1.5B on this CPU | 8B on this CPU | 8B on one {a['gpu']} "
                f"(compute floor) | 8B on {a['gpus']} of them |",
                "| --- | ---: | ---: | ---: | ---: |"]
        for stage, label in names.items():
            if stage not in e.measured_s:
                continue
            rows.append(f"| {label} | {e.measured_s[stage] / 60:.1f} min | "
                        f"{span(e.cpu_s[stage], 3600, 'h')} | {span(e.one_gpu_s[stage])} | "
                        f"{span(e.eight_gpus_s[stage])} |")
        total = [sum(v[i] for v in e.cpu_s.values()) for i in (0, 1)]
        rows.append(f"| **all** | {sum(e.measured_s.values()) / 60:.1f} min | "
                    f"**{span(total, 3600, 'h')}** | "
                    f"{span([sum(v[i] for v in e.one_gpu_s.values()) for i in (0, 1)])} | "
                    f"{span([sum(v[i] for v in e.eight_gpus_s.values()) for i in (0, 1)])} |")
        out.append("\n".join(rows) + (
            f"\n\n{key} ({e.measured_at}), {data.protocol.what}. Work ratios 8B / 1.5B: "
            f"{e.forward_ratio:.2f}× on forwards, {e.factorization_ratio:.2f}× on "
            f"factorizations ({e.params_8b / 1e9:.2f}B parameters). Memory: on this CPU about "
            f"{e.cpu_peak_bytes / 2**30:.1f} GiB peak (the 1.5B's peak × the parameter ratio; "
            f"2 × bf16 weights = {e.cpu_bf16_weights_x2_bytes / 2**30:.1f} GiB); on one GPU "
            f"{e.gpu_memory_bytes / 2**30:.1f} GiB ({e.gpu_weights_bytes / 2**30:.1f} GiB of "
            f"bf16 weights and the largest block's working set) of 24. GPU rates: this CPU "
            f"{e.cpu_rate_gflops:.0f} GFLOP/s measured on forwards (both cores); assumed, not "
            f"measured: {a['gpu']} at {a['forward_efficiency']:.0%} of {a['bf16_peak_tflops']:g} "
            f"TFLOP/s bf16 ({e.gpu_speedup_forward:.0f}× this CPU) and "
            f"{a['factorization_efficiency']:.0%} of {a['fp32_peak_tflops']:g} TFLOP/s fp32 "
            f"for the table ({e.gpu_speedup_table:.0f}×); {a['gpus']} GPUs at the parallel "
            f"efficiency measured for two level-2 workers here ({e.parallel_efficiency:.0%}). "
            f"Method: {data.protocol.method}. Reproduce: `.venv/bin/python "
            f"experiments/project_8b.py`."))
    return "\n\n".join(out)


def level2_workers(store: Store) -> str:
    data = store.get("level2_workers.json")
    p, entries = data.protocol, data.entries
    rows = ["| Ray workers | trials (batch) | level 2 wall | speed-up | same trials as 1 worker "
            "| workers measuring | workers loaded after | measured |",
            "| ---: | ---: | ---: | ---: | --- | ---: | ---: | --- |"]
    runs = {k: e for k, e in entries.items() if k != "ceiling"}
    base = {e.batch: e.level2_s for e in runs.values() if e.workers == 1}
    for e in runs.values():
        speedup = f"{base[e.batch] / e.level2_s:.2f}×" if e.batch in base else "n/a"
        busy = ready = "not recorded"
        if e.worker_use:
            busy = f"{sum(w.measuring_s for w in e.worker_use) / (e.workers * e.level2_s):.0%}"
            ready = f"{max(w.ready_s for w in e.worker_use):.0f} s"
        rows.append(f"| {e.workers} | {e.trials} ({e.batch}) | {e.level2_s:.0f} s | {speedup} | "
                    f"{'yes' if e.same_trials_as_first else '**no**'} | {busy} | {ready} | "
                    f"{e.measured_at} |")
    limit = entries.get("ceiling")
    if limit is not None:
        rows.append(f"\nCeiling on this machine: one process ran {limit.forwards} single-thread "
                    f"forward passes of a 512-token window in {limit.alone_s:.1f} s, two at "
                    f"once in {' and '.join(f'{t:.1f}' for t in limit.together_s)} s: two "
                    f"workers can be at most {limit.throughput_ratio:.2f}× as fast as one "
                    f"({limit.measured_at}; `experiments/level2_workers.py --ceiling`).")
    return "\n".join(rows) + (f"\n\nProtocol: {p.model}; {p.search}; workers: {p.workers}; "
                              f"machine {p.machine}. Command: `.venv/bin/python "
                              f"experiments/level2_workers.py --trials 16 --batch B`. Workers measuring: "
                              "the share of the workers' time in level 2 spent measuring plans; "
                              "workers loaded after: when the last worker had loaded its model.")


def dtype(store: Store) -> str:
    data = store.get("dtype.json")
    p, entries = data.protocol, data.entries
    rows = ["| computed in | plan | perplexity | KL to float32 uncompressed | forward | "
            "weights in memory | measured |", "| --- | --- | ---: | ---: | ---: | ---: | --- |"]
    for e in entries.values():
        rows.append(f"| {e.dtype} | {e.plan} | {e.ppl:.3f} | {e.kl:.2e} | "
                    f"{e.tokens_per_s:.0f} tok/s | {e.param_bytes / 1e6:.0f} MB | "
                    f"{e.measured_at} |")
    return "\n".join(rows) + (f"\n\nProtocol: {p.model}; {p.eval}; {p.plans}; {p.reference}; "
                              f"machine {p.machine}. Command: `.venv/bin/python "
                              f"experiments/dtype_bench.py --windows 40`.")


def gguf(store: Store, name: str = "gguf.json") -> str:
    data = store.get(name)
    p, entries = data.protocol, data.entries
    rows = ["| plan | file | bits/weight (tensors) | llama.cpp perplexity | KL | `eval` (torch) "
            "perplexity | decode tok/s (predicted) | types |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    n_weights = _gguf_weights(entries)
    for key, e in entries.items():
        if key == "SOURCE":
            continue
        if not key.startswith("search@"):
            label = f"llama.cpp {e.recipe}" + (" + imatrix" if e.imatrix else "")
            rows.append(_gguf_row(label, e, n_weights))
    searched = {k: e for k, e in entries.items() if k.startswith("search@")}
    for e in sorted(searched.values(), key=lambda e: e.file_bytes):
        rows.append(_gguf_row(f"**`search --space gguf`** at {e.recipe}'s bytes "
                              f"({e.search_s / 60:.0f} min)", e, n_weights))
    out = "\n".join(rows)
    if searched:
        out += "\n\n" + _gguf_versus(entries, searched)
    out += _gguf_agreement(entries) + _gguf_speeds(entries) + _gguf_floor(entries)
    settings = sorted({e.settings for e in searched.values()})
    if settings:
        out += (f"\n\nSearched rows: {' / '.join(settings)}; the budget held the search to at "
                "most the recipe's tensor bytes.")
    return out + (f"\n\nProtocol: {p.model}; evaluation {p.eval}; engine {p.engine}; KL to "
                  f"{p.kl_reference}; calibration {p.calibration}; machine {p.machine}.")


def _gguf_floor(entries) -> str:
    """The source file itself in llama.cpp against its own float32 decoding in torch: what
    llama.cpp's kernels add to every row's KL (no requantization at all)."""
    e = entries.get("SOURCE")
    if e is None:
        return ""
    return (f"\n\nFloor: the source file itself ({e.recipe}) run by llama.cpp has KL "
            f"{e.kl:.4f} (perplexity {_fmt_ppl(e.ppl)}) to its float32 decoding in torch on "
            "the same windows, with no weight changed: that much of every row's KL is "
            "llama.cpp's kernels (activations quantized for its dot products), not the plan.")


def _gguf_versus(entries, searched) -> str:
    """At each recipe's file size: the recipe with imatrix against the searched file."""
    rows = ["| at the size of | recipe + imatrix: MB, KL | search: MB, KL | KL change |",
            "| --- | ---: | ---: | ---: |"]
    for e in sorted(searched.values(), key=lambda e: e.file_bytes):
        r = entries.get(f"{e.recipe} imatrix")
        if r is None:
            continue
        rows.append(f"| {e.recipe} | {r.file_bytes / 1e6:.1f}, {r.kl:.4f} | "
                    f"{e.file_bytes / 1e6:.1f}, {e.kl:.4f} | {e.kl / r.kl - 1:+.0%} |")
    return "\n".join(rows)


def _gguf_agreement(entries) -> str:
    """llama.cpp's perplexity of each exported file against `eval`'s of its plan in torch."""
    gaps = [e.ppl / e.torch_ppl - 1 for e in entries.values() if e.torch_ppl is not None]
    if not gaps:
        return ""
    worst = max(gaps, key=abs)
    plans = f"{len(gaps)} plan" + ("s" if len(gaps) > 1 else "")
    return (f"\n\nllama.cpp against `eval`: over {plans}, llama.cpp's perplexity of "
            f"the exported file is within {abs(worst):.1%} of `eval`'s perplexity of the same "
            f"plan in torch (median {statistics.median(abs(g) for g in gaps):.1%}; the same "
            "windows; torch runs the dequantized weights in float32, llama.cpp its own "
            "quantized kernels).")


def _gguf_speeds(entries) -> str:
    """The speed column's protocol, its noise, and how well the profile predicts mixed files."""
    profiles = {e.speed_profile for e in entries.values() if e.speed_profile}
    protocols = {e.speed_protocol for e in entries.values() if e.speed_protocol}
    if not profiles and not protocols:
        return ""
    out = "\n\nDecode speeds: " + ("; ".join(sorted(protocols)) if protocols else
                                   "batch 1, 16-token prompt, 64 tokens, median of 3") + "."
    mixed = [e.decode_tps / e.predicted_tps - 1 for e in entries.values()
             if e.mixed_types and e.decode_tps is not None and e.predicted_tps is not None]
    if profiles:
        out += (f" Predicted: from the llama.cpp speed profile {', '.join(sorted(profiles))} "
                "(`profile --engine llamacpp`: one file per type with every block linear in it, "
                "llama.cpp's fallbacks aside, fitted per weight and stored type).")
    if mixed:
        errors = sorted(abs(m) for m in mixed)
        out += (f" On the {len(mixed)} files whose mixture of stored types no profile file "
                f"had (the recipes' boosted layers, the searched plans), the prediction's "
                f"median error is {statistics.median(errors):.1%} (largest {errors[-1]:.1%}).")
    return out + _speed_noise(entries)


def _speed_noise(entries) -> str:
    """How far apart decode speeds of files with the same types came out: the resolution of
    the speed column on this machine."""
    groups: dict[tuple, list[float]] = {}
    for e in entries.values():
        if e.decode_tps is not None:
            groups.setdefault(tuple(sorted(e.types.items())), []).append(e.decode_tps)
    spreads = [max(v) / min(v) - 1 for v in groups.values() if len(v) > 1]
    if not spreads:
        return ""
    return (f" Files with the same types in every tensor (most recipes with and without "
            f"imatrix; recipes whose rules coincide on this model) decoded up to {max(spreads):.0%} apart "
            f"({len(spreads)} such groups, median spread {statistics.median(spreads):.0%}): "
            "differences in this column smaller than that are noise of this shared 2-core "
            "machine.")


def _gguf_weights(entries) -> int | None:
    """Weights in the file's quantized tensors: recorded by the row, else from a plain Q8_0
    row (34 bytes per 32)."""
    recorded = {e.tensor_weights for e in entries.values() if e.tensor_weights}
    if recorded:
        return recorded.pop()
    e = entries.get("Q8_0")
    return None if e is None else e.tensor_bytes * 32 // 34


def _gguf_row(label: str, e, n_weights: int | None) -> str:
    bpw = "" if not n_weights else f"{8 * e.tensor_bytes / n_weights:.2f}"
    types = ", ".join(f"{t} {n}" for t, n in sorted(e.types.items(), key=lambda kv: -kv[1])
                      if t != "f32")
    speed = "" if e.decode_tps is None else f"{e.decode_tps:.1f}"
    if e.predicted_tps is not None:
        speed += f" ({e.predicted_tps:.1f})"
    torch = "" if e.torch_ppl is None else _fmt_ppl(e.torch_ppl)
    return (f"| {label} | {e.file_bytes / 1e6:.1f} MB | {bpw} | {_fmt_ppl(e.ppl)} | "
            f"{e.kl:.4f} | {torch} | {speed} | {types} |")


def _study(store: Store, directory: str):
    """A study's results as `experiments/studies.py DIRECTORY` copied them, validated
    (results_schema.validate_study; FileNotFoundError: not run yet)."""
    name = STUDY_RUNS.get(directory, directory)
    return validate_study(store.root / "studies" / directory / f"{name}.json", name)


def _rho(value) -> str:
    return "–" if value is None else f"{value:+.2f}"


def _option(o) -> str:
    """A study protocol's LayerConfig, in words."""
    group = "per channel" if o.group_size == -1 else f"groups of {o.group_size}"
    return f"{o.bits}-bit {o.method.upper()}, {group}, {'sym' if o.sym else 'asym'}metric"


def studies_layers(store: Store) -> str:
    data = _study(store, "layers")
    p = data.protocol
    rows = ["| model | layers (measured) | proxy vs measured, Spearman ρ | share of cost by kind, "
            "proxy | by kind, measured |", "| --- | ---: | ---: | --- | --- |"]
    for entry in data.models.values():
        def shares(source):
            profile = entry.profiles.get(source)
            return "–" if profile is None or not profile.kind else \
                ", ".join(f"{k} {v:.0%}" for k, v in profile.kind.items())
        rows.append(f"| {entry.name} | {len(entry.layers)} ({len(entry.measured)}) | "
                    f"{_rho(entry.proxy_vs_measured)} | {shares('proxy')} | "
                    f"{shares('measured')} |")
    names = {spec: e.name for spec, e in data.models.items()}
    none = Rhos()

    def rhos(row, source):
        return row.get(source, none)
    pairs = [f"{' vs '.join(names.get(s, s) for s in pair.split(' vs '))}: by kind ρ "
             f"{_rho(rhos(row, 'proxy').kind)} (proxy), {_rho(rhos(row, 'measured').kind)} "
             f"(measured); by depth ρ {_rho(rhos(row, 'proxy').depth)} (proxy), "
             f"{_rho(rhos(row, 'measured').depth)} (measured)"
             for pair, row in data.correlations.items()]
    sources = "; ".join(
        f"{e.name}: {'table ' + Path(e.source.table).name if e.source.table else 'table built here'}"
        f" ({e.source.proxy})" for e in data.models.values())
    every = (f"blocks 0, {p.measure_every}, {2 * p.measure_every}, …" if p.measure_every > 1
             else "every block")
    text = Path(p.calib_text).name if p.calib_text else "the default corpus"
    return "\n".join(rows) + (
        f"\n\nBetween the models: {'; '.join(pairs)}. Protocol: the option profiled "
        f"{_option(p.option)}; proxy: each layer's predicted Δ loss alone at that option "
        f"({sources}); measured: KL to the uncompressed model on {p.measure_windows} held-out "
        f"window(s) of {p.window_len} tokens of {text}, that layer alone compressed, in {every}; "
        f"depth in {p.depth_bins} equal slices. Reproduce: `.venv/bin/python "
        "experiments/studies.py layers`.")


def studies_fronts(store: Store, directory: str = "fronts") -> str:
    data = _study(store, directory)
    p = data.protocol
    limits = p.min_tps
    rows = ["| device | plans | memory on the device | KL to uncompressed | predicted decode |"
            + (" decode at least |" if limits else ""),
            "| --- | ---: | --- | --- | --- |" + (" ---: |" if limits else "")]
    for device, front in data.devices.items():
        mb = [pt.total_bytes / 1e6 for pt in front]
        kl = [pt.kl for pt in front]
        tps = [pt.tokens_per_s for pt in front]
        limit = (f" {limits[device]:g} |" if device in limits else " – |") if limits else ""
        rows.append(f"| {device} | {len(front)} | {min(mb):.0f}–{max(mb):.0f} MB | "
                    f"{min(kl):.4f}–{max(kl):.4f} | {min(tps):.1f}–{max(tps):.1f} tokens/s |"
                    + limit)
    equal = data.equal_memory
    if equal.capacity_bytes and equal.devices:
        n_layers = len(next(iter(equal.devices.values())).formats)
        same = (f"At {equal.capacity_bytes / 1e6:.0f} MB of layer bytes the devices' optima "
                f"differ in {len(equal.layers_that_differ)} of {n_layers} layers")
        speeds = [f"{d} {e.tokens_per_s:.1f}" for d, e in equal.devices.items()
                  if e.tokens_per_s is not None]
        if speeds:
            same += f" (their predicted decode, tokens/s: {', '.join(speeds)})"
    else:
        same = "The devices' plan sizes do not overlap"
    limited = ("; each device's plans held to the decode speed in the last column "
               "(--min-tps)" if limits else "")
    return "\n".join(rows) + (
        f"\n\n{same} (figures/formats.png). Protocol: {p.model}; the exact proxy front "
        f"({p.proxy}, {p.calib_windows} calibration windows of {p.window_len}) at "
        f"{p.points} memory levels per device, with the bytes each device's engine holds each "
        f"format in{limited}; {p.measure}; speed: {p.speed} of {p.context}. Reproduce: "
        f"`.venv/bin/python experiments/studies.py {directory}`.")


def studies_proxies(store: Store) -> str:
    data = _study(store, "proxies")
    p = data.protocol
    families = [*p.families, "all"]
    rows = ["| model | proxy | table | " + " | ".join(f"{f}" for f in families) + " |",
            "| --- | --- | ---: |" + " ---: |" * len(families)]
    for spec, entry in data.models.items():
        for name, record in entry.proxies.items():
            cells = [_rho(record.families[f].spearman) if f in record.families else "–"
                     for f in families]
            rows.append(f"| {Path(spec).name} | {name} | {_secs(record.table_s)} s | "
                        + " | ".join(cells) + " |")
    plans = {Path(spec).name: len(e.plans) for spec, e in data.models.items()}
    text = Path(p.calib_text).name if p.calib_text else "the default corpus"
    return "\n".join(rows) + (
        f"\n\nSpearman ρ between each proxy's additive prediction and the measured KL of random "
        f"plans per option family ({p.plans_per_family} per family; plans measured: "
        f"{', '.join(f'{m} {n}' for m, n in plans.items())}); table: the wall time of the "
        f"proxy's table on {p.calib_windows} calibration windows of {p.window_len} tokens of "
        f"{text}. Protocol: {p.measured}; cost: {p.cost}. Reproduce: `.venv/bin/python "
        "experiments/studies.py proxies`.")


def studies_families(store: Store) -> str:
    data = _study(store, "families")
    p = data.protocol
    cells = data.cells
    bits = sorted({c.bits for c in cells.values()})
    families = list(dict.fromkeys(c.family for c in cells.values()))
    rows = ["| family | " + " | ".join(f"{b:g}-bit bytes: KL (ppl)" for b in bits) + " |",
            "| --- |" + " ---: |" * len(bits)]
    for family in families:
        row = []
        for b in bits:
            cell = cells.get(f"{family}@{b:g}")
            row.append("not run" if cell is None else
                       "does not fit" if not cell.feasible else
                       f"{cell.kl:.4f} ({cell.ppl:.1f})")
        rows.append(f"| {family} | " + " | ".join(row) + " |")
    budgets = ", ".join(
        f"{b:g}: {next(c.budget_bytes for c in cells.values() if c.bits == b) / 1e6:.1f} MB"
        for b in bits)
    return "\n".join(rows) + (
        f"\n\nProtocol: {p.model}; budget: {p.budget} {p.context} ({budgets}); "
        f"search: {p.search} ({p.proxy} table on {p.calib_windows} calibration "
        f"windows); {p.measure}. Reproduce: `.venv/bin/python experiments/studies.py "
        "families`.")


SECTIONS = {"gguf": gguf, "gguf-qwen": lambda store: gguf(store, "gguf_qwen1.5b.json"),
            "gguf-40": lambda store: gguf(store, "gguf_smollm2-40.json"),
            "table-fast-path": table_fast_path, "search": search, "search-v1": search_v1,
            "latency-model": latency_model, "kernels": kernels, "proxy-fidelity": proxy_fidelity,
            "joint-vs-bits": joint_vs_bits, "baselines": baselines,
            "search-candidates": search_candidates, "gptq-study": gptq_study,
            "peak-memory": peak_memory, "level2-workers": level2_workers,
            "dtype": dtype, "scale": scale, "projection-8b": projection_8b,
            "seed-spread": seed_spread,
            "quality": quality, "studies-layers": studies_layers,
            "studies-fronts": studies_fronts, "studies-families": studies_families,
            "studies-fronts-speed": lambda store: studies_fronts(store, "fronts-speed"),
            "recovery": recovery, "studies-proxies": studies_proxies,
            "recovery-4bit": lambda store: recovery(store, "recovery_4bit.json", " --plan-bits 4")}

MARKED = re.compile(r"(<!-- results:([\w-]+) -->\n)(.*?)(\n<!-- /results:\2 -->)", re.S)


def render_all(results: Path) -> dict[str, str]:
    """Every section's body; ResultsError if a file the renderer needs is not valid."""
    store = Store(results)
    bodies = {}
    for name, render in SECTIONS.items():
        try:
            bodies[name] = render(store)
        except FileNotFoundError as exc:
            bodies[name] = f"(not measured yet: no {Path(exc.filename).name})"
    return bodies


def _shown(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(REPO))
    except ValueError:
        return str(path)


def update(text: str, bodies: dict[str, str]) -> tuple[str, dict[str, tuple[str, str]]]:
    """The README with every marked section replaced, and {name: (old, new)} of the ones that
    change. ValueError for markers without a renderer or a renderer without markers."""
    found = [m[2] for m in MARKED.finditer(text)]
    unknown = sorted(set(found) - set(bodies))
    missing = sorted(set(bodies) - set(found))
    twice = sorted({n for n in found if found.count(n) > 1})
    if unknown or missing or twice:
        raise ValueError("; ".join(filter(None, [
            unknown and f"markers without a renderer: {', '.join(unknown)}",
            missing and f"no <!-- results:NAME --> … <!-- /results:NAME --> markers for: "
                        f"{', '.join(missing)}",
            twice and f"marked more than once: {', '.join(twice)}"])))
    changed = {}

    def put(m: re.Match) -> str:
        name, old = m[2], m[3]
        if old != bodies[name]:
            changed[name] = (old, bodies[name])
        return m[1] + bodies[name] + m[4]

    return MARKED.sub(put, text), changed


def section_diff(name: str, old: str, new: str, readme: str, limit: int = 40) -> str:
    lines = list(difflib.unified_diff(old.splitlines(), new.splitlines(),
                                      f"{readme} (results:{name})", f"rendered (results:{name})",
                                      n=0, lineterm=""))
    if len(lines) > limit:
        lines = lines[:limit] + [f"... ({len(lines) - limit} more diff lines)"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true",
                        help="compare only: exit 1 (and show the differences) if the README's "
                             "sections differ from what the results render; write nothing")
    parser.add_argument("--readme", type=Path, default=REPO / "README.md")
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    readme = _shown(args.readme)
    try:
        bodies = render_all(args.results)
        text = args.readme.read_text()
        new_text, changed = update(text, bodies)
    except ResultsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (OSError, ValueError) as exc:
        print(f"error: {readme}: {exc}", file=sys.stderr)
        return 2
    if args.check:
        if not changed:
            print(f"{readme}: all {len(bodies)} result sections match {_shown(args.results)}")
            return 0
        print(f"{readme}: {len(changed)} result section(s) differ from what "
              f"{_shown(args.results)} renders: {', '.join(changed)} "
              f"(run experiments/readme_tables.py to rewrite them)")
        for name, (old, new) in changed.items():
            print(f"\nsection {name}:\n" + section_diff(name, old, new, readme))
        return 1
    if changed:
        from autocompress.io_utils import atomic_write_text

        atomic_write_text(args.readme, new_text)
        print(f"{readme}: rewrote {', '.join(changed)}")
    else:
        print(f"{readme}: already matches {_shown(args.results)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
