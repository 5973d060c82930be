"""Generation with a `UniMMForCausalLM`.

Text -> image (`generate_images`): prefixes come from `t2i_prefix_ids` (the same function training uses). With
guidance, the conditional and unconditional prefixes run as one left-padded batch `[cond; uncond]`, so each
step costs one LLM forward. At every position and every depth the head logits of both halves are mixed as
`u + s (c - u)`, the code is sampled once (temperature / top-k / top-p, restricted to valid codes) and fed to
both halves. After N positions generation stops: `<|eoi|>` is never sampled, it follows the N-th position.
The LLM keeps a KV cache (`DynamicCache`); `use_cache=False` recomputes the whole prefix every step (the
reference for the cache test and the benchmark).

`decode` picks how the positions are decoded (same codes for the same seed under greedy decoding):
- `eager` (default): one LLM forward per position on a growing `DynamicCache`, plain PyTorch.
- `static`: a fixed-shape `StaticCache` and a mask of the final length (`unimm.llm.static_decode`), eager.
- `compile`: `static` with the LLM step and the depth heads' steps through `torch.compile` (eager where compiling
  fails).
- `jacobi` / `jacobi-compile` (flat layout): speculative Jacobi decoding (`unimm.llm.jacobi`): each forward verifies
  a window of drafted positions and keeps the accepted prefix, several positions per forward.

Image -> text (`generate_text`): visual inputs are embedded once, then HF `generate` runs on `inputs_embeds`.

Hooks, both optional and outside the decoded values: `generate_images(progress=)` is called with (positions done,
N) as each batch's positions are decoded, `generate_text(on_token=)` with each new token id as HF `generate` emits it
(through a `transformers` streamer).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers import DynamicCache, PreTrainedTokenizerBase
from transformers.generation.streamers import BaseStreamer

from unimm.llm.layout import VocabLayout, t2i_prefix_ids
from unimm.llm.modeling import UniMMForCausalLM
from unimm.llm.sampling import filter_logits, guide, sample_logits
from unimm.utils import hf_compat

__all__ = ["DECODE_MODES", "filter_logits", "generate_images", "generate_text", "guide", "prefix_batch",
           "sample_logits"]

DECODE_MODES = ("eager", "static", "compile", "jacobi", "jacobi-compile")


def _left_pad(rows: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), length), pad_id, dtype=torch.long, device=device)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.long, device=device)
    for i, row in enumerate(rows):
        input_ids[i, length - len(row):] = torch.tensor(row, device=device)
        attention_mask[i, length - len(row):] = 1
    return input_ids, attention_mask


class _ImageDecoder:
    """State of one batch of text-to-image decoding: the LLM inputs so far and (optionally) its KV cache."""

    def __init__(self, model: UniMMForCausalLM, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 use_cache: bool):
        self.model = model
        self.decoder = model.get_decoder()
        self.use_cache = use_cache
        self.attention_mask = attention_mask
        self.position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        self.inputs_embeds = model.get_input_embeddings()(input_ids)
        self.cache = DynamicCache(config=model.config.text_config) if use_cache else None
        self.hidden = self._run(self.inputs_embeds, self.position_ids)

    def _run(self, inputs_embeds: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        out = self.decoder(inputs_embeds=inputs_embeds, attention_mask=self.attention_mask, position_ids=position_ids,
                           use_cache=self.use_cache, **hf_compat.cache_kwargs(self.cache))
        return out.last_hidden_state[:, -1]  # [rows, H]

    def append(self, embeds: torch.Tensor) -> None:
        """Feed one position (`embeds [rows, H]`) and update `self.hidden` to its last hidden state."""
        rows = embeds.shape[0]
        self.attention_mask = torch.cat([self.attention_mask, self.attention_mask.new_ones(rows, 1)], dim=1)
        next_position = self.position_ids[:, -1:] + 1
        self.position_ids = torch.cat([self.position_ids, next_position], dim=1)
        # the visual modules may be float32 beside a bf16 LLM (from_llm keeps them so): feed the LLM its own dtype
        embeds = embeds.unsqueeze(1).to(self.inputs_embeds.dtype)
        if self.use_cache:
            self.hidden = self._run(embeds, next_position)
        else:
            self.inputs_embeds = torch.cat([self.inputs_embeds, embeds], 1)
            self.hidden = self._run(self.inputs_embeds, self.position_ids)

    def code_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Flat layout: the full LM head, then the code tokens' columns."""
        start, stop = self.model.config.layout.code_token_range
        return self.model.get_output_embeddings()(hidden)[..., start:stop]

    def head_logits(self, name: str, hidden: torch.Tensor, prefix: torch.Tensor) -> torch.Tensor:
        return self.model.depth_heads[name].next_logits(hidden, prefix)


@torch.no_grad()
def generate_images(
    model: UniMMForCausalLM,
    text_tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    num_positions: int | None = None,
    cfg_scale: float | None = 3.0,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
    batch_size: int | None = None,
    use_cache: bool = True,
    negative_prompts: list[str | None] | None = None,
    decode: str = "eager",
    jacobi_window: int = 16,
    stats: dict | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, torch.Tensor]:
    """Sample the codes of one image per prompt: group -> LongTensor `[len(prompts), N, D]`.

    cfg_scale:    guidance scale s (`None` = no guidance: the unconditional half is not computed).
    negative_prompts: one per prompt, the text of guidance's second branch in place of the unconditional prefix
                  (`logits = negative + s * (prompt - negative)`: the image moves away from what the negative
                  says); `None` entries keep the unconditional prefix. Needs `cfg_scale`.
    temperature:  0 = greedy. top_k / top_p: filtering applied to the guided logits.
    seed:         sampling is deterministic for a seed (one `torch.Generator` per call).
    batch_size:   prompts per batch (default: all at once).
    decode:       one of `DECODE_MODES` (see the module docstring); `jacobi_window` positions per Jacobi forward.
    stats:        if given, receives `llm_forwards` (LLM forwards, prefills included) and `image_positions`.
    progress:     if given, called as `progress(done, num_positions)` each time positions of a batch are decoded
                  (once per position; once per accepted run with Jacobi decoding), ending at
                  `(num_positions, num_positions)` for every batch. It sees counts only: the codes do not change.
    """
    layout = model.config.layout
    if layout is None:
        raise ValueError("the model has no vocabulary layout: run extend_tokenizer_and_model first")
    num_positions = num_positions or model.config.num_image_positions
    if not num_positions:
        raise ValueError("num_positions is required (or set UniMMConfig.num_image_positions, the visual tokenizer's N)")
    if not prompts:
        raise ValueError("generate_images needs at least one prompt")
    if negative_prompts is not None:
        if cfg_scale is None:
            raise ValueError("negative_prompts are guidance's second branch: set cfg_scale")
        if len(negative_prompts) != len(prompts):
            raise ValueError(f"got {len(negative_prompts)} negative_prompts for {len(prompts)} prompts")
    if decode not in DECODE_MODES:
        raise ValueError(f"decode must be one of {', '.join(DECODE_MODES)}, got {decode!r}")
    if decode != "eager" and not use_cache:
        raise ValueError(f"decode={decode!r} decodes on a KV cache: use_cache=False is only for decode='eager'")
    if decode.startswith("jacobi"):
        if not model.config.flat_codes:
            raise ValueError(f"decode={decode!r} needs the flat layout (one codebook of depth 1); "
                             "depth-head models decode with 'eager', 'static' or 'compile'")
        if jacobi_window < 2:
            raise ValueError(f"jacobi_window must be at least 2, got {jacobi_window}")
    position_table = model.image_position_embedding
    if position_table is not None and num_positions > position_table.num_embeddings:
        raise ValueError(f"num_positions={num_positions} exceeds the model's image position embedding "
                         f"(num_image_positions={position_table.num_embeddings})")
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    batch_size = batch_size or len(prompts)
    was_training = model.training
    model.eval()
    forwards = 0
    try:
        chunks = []
        for i in range(0, len(prompts), batch_size):
            batch_negatives = None if negative_prompts is None else negative_prompts[i : i + batch_size]
            input_ids, attention_mask = prefix_batch(text_tokenizer, layout, prompts[i : i + batch_size], cfg_scale,
                                                     batch_negatives, device)
            sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
            if decode.startswith("jacobi"):
                from unimm.llm.jacobi import jacobi_decode

                codes, used = jacobi_decode(model, input_ids, attention_mask, num_positions, cfg_scale, sampling,
                                            window=jacobi_window, compile=decode == "jacobi-compile",
                                            progress=progress)
            else:
                codes, used = _generate_batch(model, input_ids, attention_mask, num_positions, cfg_scale, sampling,
                                              use_cache, decode, progress)
            chunks.append(codes)
            forwards += used
    finally:
        model.train(was_training)
    if stats is not None:
        stats["llm_forwards"] = stats.get("llm_forwards", 0) + forwards
        stats["image_positions"] = stats.get("image_positions", 0) + num_positions * len(chunks)
    return {name: torch.cat([c[name] for c in chunks]) for name in chunks[0]}


def prefix_batch(text_tokenizer: PreTrainedTokenizerBase, layout: VocabLayout, prompts: list[str],
                 cfg_scale: float | None, negative_prompts: list[str | None] | None,
                 device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded `input_ids, attention_mask` of the t2i prefixes: `[cond]`, or `[cond; uncond]` with guidance
    (the negative prompts' prefixes in place of the unconditional one where given)."""
    rows = [t2i_prefix_ids(text_tokenizer, layout, p) for p in prompts]
    if cfg_scale is not None:
        rows += [t2i_prefix_ids(text_tokenizer, layout, n) for n in (negative_prompts or [None] * len(prompts))]
    pad_id = text_tokenizer.pad_token_id if text_tokenizer.pad_token_id is not None else layout.eoi_token_id
    return _left_pad(rows, pad_id, device)


def _generate_batch(model: UniMMForCausalLM, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    num_positions: int, cfg_scale: float | None, sampling: dict, use_cache: bool,
                    decode: str, progress: Callable[[int, int], None] | None = None
                    ) -> tuple[dict[str, torch.Tensor], int]:
    """Sequential decoding of one batch: codes `{group: [B, N, D]}` and the number of LLM forwards; `progress(p, N)`
    after position p's codes are drawn."""
    layout = model.config.layout
    if decode == "eager":
        state = _ImageDecoder(model, input_ids, attention_mask, use_cache)
    else:
        from unimm.llm.static_decode import StaticImageDecoder

        state = StaticImageDecoder(model, input_ids, attention_mask, num_positions, compile=decode == "compile")
    forwards = 1
    halves = 2 if cfg_scale is not None else 1
    batch = input_ids.shape[0] // halves
    groups = model.config.groups
    codes: dict[str, list[torch.Tensor]] = {name: [] for name in groups}
    for position in range(num_positions):
        if model.config.flat_codes:
            (name,) = groups
            logits = state.code_logits(state.hidden)  # valid codes only
            code = sample_logits(guide(logits.float(), cfg_scale), **sampling)  # [B]
            codes[name].append(code.unsqueeze(-1))
            next_embeds = model.get_input_embeddings()(layout.code_to_token(code).repeat(halves))
            next_embeds = model.add_image_position(next_embeds, position)
        else:
            position_codes = {}
            for name, head in model.depth_heads.items():
                prefix = state.hidden.new_zeros((state.hidden.shape[0], 0), dtype=torch.long)
                for _ in range(head.depth):
                    logits = state.head_logits(name, state.hidden, prefix).float()  # [rows, K]
                    code = sample_logits(guide(logits, cfg_scale), **sampling)  # [B]
                    prefix = torch.cat([prefix, code.repeat(halves).unsqueeze(-1)], dim=1)
                position_codes[name] = prefix
                codes[name].append(prefix[:batch])
            next_embeds = model.add_image_position(model.visual_embedding(position_codes), position)
        if progress is not None:
            progress(position + 1, num_positions)
        if position + 1 < num_positions:
            state.append(next_embeds)
            forwards += 1
    return {name: torch.stack(steps, dim=1) for name, steps in codes.items()}, forwards  # [B, N, D]


@torch.no_grad()
def generate_text(
    model: UniMMForCausalLM,
    text_tokenizer: PreTrainedTokenizerBase,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    visual_codes: dict[str, torch.Tensor] | None = None,
    image_features: torch.Tensor | None = None,
    max_new_tokens: int = 32,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float | None = None,
    seed: int = 0,
    on_token: Callable[[int], None] | None = None,
) -> list[str]:
    """Answer text for (image +) text inputs (left-padded `input_ids [B, L]` with visual positions as in
    training); greedy unless `do_sample`. Returns the decoded new text of each row.

    on_token: called with each new token id as it is generated (one row only; the end-of-sequence token included,
              as `generate` emits it); the returned text is the same with or without it."""
    if on_token is not None and input_ids.shape[0] != 1:
        raise ValueError(f"on_token streams one answer: got {input_ids.shape[0]} rows of input_ids")
    if do_sample:
        torch.manual_seed(seed)
    if model.config.flat_codes and visual_codes:
        input_ids, _ = model.flatten_visual_inputs(input_ids, None, visual_codes)
        visual_codes = None
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    was_training = model.training
    model.eval()
    try:
        inputs_embeds = model.embed_inputs(input_ids, visual_codes, image_features)
        sampling = dict(temperature=temperature, top_p=top_p) if do_sample else {}
        output_ids = model.generate(
            inputs_embeds=inputs_embeds, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
            do_sample=do_sample, pad_token_id=text_tokenizer.pad_token_id, eos_token_id=text_tokenizer.eos_token_id,
            streamer=None if on_token is None else _TokenCallback(on_token), **sampling,
        )
    finally:
        model.train(was_training)
    return text_tokenizer.batch_decode(output_ids, skip_special_tokens=True)


class _TokenCallback(BaseStreamer):
    """A `generate` streamer calling `on_token(id)` for each new token of a one-row batch. `generate` first puts the
    prompt (here the empty `input_ids` beside `inputs_embeds`), which is skipped."""

    def __init__(self, on_token: Callable[[int], None]):
        self.on_token = on_token
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        for token in value.reshape(-1).tolist():
            self.on_token(int(token))

    def end(self) -> None:
        pass
