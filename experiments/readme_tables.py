"""Render experiments/results/*.json as the README's tables (between marker comments), so the
README never shows a number that a benchmark did not write. The tables themselves are in
readme_sections/ (one module per kind of result); this script matches them to the README's
markers and writes it.

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
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, RESULTS, shown  # noqa: E402
from readme_sections.format import Store  # noqa: E402
from readme_sections.gguf_tables import gguf  # noqa: E402
from readme_sections.quality_tables import (  # noqa: E402
    baselines,
    gptq_study,
    joint_vs_bits,
    proxy_fidelity,
    quality,
    recovery,
    search_candidates,
)
from readme_sections.search_tables import (  # noqa: E402
    paired_eval,
    projection_8b,
    scale,
    search,
    search_v1,
    seed_spread,
)
from readme_sections.speed_tables import (  # noqa: E402
    dtype,
    kernels,
    latency_model,
    level2_workers,
    peak_memory,
    table_fast_path,
)
from readme_sections.study_tables import (  # noqa: E402
    studies_families,
    studies_fronts,
    studies_layers,
    studies_proxies,
)
from results_schema import ResultsError  # noqa: E402

SECTIONS = {"gguf": gguf, "gguf-qwen": lambda store: gguf(store, "gguf_qwen1.5b.json"),
            "gguf-40": lambda store: gguf(store, "gguf_smollm2-40.json"),
            "table-fast-path": table_fast_path, "search": search, "search-v1": search_v1,
            "latency-model": latency_model, "kernels": kernels, "proxy-fidelity": proxy_fidelity,
            "joint-vs-bits": joint_vs_bits, "baselines": baselines,
            "search-candidates": search_candidates, "gptq-study": gptq_study,
            "peak-memory": peak_memory, "level2-workers": level2_workers,
            "dtype": dtype, "scale": scale, "projection-8b": projection_8b,
            "seed-spread": seed_spread, "paired-eval": paired_eval,
            "quality": quality, "studies-layers": studies_layers,
            "studies-fronts": studies_fronts, "studies-families": studies_families,
            "studies-fronts-speed": lambda store: studies_fronts(store, "fronts-speed"),
            "recovery": recovery, "studies-proxies": studies_proxies,
            "recovery-4bit": lambda store: recovery(store, "recovery_4bit.json", " --plan 4"),
            "recovery-3bit-awq": lambda store: recovery(store, "recovery_3bit_awq.json",
                                                        " --plan 3-awq")}

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
    readme = shown(args.readme)
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
            print(f"{readme}: all {len(bodies)} result sections match {shown(args.results)}")
            return 0
        print(f"{readme}: {len(changed)} result section(s) differ from what "
              f"{shown(args.results)} renders: {', '.join(changed)} "
              f"(run experiments/readme_tables.py to rewrite them)")
        for name, (old, new) in changed.items():
            print(f"\nsection {name}:\n" + section_diff(name, old, new, readme))
        return 1
    if changed:
        from autocompress.io_utils import atomic_write_text

        atomic_write_text(args.readme, new_text)
        print(f"{readme}: rewrote {', '.join(changed)}")
    else:
        print(f"{readme}: already matches {shown(args.results)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
