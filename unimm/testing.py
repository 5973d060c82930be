"""Tiny, offline stand-ins for real checkpoints: tokenizers trained on a small corpus and random tiny
`transformers` language models, saved with `save_pretrained` so tests and the quickstart load them from a
local path exactly as they would load Qwen2.5 or LLaMA.

These are the real `transformers` classes (`Qwen2ForCausalLM`, `LlamaForCausalLM`, `Qwen2Tokenizer`,
`LlamaTokenizer`) with tiny sizes; nothing here is downloaded.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterable
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, LlamaTokenizer, PreTrainedTokenizerBase, Qwen2Tokenizer

# Qwen2-style ChatML template (the structure Qwen2/2.5 ship), so chat-template code paths are exercised.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

DEFAULT_CORPUS = [
    "a red circle on the left of the image",
    "a green square at the top right",
    "a blue triangle in the centre on a white background",
    "what colour is the shape? the shape is yellow",
    "what shape is in the picture? it is a circle",
    "describe the image in one sentence please",
    "hello world, this is a small corpus for a tiny tokenizer",
    "the quick brown fox jumps over the lazy dog 0123456789",
    "Question: where is the shape? Answer: bottom left.",
]


def build_qwen_style_tokenizer(
    save_dir: str | Path, corpus: Iterable[str] = DEFAULT_CORPUS, vocab_size: int = 400
) -> PreTrainedTokenizerBase:
    """A byte-level BPE tokenizer with Qwen2's special tokens and ChatML chat template, saved to `save_dir`."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    bpe.train_from_iterator(list(corpus) * 4, trainer=trainer)
    # Renumber from 0: the special tokens are re-added after the vocabulary and must not share ids with it.
    ordinary = sorted((i, tok) for tok, i in bpe.get_vocab().items() if tok not in specials)
    vocab = {tok: new_id for new_id, (_, tok) in enumerate(ordinary)}
    import json

    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in json.loads(bpe.to_str())["model"]["merges"]]
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges, unk_token=None, eos_token="<|im_end|>",
                               pad_token="<|endoftext|>")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.chat_template = CHATML_TEMPLATE
    tokenizer.save_pretrained(save_dir)
    return tokenizer


def build_llama_style_tokenizer(
    save_dir: str | Path, corpus: Iterable[str] = DEFAULT_CORPUS, vocab_size: int = 400
) -> PreTrainedTokenizerBase:
    """A sentencepiece BPE tokenizer (byte fallback, <s>/</s>, no chat template), loaded through
    `LlamaTokenizer` from its `tokenizer.model` and saved to `save_dir`."""
    import sentencepiece as spm

    save_dir = Path(save_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        text_file = Path(tmp) / "corpus.txt"
        text_file.write_text("\n".join(list(corpus) * 4))
        spm.SentencePieceTrainer.train(
            input=str(text_file), model_prefix=str(Path(tmp) / "tokenizer"), vocab_size=vocab_size,
            model_type="bpe", unk_id=0, bos_id=1, eos_id=2, pad_id=-1, byte_fallback=True,
            character_coverage=1.0, minloglevel=2,
        )
        tokenizer = LlamaTokenizer.from_pretrained(tmp)
    tokenizer.pad_token = tokenizer.unk_token
    tokenizer.save_pretrained(save_dir)
    return tokenizer


def tiny_llm_config(family: str = "qwen2", vocab_size: int = 512, hidden_size: int = 64, num_layers: int = 2,
                    num_heads: int = 4, num_kv_heads: int = 2, intermediate_size: int | None = None,
                    max_position_embeddings: int = 2048, **overrides):
    """A tiny random config of a real `transformers` causal-LM class (`qwen2`, `qwen3` or `llama`)."""
    if family not in ("qwen2", "qwen3", "llama"):
        raise ValueError(f"family must be 'qwen2', 'qwen3' or 'llama', got {family!r}")
    kwargs = dict(
        vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_layers,
        num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
        intermediate_size=intermediate_size or 2 * hidden_size, max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=False,
    )
    if family == "qwen3":
        kwargs["head_dim"] = hidden_size // num_heads
    kwargs.update(overrides)
    return AutoConfig.for_model(family, **kwargs)


def build_tiny_llm(save_dir: str | Path, family: str = "qwen2", tokenizer: PreTrainedTokenizerBase | None = None,
                   seed: int = 0, **config_overrides) -> Path:
    """Save a tiny random causal LM (and `tokenizer`, if given) to `save_dir`; returns the path."""
    vocab_size = len(tokenizer) if tokenizer is not None else config_overrides.pop("vocab_size", 512)
    config = tiny_llm_config(family, vocab_size=vocab_size, **config_overrides)
    if tokenizer is not None:
        config.pad_token_id = tokenizer.pad_token_id
        config.eos_token_id = tokenizer.eos_token_id
        config.bos_token_id = tokenizer.bos_token_id
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(save_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(save_dir)
    return Path(save_dir)
