"""The options the search may give each layer.

Issue-2 scope: the same list of options for every block linear (bits-only by default, at one
group size). Per-kind options, tied groups and pinned layers from search_spaces/*.yaml build on
this class.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from ..errors import AutocompressError
from ..model import LayerInfo
from ..plan import VALID_BITS, LayerConfig


@dataclass
class SearchSpace:
    options: list[LayerConfig]

    def __post_init__(self) -> None:
        if not self.options:
            raise AutocompressError("the search space has no options")

    @classmethod
    def bits_only(cls, bits: list[int], group_size: int = 64, sym: bool = False,
                  method: str = "rtn") -> "SearchSpace":
        bad = [b for b in bits if b not in VALID_BITS]
        if bad:
            raise AutocompressError(f"--bits {bad} not supported: choose from {VALID_BITS}")
        return cls([LayerConfig(bits=b, group_size=group_size, sym=sym, method=method)
                    for b in sorted(set(bits))])

    @classmethod
    def from_yaml(cls, path: str | Path) -> "SearchSpace":
        """``defaults:`` (a partial LayerConfig) and ``options:`` (a list of partial configs)."""
        path = Path(path)
        if not path.is_file():
            raise AutocompressError(f"search space {str(path)!r} not found")
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            raise AutocompressError(f"search space {str(path)!r} is not valid YAML ({exc})") from None
        if not isinstance(data, dict) or not isinstance(data.get("options"), list):
            raise AutocompressError(f"search space {str(path)!r} needs an 'options:' list")
        unknown = set(data) - {"defaults", "options"}
        if unknown:
            raise AutocompressError(f"search space {str(path)!r} has unknown keys {sorted(unknown)}")
        base = LayerConfig.from_dict(data.get("defaults") or {})
        return cls([LayerConfig.from_dict(option, base) for option in data["options"]])

    def for_layer(self, layer: LayerInfo) -> list[LayerConfig]:
        return list(self.options)

    def uniform_configs(self) -> list[LayerConfig]:
        """The options that can be given to every layer alike (the uniform baselines)."""
        return list(self.options)
