import pytest

from autocompress.errors import AutocompressError
from autocompress.units import format_size, parse_size


@pytest.mark.parametrize("text, expected", [
    ("4GB", 4_000_000_000),
    ("3.5GiB", int(3.5 * 2**30)),
    ("80MB", 80_000_000),
    ("62000000", 62_000_000),
    ("512 KiB", 512 * 1024),
    ("1.5gb", 1_500_000_000),
])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["4 bananas", "GB", "", "-3GB", "0", "4..5GB"])
def test_parse_size_rejects_bad_input(text):
    with pytest.raises(AutocompressError):
        parse_size(text)


def test_format_size():
    assert format_size(61_234_000) == "61.2 MB"
    assert format_size(4e9) == "4 GB"
    assert format_size(176_476_800) == "176 MB"
