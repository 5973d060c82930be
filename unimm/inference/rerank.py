"""Best-of-N text-to-image by the model's own two directions (noisy-channel reranking).

A unified model can both draw an image for a prompt and read a caption off an image. For each prompt it draws the
image of the configured decoding plus `rerank_samples` sampled candidates, and keeps the candidate with the lowest

    caption NLL (the prompt as the caption of the candidate: the pretraining caption format, image codes then text)
    + image NLL (the candidate's codes under the prompt: the text-to-image format),

each the model's own training loss on that one sample (a mean over its supervised positions). An image whose shape
sits in the wrong place or has the wrong colour makes the prompt an unlikely caption of it, even where the drawing
direction preferred it; the image term keeps the choice among the drawings the model itself finds likely.
The scorer is only as good as the model's caption likelihood: on the quickstart's pretrained development models
(24 held-out captions each) greedy drew 107 of 120 and reranked 117, but after the quickstart's conversation-only
LoRA finetuning the caption NLL no longer told right images from wrong and reranking drew 104 against greedy's 106
(benchmarks/results/quickstart.md, 2026-12-08). Use it with models still trained to caption.

The candidates are read as codes, so the model must understand images from codes (a DualToken-style model); a
model with a feature projector (VQRAE's continuous features) is refused.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from unimm.data.collator import UniMMCollator
from unimm.data.sequence import ImageSlot
from unimm.data.tasks import SampleConfig, SampleFactory
from unimm.utils.errors import OptionError

# Candidate round r of batch b is drawn with seed `seed + b + r * CANDIDATE_SEED_STRIDE`: apart from the batches'
# own seeds (`seed + b`) for any run of fewer batches than the stride.
CANDIDATE_SEED_STRIDE = 1_000_003


@dataclass
class RerankChoice:
    """One prompt's choice: `chosen` is the index of the kept candidate (0 = the configured decoding, r = sampled
    round r); `caption_nll` / `image_nll` per candidate, in that order."""

    prompt: str
    chosen: int
    caption_nll: list[float]
    image_nll: list[float]

    def to_dict(self) -> dict:
        return {"prompt": self.prompt, "chosen": self.chosen, "caption_nll": self.caption_nll,
                "image_nll": self.image_nll}


def check_reranks(model) -> None:
    """Refuse a model that cannot read a candidate's codes as an image to caption."""
    if model.feature_projector is not None:
        raise OptionError("rerank_samples needs a model that reads images as codes (DualToken-style); this model "
                          "understands images through continuous features (a feature projector, e.g. VQRAE), "
                          "which the candidates' codes do not give: leave rerank_samples at 0")
    if model.visual_embedding is None:
        raise OptionError("rerank_samples needs a model with a visual code embedding (it has none)")


def _sample_losses(model, collator: UniMMCollator, samples: Sequence) -> list[float]:
    """The model's training loss on each sample alone (a mean over that sample's supervised positions)."""
    device = next(model.parameters()).device
    losses = []
    with torch.no_grad():
        for sample in samples:
            batch = collator([sample])
            batch.pop("sample_ids", None)
            batch = {k: ({g: v.to(device) for g, v in value.items()} if isinstance(value, dict) else
                         value.to(device) if isinstance(value, torch.Tensor) else value) for k, value in batch.items()}
            losses.append(float(model(**batch).loss))
    return losses


def score_candidates(model, factory: SampleFactory, collator: UniMMCollator, prompts: Sequence[str],
                     codes: dict[str, torch.Tensor]) -> tuple[list[float], list[float]]:
    """(caption NLL, image NLL) of each `prompts[i]` with its image `codes[group][i]` (`[B, N, D]`)."""
    captions, images = [], []
    for index, prompt in enumerate(prompts):
        image = {name: value[index].cpu() for name, value in codes.items()}
        captions.append(factory.caption(f"candidate-{index}", prompt, ImageSlot(codes=image)))
        images.append(factory.t2i(f"candidate-{index}", prompt, image))
    return _sample_losses(model, collator, captions), _sample_losses(model, collator, images)


def rerank(model, text_tokenizer, prompts: Sequence[str],
           candidates: Sequence[dict[str, torch.Tensor]]) -> tuple[dict[str, torch.Tensor], list[RerankChoice]]:
    """`candidates[r]`: codes `{group: [B, N, D]}` for `prompts` (round 0 the configured decoding). Returns the kept
    codes `{group: [B, N, D]}` and each prompt's `RerankChoice` (the first candidate wins a tie)."""
    if not candidates:
        raise ValueError("rerank needs at least one candidate per prompt")
    check_reranks(model)
    factory = SampleFactory(text_tokenizer, model.config.layout, SampleConfig(max_length=None, uncond_prob=0.0))
    collator = UniMMCollator(pad_token_id=text_tokenizer.pad_token_id if text_tokenizer.pad_token_id is not None
                             else text_tokenizer.eos_token_id)
    scores = [score_candidates(model, factory, collator, prompts, codes) for codes in candidates]
    choices, kept = [], {name: [] for name in candidates[0]}
    for index, prompt in enumerate(prompts):
        caption = [scores[r][0][index] for r in range(len(candidates))]
        image = [scores[r][1][index] for r in range(len(candidates))]
        chosen = min(range(len(candidates)), key=lambda r: (caption[r] + image[r], r))
        choices.append(RerankChoice(prompt, chosen, caption, image))
        for name in kept:
            kept[name].append(candidates[chosen][name][index])
    return {name: torch.stack(rows) for name, rows in kept.items()}, choices
