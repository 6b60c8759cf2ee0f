"""The sensitivity table: for every layer × option, the predicted loss increase and exact bytes.

This is the interface between sensitivity proxies and the search: a proxy fills ``cost``, the
accounting fills ``bytes``, and the solver never sees anything else.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import AutocompressError
from ..io_utils import atomic_write_text
from ..plan import LayerConfig


@dataclass
class SensitivityTable:
    layers: list[str]
    options: list[list[LayerConfig]]  # options[l]: the choices of layer l
    cost: list[list[float]]  # cost[l][o]: predicted increase of the LM loss (nats)
    bytes: list[list[int]]  # bytes[l][o]: exact weight bytes of layer l under option o
    proxy: str = "fisher"
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = len(self.layers)
        if not (len(self.options) == len(self.cost) == len(self.bytes) == n):
            raise AutocompressError("sensitivity table is inconsistent: rows differ in length")
        for l_opts, l_cost, l_bytes in zip(self.options, self.cost, self.bytes):
            if not (len(l_opts) == len(l_cost) == len(l_bytes)):
                raise AutocompressError("sensitivity table is inconsistent: options differ")

    def cost_matrix(self) -> np.ndarray:
        """[layers, max options], padded with +inf where a layer has fewer options."""
        return self._matrix(self.cost, np.inf, float)

    def bytes_matrix(self) -> np.ndarray:
        return self._matrix(self.bytes, 0, np.int64)

    def _matrix(self, rows, fill, dtype) -> np.ndarray:
        width = max(len(r) for r in rows)
        out = np.full((len(rows), width), fill, dtype=dtype)
        for i, row in enumerate(rows):
            out[i, :len(row)] = row
        return out

    def predicted(self, choice: list[int]) -> tuple[float, int]:
        """(summed cost, summed bytes) of choosing option ``choice[l]`` for each layer."""
        cost = sum(self.cost[l][o] for l, o in enumerate(choice))
        size = sum(self.bytes[l][o] for l, o in enumerate(choice))
        return float(cost), int(size)

    def configs(self, choice: list[int]) -> dict[str, LayerConfig]:
        return {name: self.options[l][o] for l, (name, o) in enumerate(zip(self.layers, choice))}

    def digest(self) -> str:
        """A short hash of what the table says (layers, options, costs to 9 digits, bytes)."""
        import hashlib

        data = {"layers": self.layers, "options": [[o.to_dict() for o in opts]
                                                   for opts in self.options],
                "cost": [[float(f"{c:.9g}") for c in row] for row in self.cost],
                "bytes": self.bytes}
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]

    # -- persistence ----------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "proxy": self.proxy,
            "meta": self.meta,
            "layers": self.layers,
            "options": [[o.to_dict() for o in opts] for opts in self.options],
            "cost": self.cost,
            "bytes": self.bytes,
        }

    @classmethod
    def from_dict(cls, data: dict) -> "SensitivityTable":
        try:
            return cls(
                layers=list(data["layers"]),
                options=[[LayerConfig.from_dict(o) for o in opts] for opts in data["options"]],
                cost=[[float(c) for c in row] for row in data["cost"]],
                bytes=[[int(b) for b in row] for row in data["bytes"]],
                proxy=data.get("proxy", "unknown"),
                meta=dict(data.get("meta", {})),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise AutocompressError(f"sensitivity table is malformed ({exc})") from None

    def save(self, path: str | Path) -> None:
        atomic_write_text(path, json.dumps(self.to_dict()) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "SensitivityTable":
        path = Path(path)
        if not path.is_file():
            raise AutocompressError(f"sensitivity table {str(path)!r} not found")
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except json.JSONDecodeError as exc:
            raise AutocompressError(
                f"sensitivity table {str(path)!r} is not valid JSON ({exc})") from None
