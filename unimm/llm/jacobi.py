"""Speculative Jacobi decoding of the flat layout's image codes (after SJD, arXiv 2410.01699): several future
positions are drafted, one LLM forward verifies them all, and the accepted prefix is kept.

Each iteration feeds a window of W tokens: the last committed code (not yet in the KV cache) and W-1 drafts for the
positions after it. The forward gives the guided logits of W positions: position j's logits are conditioned on the
drafts before it. Drafts are checked left to right:
- greedy: a draft is accepted when it equals the argmax of its logits;
- sampling: a draft d drawn from q is accepted with probability min(1, p(d) / q(d)) (p: the model's processed
  distribution, temperature / top-k / top-p as `sample_logits`); at the first rejection the code is drawn from the
  residual `max(0, p - q)` renormalised, so every committed code is distributed as sequential sampling draws it.
The accepted drafts plus one more code (the argmax, the residual draw, or a plain draw when every draft passed) are
committed, so every forward commits at least one position and greedy output equals sequential decoding. With a
batch the shortest accepted run over the rows is kept (rows that accepted further keep their accepted draft at the
next position). The KV cache (a `StaticCache`) forgets the entries of rejected drafts by moving its write index back.

Next drafts: the window's predictions beyond the accepted prefix (Jacobi iteration: the greedy codes, or codes drawn
from p with q = p), and for the new tail of the window the code one grid row above (square images: N a perfect
square), else the code before it; those drafts are deterministic (q is a point mass).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from unimm.llm.modeling import UniMMForCausalLM
from unimm.llm.sampling import filter_logits, guide, sample_logits
from unimm.llm.static_decode import StaticImageDecoder


def _processed_probs(logits: torch.Tensor, sampling: dict) -> torch.Tensor:
    """The distribution `sample_logits` draws from (temperature > 0)."""
    return filter_logits(logits / sampling["temperature"], sampling.get("top_k"), sampling.get("top_p")).softmax(-1)


def _leading_run(accepted: torch.Tensor) -> int:
    """`accepted [B, T]` -> the shortest run of leading True over the rows."""
    return int(accepted.long().cumprod(dim=1).sum(dim=1).min())


def _fill(sequence: torch.Tensor, start: int, stop: int, row_width: int | None) -> None:
    """Deterministic drafts for positions [start, stop) of `sequence [B, L]`: the code one image row above where the
    image is square, else the code before."""
    for position in range(start, stop):
        source = position - row_width if row_width is not None and position >= row_width else position - 1
        sequence[:, position] = sequence[:, source]


@torch.no_grad()
def jacobi_decode(model: UniMMForCausalLM, input_ids: torch.Tensor, attention_mask: torch.Tensor, num_positions: int,
                  cfg_scale: float | None, sampling: dict, window: int = 16, compile: bool = False,
                  progress: Callable[[int, int], None] | None = None) -> tuple[dict[str, torch.Tensor], int]:
    """Codes `{group: [B, N, 1]}` of one batch of flat-layout prefixes (`[cond; uncond]` with guidance) and the
    number of LLM forwards (the prefill included); `progress(committed, N)` after every commit."""
    layout = model.config.layout
    (name,) = model.config.groups
    halves = 2 if cfg_scale is not None else 1
    batch = input_ids.shape[0] // halves
    greedy = sampling["temperature"] <= 0
    generator = sampling.get("generator")
    embed = model.get_input_embeddings()
    table = model.image_position_embedding
    side = math.isqrt(num_positions)
    row_width = side if side * side == num_positions and side > 1 else None
    drafts_per_window = window - 1

    state = StaticImageDecoder(model, input_ids, attention_mask, num_positions + window, compile=compile)
    forwards = 1
    # committed codes, then the drafts of the current window; room for a window beyond N
    sequence = input_ids.new_zeros((batch, num_positions + 2 * window))
    first_logits = guide(state.code_logits(state.hidden).float(), cfg_scale)
    sequence[:, 0] = sample_logits(first_logits, **sampling)
    committed = 1
    if progress is not None:
        progress(committed, num_positions)
    _fill(sequence, 1, 1 + drafts_per_window, row_width)
    num_codes = first_logits.shape[-1]
    # q of each draft (sampling only); the filled drafts' q are point masses
    draft_probs = None
    if not greedy:
        draft_probs = torch.nn.functional.one_hot(sequence[:, 1:window], num_codes).float()

    while committed < num_positions:
        start = committed - 1  # the window covers positions start .. start + window - 1
        tokens = sequence[:, start : start + window]
        embeds = embed(layout.code_to_token(tokens))
        if table is not None:
            index = torch.arange(start, start + window, device=tokens.device).clamp(max=table.num_embeddings - 1)
            embeds = embeds + table.weight[index].to(embeds.dtype)
        hidden = state.extend(embeds.repeat(halves, 1, 1))
        forwards += 1
        logits = guide(state.code_logits(hidden).float(), cfg_scale)  # [B, W, K]: entry j predicts start + 1 + j
        drafts = tokens[:, 1:]  # [B, W-1], positions committed .. committed + W - 2
        if greedy:
            predicted = logits.argmax(dim=-1)  # [B, W]
            run = _leading_run(predicted[:, :-1] == drafts)
            sequence[:, committed : committed + run + 1] = predicted[:, : run + 1]
            carried = predicted[:, run + 1 :]
        else:
            probs = _processed_probs(logits, sampling)  # [B, W, K]
            p_draft = probs[:, :-1].gather(-1, drafts.unsqueeze(-1)).squeeze(-1)
            q_draft = draft_probs.gather(-1, drafts.unsqueeze(-1)).squeeze(-1)
            uniform = torch.rand(p_draft.shape, generator=generator, device=p_draft.device)
            accepted = uniform * q_draft < p_draft
            run = _leading_run(accepted)
            if run == drafts_per_window:
                last = torch.multinomial(probs[:, -1], 1, generator=generator).squeeze(-1)
            else:
                residual = (probs[:, run] - draft_probs[:, run]).clamp(min=0)
                empty = residual.sum(-1, keepdim=True) <= 0
                residual = torch.where(empty, probs[:, run], residual)
                redrawn = torch.multinomial(residual, 1, generator=generator).squeeze(-1)
                last = torch.where(accepted[:, run], drafts[:, run], redrawn)
            sequence[:, committed : committed + run] = drafts[:, :run]
            sequence[:, committed + run] = last
            carried_probs = probs[:, run + 1 :]
            carried = (torch.multinomial(carried_probs.flatten(0, 1), 1, generator=generator).view(batch, -1)
                       if carried_probs.shape[1] else drafts[:, :0])
        # keep the cache entries of the inputs that are now committed: the window's first token and `run` drafts
        state.rewind(window - (run + 1))
        committed += run + 1
        if progress is not None:
            progress(min(committed, num_positions), num_positions)
        sequence[:, committed : committed + carried.shape[1]] = carried
        _fill(sequence, committed + carried.shape[1], committed + drafts_per_window, row_width)
        if not greedy:
            filled = sequence[:, committed + carried.shape[1] : committed + drafts_per_window]
            draft_probs = torch.cat([carried_probs, torch.nn.functional.one_hot(filled, num_codes).float()], dim=1)
    return {name: sequence[:, :num_positions].unsqueeze(-1)}, forwards
