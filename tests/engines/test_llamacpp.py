"""The llama.cpp binding: its quantizer against gguf-py's reference and the type table, the
checks that refuse a missing or mismatched library, and a GGUF run against torch."""

from __future__ import annotations

import numpy as np
import pytest

from autocompress.errors import AutocompressError

llamacpp = pytest.importorskip("autocompress.engines.llamacpp")
pytest.importorskip("xllamacpp", reason="llama.cpp (pip install 'autocompress[llamacpp]')")

from autocompress.engines.llamacpp import (  # noqa: E402
    GGUF_TYPES,
    check_layout,
    dequantize,
    library,
    quantize,
    type_for_row,
)


@pytest.fixture(scope="module")
def matrix():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((48, 512)).astype(np.float32) * 0.02
    w[:, 7] *= 40  # an outlier column, as real layers have
    return w


@pytest.mark.parametrize("name", ["q4_0", "q8_0", "q4_1", "q5_0", "q5_1"])
def test_plain_types_match_gguf_pys_reference_quantizer(matrix, name):
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize as reference

    ours = quantize(matrix, name)
    theirs = reference(matrix, GGMLQuantizationType(GGUF_TYPES[name].ggml))
    assert ours.tobytes() == np.asarray(theirs).tobytes()


def test_every_type_writes_its_block_layout_and_more_bits_mean_less_error(matrix):
    errors = {}
    for name, t in GGUF_TYPES.items():
        data = quantize(matrix, name)
        assert data.shape == (48, 512 // t.block * t.block_bytes)
        back = dequantize(data, name, matrix.shape)
        errors[name] = float(((back - matrix) ** 2).mean())
    ladder = ["q2_k", "q3_k", "q4_k", "q5_k", "q6_k", "q8_0", "f16", "f32"]
    assert all(errors[a] > errors[b] for a, b in zip(ladder, ladder[1:])), errors
    assert errors["f32"] == 0.0
    assert GGUF_TYPES["q4_k"].bits_per_weight == 4.5 and GGUF_TYPES["q2_k"].bits_per_weight == 2.625


@pytest.mark.parametrize("name", sorted(GGUF_TYPES))
def test_llamacpps_dequantizer_agrees_with_gguf_pys_on_every_type(matrix, name):
    """dequantize() runs llama.cpp's C dequantize_row_* (the sensitivity table dequantizes
    every candidate of every tensor); gguf-py's numpy code is the independent reference."""
    from autocompress.engines.llamacpp import _dequantize_numpy, _dequantize_row

    data = quantize(matrix, name)
    ours = dequantize(data, name, matrix.shape)
    if name not in ("f32", "f16", "bf16"):  # floats are a view, not a library call
        assert _dequantize_row(name) is not None, f"the library lacks dequantize_row_{name}"
    theirs = _dequantize_numpy(np.ascontiguousarray(data), name, matrix.shape)
    np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="bytes are not"):
        dequantize(data[:-1], name, matrix.shape)


@pytest.mark.parametrize("name", ["q2_k", "q3_k", "q4_k", "q6_k", "iq4_xs", "q4_0"])
def test_the_importance_matrix_lowers_the_importance_weighted_error(name):
    """Within a block the quantizer trades error between weights by their importance: with
    every fourth column 50x more important, the weighted error drops by 30-60% (measured);
    a quantizer that ignored the imatrix would not move at all."""
    w = np.random.default_rng(0).standard_normal((48, 512)).astype(np.float32) * 0.02
    importance = np.ones(512, dtype=np.float32)
    importance[::4] = 50.0

    def weighted(data):
        return float((((dequantize(data, name, w.shape) - w) ** 2) * importance).sum())

    assert weighted(quantize(w, name, importance)) < 0.8 * weighted(quantize(w, name))


@pytest.mark.parametrize("name, n, expected", [
    ("q4_k", 576, "q5_0"), ("q6_k", 576, "q8_0"), ("q2_k", 576, "q4_0"), ("q3_k", 576, "q4_0"),
    ("q5_k", 576, "q5_1"), ("iq4_xs", 576, "iq4_nl"), ("q4_k", 1536, "q4_k"),
    ("q4_0", 48, "f16"), ("q8_0", 576, "q8_0"),
])
def test_llamacpps_fallback_when_a_row_is_not_a_whole_number_of_blocks(name, n, expected):
    assert type_for_row(name, n).name == expected


def test_a_missing_library_says_how_to_install_it(monkeypatch):
    import importlib.metadata

    monkeypatch.delenv("AUTOCOMPRESS_LLAMA_LIB", raising=False)
    monkeypatch.setattr(llamacpp, "_LIBRARY", {})

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", missing)
    with pytest.raises(AutocompressError, match="pip install xllamacpp==2026.10.11549"):
        library()
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "2025.1.1")
    with pytest.raises(AutocompressError, match="2025.1.1 is installed"):
        library()


def test_a_library_path_that_is_not_there_or_not_llamacpp_is_refused(monkeypatch, tmp_path):
    monkeypatch.setattr(llamacpp, "_LIBRARY", {})
    monkeypatch.setenv("AUTOCOMPRESS_LLAMA_LIB", str(tmp_path / "libllama.so"))
    with pytest.raises(AutocompressError, match="no such file"):
        library()
    (tmp_path / "libllama.so").write_bytes(b"not a shared library")
    with pytest.raises(AutocompressError, match="cannot load llama.cpp"):
        library()
    import numpy.linalg._umath_linalg as some_extension  # a shared library, not llama.cpp

    monkeypatch.setenv("AUTOCOMPRESS_LLAMA_LIB", some_extension.__file__)
    with pytest.raises(AutocompressError, match="not a llama.cpp library"):
        library()


def test_a_library_of_another_llamacpp_version_is_refused():
    lib = library()
    check_layout(lib, "pinned")  # the pinned build passes its own check
    with pytest.raises(AutocompressError, match="differs from the llama.cpp"):
        check_layout(lib, "other", expected=(512, 2048, 512, 1, 0, 0, 4, 4, 0))


def test_a_type_that_needs_an_imatrix_or_a_bad_one_is_refused(matrix):
    with pytest.raises(AutocompressError, match="unknown GGUF type"):
        quantize(matrix, "q7_k")
    with pytest.raises(ValueError, match="one entry per input column"):
        quantize(matrix, "q4_k", np.ones(3, dtype=np.float32))
    with pytest.raises(ValueError, match="multiple of 256"):
        quantize(matrix[:, :320], "q4_k")


def test_q5_1_holds_a_q4_1_grid_exactly_when_the_quantizer_searches_its_scales():
    """Why SmolLM2's q5_1 rows with an imatrix are near lossless (README, llama.cpp results):
    its weights are Q4_1-decoded, 16 grid values per block; q5_1's 32-level grid at half the
    step holds them, which llama.cpp's weighted search finds and min-max rounding does not."""
    rng = np.random.default_rng(0)
    rows, blocks = 16, 8
    codes = rng.integers(0, 16, size=(rows, blocks, 32))
    codes[..., 0], codes[..., 1] = 0, 15  # each block spans its whole grid, as Q4_1 makes it
    step = rng.uniform(0.001, 0.01, size=(rows, blocks, 1))
    low = rng.uniform(-0.08, -0.02, size=(rows, blocks, 1))
    w = (low + step * codes).reshape(rows, blocks * 32).astype(np.float32)
    w = dequantize(quantize(w, "q4_1"), "q4_1", w.shape)  # exactly on Q4_1's grid (fp16 scales)
    weighted = dequantize(quantize(w, "q5_1", np.ones(w.shape[1], np.float32)), "q5_1", w.shape)
    plain = dequantize(quantize(w, "q5_1"), "q5_1", w.shape)
    assert np.abs(weighted - w).max() < 1e-6
    assert np.abs(plain - w).max() > 1e-4
