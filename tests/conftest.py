"""Shared pytest fixtures: a seeded tiny Llama model with a matching tiny tokenizer."""

from __future__ import annotations

import os

# Triton reads this when it is first imported (possibly by torch, before any test module runs):
# set it here so that Triton kernels run in its CPU interpreter for the whole session.
os.environ.setdefault("TRITON_INTERPRET", "1")

from pathlib import Path  # noqa: E402

import pytest
import torch

TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "A small model answers questions about numbers, words and colours.",
    "Quantization maps weights to a few levels; two bits give four levels.",
    "Please list three fruits: apple, banana, cherry.",
    "What is two plus two? Two plus two is four.",
    "Write a short poem about the sea and the sky.",
    "def add(a, b):\n    return a + b",
    "Wikipedia articles describe history, science, art and people.",
]


def build_tiny_tokenizer():
    """A byte-level BPE tokenizer (~300 tokens) with ChatML-style special tokens.

    Ids 0/1/2 are ``<|endoftext|>``, ``<|im_start|>``, ``<|im_end|>`` (eos and pad = ``<|im_end|>``),
    mirroring SmolLM2. Byte-level, so any text encodes.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
    )
    fast.chat_template = TINY_CHAT_TEMPLATE
    return fast


def build_tiny_model(vocab_size: int, seed: int = 0):
    """A seeded 2-layer ``LlamaForCausalLM`` (hidden 64, 4 heads, 2 kv heads)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    return model.eval()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """Directory with a seeded tiny Llama model + tokenizer saved with ``save_pretrained``."""
    out = tmp_path_factory.mktemp("tiny_llama")
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_model(len(tokenizer))
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture
def tiny_model(tiny_model_dir):
    """A fresh ``(model, tokenizer)`` pair loaded from :func:`tiny_model_dir` (fp32, CPU, eval)."""
    from upq.models import load_model

    return load_model(str(tiny_model_dir))
