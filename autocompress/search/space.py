"""The options the search may give each layer (autocompress/search_spaces/*.yaml).

```yaml
defaults: {group_size: 64, sym: false, method: rtn}   # merged under every option
options:                                               # every layer kind ...
  - {bits: 3}
  - {bits: 4}
kinds:                                                 # ... unless its kind has its own list
  down: [{bits: 4}, {bits: 8}]
tied: [[q, k, v], [gate, up]]                          # one choice per block for these kinds
pinned:                                                # fixed config: exact name or re:REGEX
  "re:model\\.layers\\.0\\..*": {bits: 8}
```

Tied kinds must have the same option list (they share one decision, e.g. for a fused QKV
kernel). A pinned layer has exactly one option, and a pinned layer inside a tied group unties
from it.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path

import yaml

from ..errors import AutocompressError
from ..model import LAYER_KINDS, LayerInfo
from ..plan import VALID_BITS, LayerConfig

_KEYS = {"defaults", "options", "kinds", "tied", "pinned"}


# Old names of bundled spaces, still accepted (with a warning): `default` became `joint`.
DEPRECATED_NAMES = {"default": "joint"}


def spaces_dir() -> Path:
    """The bundled spaces: package data (autocompress/search_spaces/), so they are there in a
    wheel or a non-editable install as well as in a checkout."""
    return Path(str(files("autocompress") / "search_spaces"))


@dataclass
class SearchSpace:
    options: list[LayerConfig]
    kinds: dict[str, list[LayerConfig]] = field(default_factory=dict)
    tied: list[list[str]] = field(default_factory=list)
    pinned: dict[str, LayerConfig] = field(default_factory=dict)
    name: str = "custom"

    def __post_init__(self) -> None:
        if not self.options and not self.kinds:
            raise AutocompressError("the search space has no options")
        for group in self.tied:
            if not isinstance(group, list) or not group:
                raise AutocompressError(f"tied groups are lists of layer kinds, got {group!r}")
            unknown = [k for k in group if k not in LAYER_KINDS]
            if unknown:
                raise AutocompressError(f"tied names unknown layer kind(s) {unknown}; kinds are "
                                        f"{', '.join(LAYER_KINDS)}")
            lists = {tuple(self.kinds.get(kind, self.options)) for kind in group}
            if len(lists) > 1:
                raise AutocompressError(f"tied kinds {group} must have the same options")
        unknown = [k for k in self.kinds if k not in LAYER_KINDS]
        if unknown:
            raise AutocompressError(f"kinds names unknown layer kind(s) {unknown}; kinds are "
                                    f"{', '.join(LAYER_KINDS)}")
        for key in self.pinned:
            if key.startswith("re:"):
                try:
                    re.compile(key[3:])
                except re.error as exc:
                    raise AutocompressError(f"pinned {key!r} is not a valid regex: {exc}") from None

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def bits_only(cls, bits: list[int], group_size: int = 64, sym: bool = False,
                  method: str = "rtn") -> "SearchSpace":
        bad = [b for b in bits if b not in VALID_BITS]
        if bad:
            raise AutocompressError(f"--bits {bad} not supported: choose from {VALID_BITS}")
        return cls([LayerConfig(bits=b, group_size=group_size, sym=sym, method=method)
                    for b in sorted(set(bits))], name="bits")

    @classmethod
    def load(cls, name_or_path: str | Path) -> "SearchSpace":
        """A bundled space by name (``joint``, ``bits``: autocompress/search_spaces/NAME.yaml,
        from any working directory) or a space by YAML path. The old name ``default`` still
        loads ``joint`` (with a FutureWarning) and keeps its name, so a study begun with
        ``--space default`` resumes with it."""
        path = Path(name_or_path)
        if path.suffix in (".yaml", ".yml") or path.is_file():
            return cls.from_yaml(path)
        name = str(name_or_path)
        known = {p.stem: p for p in sorted(spaces_dir().glob("*.yaml"))}
        if name in DEPRECATED_NAMES and name not in known:
            target = DEPRECATED_NAMES[name]
            warnings.warn(f"search space {name!r} is now called {target!r}; use --space {target}",
                          FutureWarning, stacklevel=2)
            space = cls.from_yaml(known[target])
            space.name = name
            return space
        if name not in known:
            raise AutocompressError(f"unknown search space {name!r}: give a YAML path or one of "
                                    f"{', '.join(known) or 'none'} (autocompress/search_spaces/)")
        return cls.from_yaml(known[name])

    @classmethod
    def from_yaml(cls, path: str | Path) -> "SearchSpace":
        path = Path(path)
        if not path.is_file():
            raise AutocompressError(f"search space {str(path)!r} not found")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError:
            raise AutocompressError(f"search space {str(path)!r} is not a text (YAML) "
                                    "file") from None
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark else ""
            problem = getattr(exc, "problem", None) or "syntax error"
            raise AutocompressError(f"search space {str(path)!r} is not valid YAML{where} "
                                    f"({problem})") from None
        if not isinstance(data, dict) or not isinstance(data.get("options", []), list):
            raise AutocompressError(f"search space {str(path)!r} needs an 'options:' list")
        unknown = set(data) - _KEYS
        if unknown:
            raise AutocompressError(f"search space {str(path)!r} has unknown keys {sorted(unknown)}")
        base = LayerConfig.from_dict(data.get("defaults") or {})

        def configs(items) -> list[LayerConfig]:
            if not isinstance(items, list):
                raise AutocompressError(f"search space {str(path)!r}: option lists must be lists")
            return [LayerConfig.from_dict(item, base) for item in items]

        kinds = data.get("kinds") or {}
        pinned = data.get("pinned") or {}
        if not isinstance(kinds, dict) or not isinstance(pinned, dict):
            raise AutocompressError(f"search space {str(path)!r}: 'kinds' and 'pinned' are maps")
        return cls(
            options=configs(data.get("options") or []),
            kinds={kind: configs(items) for kind, items in kinds.items()},
            tied=_tied(path, data.get("tied")),
            pinned={key: LayerConfig.from_dict(cfg, base) for key, cfg in pinned.items()},
            name=path.stem,
        )

    # -- per layer -------------------------------------------------------------------------------
    def pinned_config(self, layer: LayerInfo) -> LayerConfig | None:
        if layer.name in self.pinned:
            return self.pinned[layer.name]
        for key, cfg in self.pinned.items():
            if key.startswith("re:") and re.fullmatch(key[3:], layer.name):
                return cfg
        return None

    def for_layer(self, layer: LayerInfo) -> list[LayerConfig]:
        pinned = self.pinned_config(layer)
        if pinned is not None:
            return [pinned]
        options = self.kinds.get(layer.kind, self.options)
        if not options:
            raise AutocompressError(f"the search space has no options for {layer.kind} layers")
        return list(options)

    def decision_groups(self, layers: list[LayerInfo]) -> list[list[int]]:
        """Indices of layers that share one decision: tied kinds within a block, else alone."""
        kind_group = {kind: i for i, group in enumerate(self.tied) for kind in group}
        groups: dict[tuple, list[int]] = {}
        for index, layer in enumerate(layers):
            if layer.kind in kind_group and self.pinned_config(layer) is None:
                key = ("tied", layer.block, kind_group[layer.kind])
            else:
                key = ("single", index)
            groups.setdefault(key, []).append(index)
        return list(groups.values())

    def uniform_configs(self) -> list[LayerConfig]:
        """Options every non-pinned layer can take alike (the uniform baselines)."""
        lists = [self.options] + list(self.kinds.values())
        lists = [l for l in lists if l]
        common = [cfg for cfg in lists[0] if all(cfg in other for other in lists[1:])]
        return common


def _tied(path: Path, value) -> list[list[str]]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(g, list) for g in value):
        raise AutocompressError(f"search space {str(path)!r}: 'tied' is a list of lists of "
                                "layer kinds, e.g. [[q, k, v], [gate, up]]")
    return value
