"""Search tables: the searches at each budget and their stages, the 1.5B scale run, seed
spread and the 8B projection."""

from __future__ import annotations

import re

from results_schema import SEARCH_KEY

from .format import TIMINGS, Store, _fmt_ppl, _quartered, _range, _rate_path


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
        lowered = len(tried.get("lr_lowered_at") or [])
        said = [f"lr {_rate_path(tried['lr'], tried.get('lr_abandoned'), lowered)}"] \
            if "lr" in tried else []
        if not r.stages.recovery:
            said.append("tried, not kept")
        names.append(f"{tried['method'].upper()} recovery"
                     + (f" ({', '.join(said)})" if said else ""))
    return " + ".join(names)


def _rate(record: dict) -> str:
    """The recovery's learning rate, and the rates it backed off from."""
    if "lr" not in record:  # rows from before the rate was recorded
        return ""
    text = f", at lr {record['lr']:g}"
    abandoned = record.get("lr_abandoned") or []
    if abandoned:
        text += (f" (backed off from {', '.join(f'{r:g}' for r in abandoned)}: the first "
                 "validation was worse)")
    return text + _quartered(record.get("lr_lowered_at") or [])


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


def scale(store: Store) -> str:
    data = store.get("scale.json")
    p = data.protocol
    rows = ["| model @ uniform bits | budget | search wall (table / level 2 / level 3) | "
            "peak memory | 2 × bf16 weights | test ppl: searched | uniform RTN | uniform GPTQ "
            "| windows | measured |",
            "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    reused = []
    for key, e in data.entries.items():
        t = dict(e.timings_s)
        mark = ""
        if e.table_from:  # the table time is the source run's; this row's wall excludes it
            t["sensitivity_s"], mark = e.table_from_sensitivity_s, "*"
            reused.append(f"{key} started from {e.table_from}'s table and statistics (same "
                          "model, calibration and space; the budget enters at level 1)")
        stages = " / ".join((f"{t[k] / 60:.1f}" + (mark if k == "sensitivity_s" else ""))
                            if k in t else "–"
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
    note = (" *: the table's time measured in the run it came from, not part of this row's "
            "wall time: " + "; ".join(reused) + ".") if reused else ""
    return "\n".join(rows) + (f"\n\nModels: {models}. Search: {p.search}. Budget: {p.budget}. "
                              f"Memory: {p.memory}. Test: {p.eval}. Machine: {p.machine}. "
                              f"Commands: {commands}.{note} Reproduce: `.venv/bin/python "
                              "experiments/scale.py`.")


def paired_eval(store: Store) -> str:
    """Plans of one scale entry on the same test windows, the first against each other."""
    data = store.get("paired_eval.json")
    rows = ["| entry | plan | total bytes | test ppl | test KL | against the first: ppl ratio "
            "(95%) | KL difference (95%) | windows it won (ppl; KL) | eval wall |",
            "| --- | --- | ---: | ---: | ---: | --- | --- | ---: | ---: |"]
    commands = []
    for key, e in data.entries.items():
        versus = {c.b: c for c in e.comparisons}
        for name, m in e.plans.items():
            c = versus.get(name)
            gap = "–" if c is None else (f"{c.a} / {name}: {c.ppl_ratio:.4f} "
                                         f"({c.ppl_ratio_95[0]:.4f}–{c.ppl_ratio_95[1]:.4f}), "
                                         f"p = {c.p_value:.2g}")
            kl_gap = "–" if c is None or c.kl_diff is None else (
                f"{c.a} − {name}: {c.kl_diff:+.4f} ({c.kl_diff_95[0]:+.4f} to "
                f"{c.kl_diff_95[1]:+.4f}), p = {c.kl_p_value:.2g}")
            won = "–" if c is None else f"{c.a}: {c.windows_better} of {e.windows}" + (
                "" if c.kl_windows_better is None else f"; {c.kl_windows_better}")
            kl = "–" if m.kl is None else f"{m.kl:.4f}"
            rows.append(f"| {key} ({e.windows} windows) | {name} | {m.total_bytes / 1e6:,.1f} MB "
                        f"| {m.ppl:.2f} | {kl} | {gap} | {kl_gap} | {won} | "
                        f"{m.wall_s / 60:.1f} min |")
        plans = ",".join(f"{n}={m.plan}" for n, m in e.plans.items())
        commands.append(f"`.venv/bin/python experiments/paired_eval.py {key} --plans {plans} "
                        f"--windows {e.windows}`")
    p = data.protocol
    return "\n".join(rows) + (f"\n\nTest: {p.eval}. Comparison: {p.comparison}. Machine: "
                              f"{p.machine}. Reproduce (the plans are the scale run's, in "
                              f"experiments/runs/): {'; '.join(commands)}.")


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
