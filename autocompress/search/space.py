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
tables:                                                # the embedding / untied head (fixed)
  model.embed_tokens: {gguf: q8_0}
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
from ..plan import TABLE_ENTRIES, VALID_BITS, LayerConfig, check_table

_KEYS = {"defaults", "options", "kinds", "tied", "pinned", "tables"}


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
    # the embedding and an untied head at a fixed format (every plan of the search has it)
    tables: dict[str, LayerConfig] = field(default_factory=dict)

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
        for key, cfg in self.tables.items():
            if key not in TABLE_ENTRIES:
                raise AutocompressError(f"tables names {key!r}; the entries outside the blocks "
                                        f"are {', '.join(TABLE_ENTRIES)}")
            try:
                check_table(cfg)
            except AutocompressError as exc:
                raise AutocompressError(f"tables {key!r}: {exc}") from None
        offered = [*self.options, *(c for cs in self.kinds.values() for c in cs),
                   *self.pinned.values()]
        if any(cfg.learns_rounding for cfg in offered):
            # level 2 measures each layer's options on their own, from fixed statistics
            raise AutocompressError("search spaces cannot offer method signround yet: it is "
                                    "tuned per block, and the search measures layers one by "
                                    "one; search with rtn/gptq, then set signround in the plan")
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
        defaults = data.get("defaults") or {}
        if not isinstance(defaults, dict):
            raise AutocompressError(f"search space {str(path)!r}: 'defaults' is a map")
        # merged as fields, not as a config: `method: imatrix` alone is no valid config, but is
        # a valid default for options that name a gguf type; other defaults are checked here
        if "gguf" in defaults or defaults.get("method") != "imatrix":
            LayerConfig.from_dict(defaults)

        def option(item) -> LayerConfig:
            if not isinstance(item, dict):
                raise AutocompressError(f"search space {str(path)!r}: options are maps of "
                                        f"LayerConfig fields, got {item!r}")
            return LayerConfig.from_dict({**defaults, **item})

        def configs(items) -> list[LayerConfig]:
            if not isinstance(items, list):
                raise AutocompressError(f"search space {str(path)!r}: option lists must be lists")
            return [option(item) for item in items]

        kinds = data.get("kinds") or {}
        pinned = data.get("pinned") or {}
        tables = data.get("tables") or {}
        if not all(isinstance(m, dict) for m in (kinds, pinned, tables)):
            raise AutocompressError(f"search space {str(path)!r}: 'kinds', 'pinned' and "
                                    "'tables' are maps")
        return cls(
            options=configs(data.get("options") or []),
            kinds={kind: configs(items) for kind, items in kinds.items()},
            tied=_tied(path, data.get("tied")),
            pinned={key: option(cfg) for key, cfg in pinned.items()},
            name=path.stem,
            tables={key: LayerConfig.from_dict(cfg) for key, cfg in tables.items()},
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

    @property
    def all_gguf(self) -> bool:
        """Every option (and pin) a GGUF type: the plans it gives export to GGUF."""
        configs = self.options + [c for cs in self.kinds.values() for c in cs] + \
            list(self.pinned.values())
        return bool(configs) and all(cfg.is_gguf for cfg in configs)

    def table_configs(self, loaded) -> dict[str, LayerConfig]:
        """The fixed configs of ``loaded``'s embedding / untied head (float16 ones left out)."""
        present = {table.name for table in loaded.tables}
        if "lm_head" in self.tables and "lm_head" not in present:
            raise AutocompressError("the search space gives 'lm_head' a format, but this "
                                    "model's head is tied to its embedding: use "
                                    "model.embed_tokens")
        return {name: cfg for name, cfg in self.tables.items()
                if name in present and not cfg.is_identity}

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
