import pytest
import torch

from autocompress.runtime import packing
from autocompress.runtime.packing import (
    pack_bitmap,
    pack_codes,
    packed_nbytes,
    two_four_columns,
    two_four_indices,
    unpack_bitmap,
    unpack_codes,
)


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 1001])
def test_round_trip_is_exact(bits, n):
    codes = torch.randint(0, 2**bits, (n,), generator=torch.Generator().manual_seed(n),
                          dtype=torch.uint8)
    stream = pack_codes(codes, bits)
    assert stream.dtype == torch.uint8 and stream.numel() == packed_nbytes(n, bits)
    assert torch.equal(unpack_codes(stream, bits, n), codes)


@pytest.mark.parametrize("bits", [2, 3, 5, 8])
def test_any_slice_decodes_across_chunks(bits, monkeypatch):
    monkeypatch.setattr(packing, "CHUNK_CODES", 64)  # many chunks, boundaries mid-word
    codes = torch.randint(0, 2**bits, (13, 37), dtype=torch.uint8)  # odd shape, rows unaligned
    stream = pack_codes(codes, bits)
    flat = codes.reshape(-1)
    for start, count in [(0, 481), (1, 100), (5, 200), (37, 74), (300, 181)]:
        assert torch.equal(unpack_codes(stream, bits, count, start), flat[start:start + count])


def test_bit_order_is_little_endian():
    # 3-bit codes 1..7,0 -> bits laid down LSB first, as MatMulNBits / GGML expect for 2/4/8
    codes = torch.tensor([1, 2, 3, 4, 5, 6, 7, 0], dtype=torch.uint8)
    stream = pack_codes(codes, 3)
    expected = "".join(format(int(c), "03b")[::-1] for c in codes)
    assert "".join(format(int(b), "08b")[::-1] for b in stream) == expected
    assert pack_codes(torch.tensor([0x3, 0xA], dtype=torch.uint8), 4).tolist() == [0xA3]


def test_out_of_range_codes_are_refused():
    with pytest.raises(ValueError, match="codes must lie"):
        pack_codes(torch.tensor([4]), 2)


def test_bitmap_round_trip():
    mask = torch.rand(7, 13, generator=torch.Generator().manual_seed(0)) > 0.4
    stream = pack_bitmap(mask)
    assert stream.numel() == (7 * 13 + 7) // 8
    assert torch.equal(unpack_bitmap(stream, (7, 13)), mask)


def test_two_four_indices_and_columns():
    mask = torch.tensor([[1, 0, 0, 1, 0, 1, 1, 0], [0, 0, 1, 1, 1, 1, 0, 0]], dtype=torch.bool)
    indices = two_four_indices(mask)
    assert indices.tolist() == [[0, 3, 1, 2], [2, 3, 0, 1]]
    columns = two_four_columns(indices)
    assert torch.equal(torch.zeros_like(mask).scatter(1, columns, True), mask)
    with pytest.raises(ValueError, match="not 2:4"):
        two_four_indices(torch.ones(1, 4, dtype=torch.bool))
