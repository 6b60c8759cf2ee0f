import pytest
import torch

from autocompress.data import TokenStream, calibration_data, default_corpus, load_stream
from autocompress.errors import AutocompressError


def test_default_corpus_parts_are_disjoint_and_deterministic():
    calib, evaluation = default_corpus("calib"), default_corpus("eval")
    assert len(calib) > 3 * len(evaluation) > 0
    assert default_corpus("eval") == evaluation
    # no paragraph of the evaluation part appears in the calibration part
    paragraphs = [p for p in evaluation.split("\n\n") if len(p.strip()) > 40]
    assert paragraphs and not any(p in calib for p in paragraphs)


def test_windows_follow_the_protocol():
    stream = TokenStream(torch.arange(100), "x")
    w = stream.windows(3, 10)
    assert torch.equal(w[1], torch.arange(10, 20))
    tail = stream.windows(2, 10, from_end=True)
    assert torch.equal(tail[-1], torch.arange(90, 100))
    with pytest.raises(AutocompressError, match="10 windows of 10"):
        stream.windows(11, 10)


def test_calibration_and_holdout_do_not_overlap(tiny_loaded):
    data = calibration_data(tiny_loaded.tokenizer, None, n_calib=4, n_holdout=2, window_len=64)
    assert data.calib.shape == (4, 64) and data.holdout.shape == (2, 64)
    stream = load_stream(tiny_loaded.tokenizer, None, "calib")
    ids = stream.ids.tolist()
    start_of_holdout = len(ids) - 2 * 64
    assert start_of_holdout >= 4 * 64
    assert data.holdout[0].tolist() == ids[start_of_holdout:start_of_holdout + 64]


def test_missing_and_empty_text_files(tmp_path, tiny_loaded):
    with pytest.raises(AutocompressError, match="not found"):
        load_stream(tiny_loaded.tokenizer, tmp_path / "nope.txt", "eval")
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(AutocompressError, match="empty"):
        load_stream(tiny_loaded.tokenizer, empty, "eval")
