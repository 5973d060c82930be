"""Vocabulary extension: add UniMM's special tokens (and, in flat mode, one token per visual code) to a tokenizer
and resize the model's embedding / LM head to match.

ZeRO-3 / FSDP2: call `extend_tokenizer_and_model` on the full (unpartitioned) model, before the HF `Trainer` wraps
it, so the resize and the mean initialisation see whole matrices. If the parameters are already partitioned (the
model was built under `deepspeed.zero.Init`), the rows are written inside `unimm.utils.parallel.gathered`, which
gathers them and re-partitions rank 0's values.
"""

from __future__ import annotations

import logging

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from unimm.llm.layout import SPECIAL_TOKENS, VocabLayout
from unimm.tokenizer.types import CodebookSpec
from unimm.utils.config import renamed_arguments
from unimm.utils.parallel import full_shape, gathered

logger = logging.getLogger(__name__)

PAD_VOCAB_MULTIPLE = 128


def code_token(code: int) -> str:
    """The vocabulary string of visual code `code` in flat mode."""
    return f"<|code_{code}|>"


def _add_tokens(text_tokenizer: PreTrainedTokenizerBase, tokens: list[str]) -> list[int]:
    """Add `tokens` as special tokens (so `split_special_tokens` text can never produce them) and return their ids;
    tokens already in the vocabulary keep their ids, so extending a saved, extended tokenizer is a no-op."""
    vocab = text_tokenizer.get_vocab()
    new = [t for t in tokens if t not in vocab]
    if new:
        text_tokenizer.add_special_tokens({"additional_special_tokens": new}, replace_extra_special_tokens=False)
    return text_tokenizer.convert_tokens_to_ids(tokens)


# Scale of the sampled noise relative to the text rows' covariance, as transformers' `mean_resizing` uses.
NEW_ROW_COVARIANCE_SCALE = 1e-9


@torch.no_grad()
def _mean_init_vocab_rows(model: torch.nn.Module, rows: torch.Tensor, num_reference_rows: int) -> None:
    """`_mean_init_rows` on the input embedding and, when it is a table of its own, the LM head (gathered under
    ZeRO-3)."""
    matrices = [model.get_input_embeddings().weight]
    output = model.get_output_embeddings()
    if output is not None and output.weight is not matrices[0]:
        matrices.append(output.weight)
    with gathered(matrices, modifier_rank=0):
        for matrix in matrices:
            _mean_init_rows(matrix, rows.to(matrix.device), num_reference_rows)


def _mean_init_rows(matrix: torch.Tensor, rows: torch.Tensor, num_reference_rows: int) -> None:
    """Initialise `matrix[rows]` as transformers' `resize_token_embeddings(mean_resizing=True)` does: samples of
    N(mean, 1e-9 * covariance) of the first `num_reference_rows` rows (the trained text vocabulary), so new rows sit
    at the text rows' mean yet are distinct (identical rows of a tied LM head would tie their logits). The rows to
    set need not be the last ones: added tokens may land on unused rows a checkpoint already had. When the
    covariance is not positive definite (fewer rows than dimensions), its diagonal is used."""
    reference = matrix[:num_reference_rows].float()
    mean = reference.mean(dim=0)
    centered = reference - mean
    covariance = centered.T @ centered / num_reference_rows * NEW_ROW_COVARIANCE_SCALE
    try:
        noise = torch.distributions.MultivariateNormal(torch.zeros_like(mean), covariance_matrix=covariance)
        sample = noise.sample((len(rows),))
    except (ValueError, RuntimeError):  # not positive definite
        std = covariance.diagonal().clamp_min(torch.finfo(torch.float32).tiny).sqrt()
        sample = torch.randn(len(rows), mean.numel(), device=mean.device) * std
    matrix[rows] = (mean + sample).to(matrix.dtype)


PAD_TOKEN = "<pad>"


def ensure_pad_token(text_tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel | None = None) -> str | None:
    """Give a tokenizer without a pad token one (LLaMA-2, Vicuna and Mistral tokenizers ship none): its unk token
    where it has one, as LLaVA does for these tokenizers; else a new special token `<pad>`, whose embedding and LM
    head rows `model` gets (resized if it has no row for the new id, the row initialised like the other new rows,
    see `_mean_init_rows`). The pad never reaches the loss (the collator's padding is masked), so which token it
    is changes no training result; it is saved with the tokenizer, so inference pads with the same token.

    Call it before `extend_tokenizer_and_model`, so a new `<pad>` is part of the text vocabulary
    (`original_vocab_size`) and the visual tokens after it keep one contiguous layout. Returns the note it logs,
    or None when the tokenizer already had a pad token."""
    if text_tokenizer.pad_token_id is not None:
        return None
    unk = text_tokenizer.unk_token
    if unk is not None and text_tokenizer.unk_token_id is not None:
        text_tokenizer.pad_token = unk
        note = (f"the text tokenizer has no pad token: padding with its unk token {unk!r} "
                f"(id {text_tokenizer.unk_token_id}), as LLaVA does")
    else:
        num_text_rows = len(text_tokenizer)
        text_tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
        pad_id = text_tokenizer.pad_token_id
        note = (f"the text tokenizer has no pad token and no unk token: added {PAD_TOKEN!r} as its pad token "
                f"(id {pad_id})")
        if model is not None and pad_id >= num_text_rows:
            embeddings = model.get_input_embeddings()
            old_rows = full_shape(embeddings.weight)[0]
            if pad_id >= old_rows:
                model.resize_token_embeddings(pad_id + 1, mean_resizing=False)
                note += f"; the model's embedding rows grew {old_rows} -> {pad_id + 1}"
                if getattr(model.config, "vocab_layout", None):  # a UniMM model loaded with its layout
                    model.config.vocab_layout = {**model.config.vocab_layout, "padded_vocab_size": pad_id + 1}
            _mean_init_vocab_rows(model, torch.tensor([pad_id]), num_text_rows)
    logger.info(note)
    return note


@renamed_arguments(tokenizer="text_tokenizer")
def extend_tokenizer_and_model(
    text_tokenizer: PreTrainedTokenizerBase,
    model: PreTrainedModel,
    codebook_spec: CodebookSpec | dict,
    flat_codes: bool = False,
    pad_to_multiple_of: int = PAD_VOCAB_MULTIPLE,
) -> VocabLayout:
    """Add `<|boi|>`, `<|eoi|>`, `<|image|>`, `<|uncond|>` (and in flat mode the code tokens `<|code_k|>`, one
    contiguous block: code k -> `code_token_offset + k`) to `text_tokenizer`; resize `model`'s input embedding and LM
    head to `len(text_tokenizer)` rounded up to `pad_to_multiple_of`; initialise every new row (added tokens and
    padding) like transformers' `mean_resizing`: the mean of the existing text rows plus noise shaped by their
    covariance (see `_mean_init_rows`). Existing token ids and rows are unchanged.

    `model` is a `UniMMForCausalLM` (its config then records the layout) or any HF causal LM. Call it before
    DeepSpeed wraps the model. Returns the layout.
    """
    from unimm.llm.configuration import UniMMConfig

    spec = UniMMConfig.spec_to_dict(codebook_spec)
    if flat_codes and (len(spec) != 1 or next(iter(spec.values()))["depth"] != 1):
        raise ValueError(f"flat_codes needs a single codebook group of depth 1, got codebook_spec={spec}")
    unimm_config = getattr(model, "config", None)
    if isinstance(unimm_config, UniMMConfig):
        if unimm_config.codebook_spec != spec or unimm_config.flat_codes != flat_codes:
            raise ValueError(f"the model was built for codebook_spec={unimm_config.codebook_spec}, "
                             f"flat_codes={unimm_config.flat_codes}; got codebook_spec={spec}, flat_codes={flat_codes}")
        if unimm_config.layout is not None and unimm_config.layout.boi_token_id in text_tokenizer.get_vocab().values():
            previous = unimm_config.layout
            original_vocab_size = previous.original_vocab_size
        else:
            previous, original_vocab_size = None, len(text_tokenizer)
    else:
        previous, original_vocab_size = None, len(text_tokenizer)
    if previous is None and any(t in text_tokenizer.get_vocab() for t in SPECIAL_TOKENS):
        raise ValueError("the tokenizer already holds UniMM special tokens but the model has no layout; "
                         "load the model and tokenizer that were saved together")

    boi, eoi, image, uncond = _add_tokens(text_tokenizer, list(SPECIAL_TOKENS))
    code_offset = None
    if flat_codes:
        num_codes = next(iter(spec.values()))["num_codes"]
        code_ids = _add_tokens(text_tokenizer, [code_token(k) for k in range(num_codes)])
        code_offset = code_ids[0]
        if code_ids != list(range(code_offset, code_offset + num_codes)):
            raise RuntimeError("the tokenizer did not assign contiguous ids to the code tokens")

    embeddings = model.get_input_embeddings()
    old_rows = full_shape(embeddings.weight)[0]
    new_size = max(-(-len(text_tokenizer) // pad_to_multiple_of) * pad_to_multiple_of, old_rows)
    if new_size != old_rows:
        model.resize_token_embeddings(new_size, mean_resizing=False)
    # rows to initialise: the added tokens (which may land on unused rows a checkpoint already had) + padding
    fresh = sorted(set(range(original_vocab_size, len(text_tokenizer))) | set(range(old_rows, new_size)))
    if previous is None and fresh:
        _mean_init_vocab_rows(model, torch.tensor(fresh, dtype=torch.long), original_vocab_size)
    layout = VocabLayout(
        boi_token_id=boi, eoi_token_id=eoi, image_token_id=image, uncond_token_id=uncond,
        original_vocab_size=original_vocab_size, padded_vocab_size=new_size, codebook_spec=spec,
        flat_codes=flat_codes, code_token_offset=code_offset,
    )
    if isinstance(unimm_config, UniMMConfig):
        unimm_config.vocab_layout = layout.to_dict()
    logger.info("vocabulary extended: %d -> %d tokens (embedding rows %d -> %d)", original_vocab_size,
                len(text_tokenizer), old_rows, new_size)
    return layout
