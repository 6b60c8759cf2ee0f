"""A llama.cpp-style fixed recipe: the hand-made mix the search is compared against.

llama.cpp's Q*_K_M types keep every block linear at a base type and give ``v_proj`` and
``down_proj`` (the layers it treats as most sensitive) a larger one in the first and last eighth
of the blocks and in every third block (llama.cpp's ``use_more_bits`` offsets the third blocks by
n/8; here they are b % 3 == 0). Both types are RTN, asymmetric, at group 64 or, as llama.cpp's
K-quants' larger super-blocks, group 128 (cheaper scales: Q3_K_S-like sizes sit between the
group-64 widths), so the recipe differs from a uniform plan only in where its bits go.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterable

from ..accounting import layer_bytes
from ..plan import LayerConfig

if TYPE_CHECKING:  # any object with name, kind, block, out/in_features will do
    from ..model import LayerInfo as Layer

BOOSTED_KINDS = ("v", "down")
# (base, boost) bits, roughly in increasing size; the best that fits is chosen by bytes, not order
DEFAULT_PAIRS = ((2, 3), (2, 4), (3, 4), (3, 5), (3, 6), (4, 5), (4, 6), (4, 8), (5, 6), (5, 8),
                 (6, 8), (8, 16))
GROUP_SIZE = 64


def boosted_blocks(n_blocks: int) -> list[int]:
    """Blocks whose v and down get the larger type: first and last eighth, every third block."""
    eighth = max(1, n_blocks // 8)
    return [b for b in range(n_blocks) if b < eighth or b >= n_blocks - eighth or b % 3 == 0]


def llama_cpp_configs(layers: Iterable[Layer], n_blocks: int, base: int,
                      boost: int, group_size: int = GROUP_SIZE) -> dict[str, LayerConfig]:
    """Per-layer configs of the recipe; only block linears (a head has no block) are included."""
    boosted = set(boosted_blocks(n_blocks))
    low = LayerConfig(bits=base, group_size=group_size)
    high = LayerConfig(bits=boost, group_size=group_size)
    return {layer.name: high if layer.kind in BOOSTED_KINDS and layer.block in boosted else low
            for layer in layers if layer.block is not None}


def recipe_label(base: int, boost: int, group_size: int = GROUP_SIZE) -> str:
    group = "" if group_size == GROUP_SIZE else f" g{group_size}"
    return (f"llama.cpp-style {base}/{boost}{group} "
            f"(v, down at {boost} bits in first/last eighth + every third block)")


def recipe_bytes(layers: Iterable[Layer], configs: dict[str, LayerConfig]) -> int:
    """Summed bytes of the block linears under ``configs``."""
    return sum(layer_bytes(layer.out_features, layer.in_features, configs[layer.name])
               for layer in layers if layer.name in configs)


def best_llama_cpp_recipe(layers: Iterable[Layer], n_blocks: int, capacity_bytes: int,
                          pairs: Iterable[tuple[int, int]] = DEFAULT_PAIRS,
                          group_sizes: Iterable[int] = (GROUP_SIZE, 128),
                          ) -> tuple[str, dict[str, LayerConfig]] | None:
    """The largest recipe among ``pairs`` whose block-linear bytes fit in ``capacity_bytes``
    (the fairest baseline at a budget: it uses as much of it as it can); None if none fits.
    Among equal sizes the first pair listed wins."""
    layers = list(layers)
    best: tuple[int, str, dict[str, LayerConfig]] | None = None
    for group_size in group_sizes:
        for base, boost in pairs:
            configs = llama_cpp_configs(layers, n_blocks, base, boost, group_size)
            size = recipe_bytes(layers, configs)
            if size <= capacity_bytes and (best is None or size > best[0]):
                best = (size, recipe_label(base, boost, group_size), configs)
    return None if best is None else (best[1], best[2])
