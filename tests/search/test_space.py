from pathlib import Path

import pytest

from autocompress.errors import AutocompressError
from autocompress.plan import LayerConfig
from autocompress.search.space import SearchSpace

REPO = Path(__file__).resolve().parents[2]


def test_bundled_bits_space_equals_bits_flag():
    space = SearchSpace.from_yaml(REPO / "search_spaces" / "bits.yaml")
    assert space.options == SearchSpace.bits_only([2, 3, 4, 8]).options
    assert space.options[0] == LayerConfig(bits=2, group_size=64, sym=False, method="rtn")


@pytest.mark.parametrize("text, match", [
    ("options: [{bits: 7}]", "bits"),
    ("colours: []\noptions: []", "unknown keys"),
    ("options: 3", "options"),
    ("options: [{bits: 4", "YAML"),
])
def test_bad_space_files(tmp_path, text, match):
    path = tmp_path / "space.yaml"
    path.write_text(text)
    with pytest.raises(AutocompressError, match=match):
        SearchSpace.from_yaml(path)


def test_bad_bits_flag():
    with pytest.raises(AutocompressError, match="not supported"):
        SearchSpace.bits_only([1, 4])
