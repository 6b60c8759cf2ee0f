"""Quality tables: baselines, GPTQ, the quantizer table, recovery, proxies against
measurement."""

from __future__ import annotations

from .format import (
    FAMILIES,
    LABELS,
    NOT_MEASURED,
    Store,
    _fmt_ppl,
    _quartered,
    _range,
    _rate_path,
    _secs,
    _timings,
)


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
                    rate = f" at lr {_rate_path(e.kd.lr, e.kd.lr_abandoned)}" \
                        if e.kd.lr is not None else ""
                    cells.append(f"{_fmt_ppl(e.ppl)} ({_secs(e.build_s)} s; val KL "
                                 f"{e.kd.kl_before:.3f} → {e.kd.kl_after:.3f}, "
                                 f"{e.kd.steps} steps{rate})")
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
        lowered = len(e.kd.lr_lowered_at)  # stalls that sent it back at a quarter of the rate
        lr = f"{_rate_path(e.kd.lr, e.kd.lr_abandoned, lowered)}, {schedule}"
        if e.kd.lr_abandoned:  # the rate it started at made the first validation worse
            lr += " (backed off)"
        lr += _quartered(e.kd.lr_lowered_at)
        rows.append(f"| {key} | {e.kd.train_windows} windows | {lr} | {e.kd.steps} ({e.kd.best_step}) "
                    f"| {e.holdout_kl_after:.4f} | {100 * e.holdout_kl_change:+.1f}% | "
                    f"{_fmt_ppl(e.test_ppl)} | {_secs(e.recover_s)} s |")
    return ("\n".join(rows) + f"\n\nThe search reported held-out KL {before.search_reported_kl:.4f} "
            f"for this plan before its recovery; measured here {before.holdout_kl:.4f}. Protocol: "
            f"{p.model}; plan {p.plan}; held-out: {p.holdout}; test: {p.eval}; {p.recovery}; "
            f"machine {p.machine}. Reproduce: `.venv/bin/python experiments/recovery.py"
            f"{options}`.")


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
