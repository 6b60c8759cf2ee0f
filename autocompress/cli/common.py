"""What several commands do alike: load the model where the user placed it, rebuild
a plan's calibration recipe, read the recovery options."""

from __future__ import annotations

from ..errors import AutocompressError
from .output import _log, console


def _kd_settings(args):
    from ..recovery import KDSettings

    return KDSettings(steps=args.kd_steps, lr=args.kd_lr, val_windows=args.kd_val_windows,
                      train_windows=args.kd_train_windows, schedule=args.kd_schedule,
                      lr_backoffs=args.kd_lr_backoffs,
                      plateau_backoffs=args.kd_plateau_backoffs) \
        if args.recover else None


def _load(args, dtype: str | None = None):
    """The model on --compute-device in --dtype (or ``dtype``), said on the terminal."""
    from ..model import load_model

    loaded = load_model(args.model, dtype=dtype or args.dtype, device=args.compute_device)
    _say_placement(loaded)
    return loaded


def _say_placement(loaded) -> None:
    """Where the work runs, said when it is not this tool's long-standing CPU float32."""
    if loaded.placement.describe() != "cpu, float32":
        _log(f"computing on {loaded.placement.describe()}")


def _load_for_plan(args):
    from ..model import load_model
    from ..plan import Plan

    plan = Plan.load(args.plan)
    plan.recovered_tensors()  # a missing or altered file is said before the model loads
    # --dtype auto reproduces the plan: the dtype its weights and figures were computed in
    recorded = plan.provenance.compute_dtype if plan.provenance else "float32"
    loaded = load_model(args.model or plan.model.source or plan.model.name,
                        dtype=recorded if args.dtype == "auto" else args.dtype,
                        device=args.compute_device)
    _say_placement(loaded)
    plan.check_model(loaded.identity)
    plan.check_override_names((layer.name for layer in loaded.layers),
                              (table.name for table in loaded.tables))
    return plan, loaded


def _build_recipe(args, loaded, plan):
    """The plan's provenance (or the flags that override it), said on the terminal."""
    from ..compress.reproduce import build_recipe
    from ..provenance import BuildOverrides

    recipe = build_recipe(loaded, plan, BuildOverrides(
        calib_text=args.calib_text, calib_windows=args.calib_windows, mode=args.mode,
        compute_dtype=loaded.placement.dtype_name))
    if plan.recovery is not None and recipe.provenance != plan.provenance:
        raise AutocompressError("this plan's recovered tensors were trained on the build its "
                                "provenance records: build it as recorded (no --calib-text, "
                                "--calib-windows, --mode or --dtype), or recover again")
    for note in recipe.notes:
        _log(note)
    if recipe.calib is not None:
        _warn_embedded_corpus(recipe.provenance.calib_text)
    return recipe


def _warn_embedded_corpus(calib_text) -> None:
    if calib_text is None:
        console.print("note: calibration runs on the embedded pydoc corpus (GPTQ, Wanda, low "
                      "rank, clipped grids); prose close to your use gives better plans: pass "
                      "--calib-text FILE", highlight=False)


def _print_device_estimate(estimate) -> None:
    from ..report import decode_table, print_tables
    from ..units import format_size

    verdict = "[green]fits[/green]" if estimate.fits else "[red]does not fit[/red]"
    console.print(f"memory on {estimate.device}: {format_size(estimate.footprint.total)} of "
                  f"{format_size(estimate.usable_bytes)} usable: {verdict}", highlight=False)
    print_tables(decode_table(estimate.decode, estimate.device), console=console)
    console.print(f"prefill of {estimate.prefill.tokens} tokens: "
                  f"{estimate.prefill.seconds * 1e3:.1f} ms "
                  f"({estimate.prefill.tokens_per_s:.0f} tokens/s)", highlight=False)
