"""How well does each sensitivity proxy's additive cost rank real plans?

For random mixed plans over the joint space (experiments/spaces/joint_v1.yaml: the joint space
as it was when measured; autocompress/search_spaces/joint.yaml today), compare each proxy's
predicted cost (sum of table entries) with the KL to the uncompressed model measured on held-out
windows of wiki.valid.tokens (the last windows; the proxies calibrate on the first ones).
Reports Spearman and Kendall correlations and the seconds each table took.
Writes experiments/results/proxy_fidelity.json (plans and their measured KL are kept, so a rerun
only measures what is missing).

    .venv/bin/python experiments/proxy_fidelity.py [--plans 40] [--proxies fisher,hessian]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from scipy.stats import kendalltau, spearmanr

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CALIB_TEXT, MODEL_LABEL, REPO, ResultFile, check_data, machine  # noqa: E402

from autocompress.accounting import model_footprint  # noqa: E402
from autocompress.data import calibration_data  # noqa: E402
from autocompress.model import load_model  # noqa: E402
from autocompress.search.measure import PlanMeter  # noqa: E402
from autocompress.search.space import SearchSpace  # noqa: E402
from autocompress.sensitivity.build import build_table, make_proxy  # noqa: E402


def random_plans(space: SearchSpace, layers, groups, n: int, seed: int) -> list[list[int]]:
    """Plans that span the space: each plan draws its own option mix (Dirichlet weights, so
    some plans are mostly 8-bit and others mostly 2-bit or pruned), then one option per
    decision group from that mix."""
    rng = np.random.default_rng(seed)
    n_options = len(space.for_layer(layers[0]))
    plans = []
    for _ in range(n):
        weights = rng.dirichlet(np.full(n_options, 0.3))
        choice = [0] * len(layers)
        for group in groups:
            option = int(rng.choice(n_options, p=weights))
            for index in group:
                choice[index] = option
        plans.append(choice)
    return plans


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--plans", type=int, default=40)
    parser.add_argument("--proxies", default="fisher,hessian,hutchinson")
    parser.add_argument("--calib-windows", type=int, default=8)
    parser.add_argument("--holdout-windows", type=int, default=4)
    parser.add_argument("--window-len", type=int, default=512)
    # the plans in results are option indices: keep the space they were drawn from
    parser.add_argument("--space", default=str(REPO / "experiments" / "spaces" / "joint_v1.yaml"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    check_data()
    protocol = {
        "model": MODEL_LABEL,
        "space": Path(args.space).name,
        "proxy_calibration": f"wiki.valid.tokens, first {args.calib_windows} windows of {args.window_len}",
        "measured": f"KL to the uncompressed model, last {args.holdout_windows} windows of "
                    f"{args.window_len} of wiki.valid.tokens",
        "plans": f"{args.plans} random mixed plans (Dirichlet(0.3) option mix per plan), seed {args.seed}",
        "machine": machine(),
    }
    results = ResultFile("proxy_fidelity.json", protocol)
    loaded = load_model("smollm2-135m")
    space = SearchSpace.from_yaml(args.space)
    layers = loaded.layers
    options = [space.for_layer(layer) for layer in layers]
    calib = calibration_data(loaded.tokenizer, CALIB_TEXT, args.calib_windows,
                             args.holdout_windows, args.window_len)
    plans = random_plans(space, layers, space.decision_groups(layers), args.plans, args.seed)

    # ground truth: measured KL per plan
    measured = results.data["entries"].setdefault("plans", {})
    meter = PlanMeter(loaded, calib.holdout, calib.calib)
    for i, choice in enumerate(plans):
        if str(i) in measured:
            continue
        configs = {layer.name: options[l][o] for l, (layer, o) in enumerate(zip(layers, choice))}
        t = time.perf_counter()
        m = meter.measure(configs)
        fp = model_footprint(loaded, configs)
        measured[str(i)] = {"choice": choice, "kl": m["kl"], "ppl": m["ppl"],
                            "bits_per_weight": 8 * fp.layer_weights / sum(l.n_params for l in layers)}
        results.save()
        print(f"plan {i:2d}: {measured[str(i)]['bits_per_weight']:.2f} b/w  KL {m['kl']:.4f}  "
              f"ppl {m['ppl']:.1f}  ({time.perf_counter() - t:.0f} s)", flush=True)

    kl = np.array([measured[str(i)]["kl"] for i in range(len(plans))])
    for name in args.proxies.split(","):
        proxy = make_proxy(name)
        t = time.perf_counter()
        table = build_table(loaded, space, proxy, calib.calib, calib.digest)
        build_s = time.perf_counter() - t
        predicted = np.array([table.predicted(choice)[0] for choice in plans])
        record = {"spearman": float(spearmanr(predicted, kl).statistic),
                  "kendall": float(kendalltau(predicted, kl).statistic),
                  "table_build_s": build_s, "predicted": predicted.tolist()}
        previous = results.data["entries"].get(name, {})
        if previous.get("table_build_s") and build_s < 5:  # table came from the cache
            record["table_build_s"] = previous["table_build_s"]
        results.put(name, record)
        print(f"{name:>12}: Spearman {record['spearman']:.3f}  Kendall {record['kendall']:.3f}  "
              f"table {record['table_build_s']:.0f} s", flush=True)
        calibrated = calibrated_cv(table, plans, kl, options, layers, args.seed)
        results.put(f"{name}, calibrated", calibrated)
        print(f"{name + ' cal':>12}: Spearman {calibrated['spearman']:.3f}  Kendall "
              f"{calibrated['kendall']:.3f}  (5-fold cross-validated)", flush=True)


def calibrated_cv(table, plans, kl, options, layers, seed: int, folds: int = 5) -> dict:
    """The proxy calibrated per option family against measured plans, scored on plans it was
    not fitted on: KL ≈ a · cost + Σ_k b_k · (cost of the layers whose option is in family k),
    families as level 2's knobs (2-bit, 3-bit, sparse, 2:4, low rank, coarse groups, GPTQ), fitted
    by least squares on 4/5 of the plans and predicted on the other 1/5, five times."""
    from autocompress.search.optuna_level import KNOBS

    families = [k for k in KNOBS if k not in ("w_attention", "w_edge_blocks")]
    cost = np.array(table.cost)
    features = []
    for choice in plans:
        row = np.zeros(1 + len(families))
        for layer_index, option in enumerate(choice):
            c = cost[layer_index, option]
            cfg = options[layer_index][option]
            row[0] += c
            for j, knob in enumerate(families):
                row[1 + j] += c if KNOBS[knob](cfg, "", None, 0) else 0.0
        features.append(row)
    x = np.array(features)
    order = np.random.default_rng(seed).permutation(len(plans))
    predicted = np.zeros(len(plans))
    for fold in range(folds):
        test = order[fold::folds]
        train = np.setdiff1d(order, test)
        coef, *_ = np.linalg.lstsq(x[train], kl[train], rcond=None)
        predicted[test] = x[test] @ coef
    coef, *_ = np.linalg.lstsq(x, kl, rcond=None)
    return {"spearman": float(spearmanr(predicted, kl).statistic),
            "kendall": float(kendalltau(predicted, kl).statistic),
            "families": ["all", *families], "coefficients_all_plans": coef.tolist(),
            "folds": folds, "predicted": predicted.tolist()}


if __name__ == "__main__":
    main()
