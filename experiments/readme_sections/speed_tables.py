"""Speed and cost tables: kernels, the latency model, the table fast path, peak memory,
level-2 workers, dtypes."""

from __future__ import annotations

import statistics

from .format import NOT_MEASURED, Store, _range


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
