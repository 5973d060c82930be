"""lmms-eval's `unimm` model: UniMM models scored on lmms-eval tasks (MME, POPE, MMBench, or a local YAML task).

    python -m lmms_eval --model unimm \
        --model_args pretrained=runs/finetune_merged,visual_tokenizer=runs/tokenizer \
        --tasks mme,pope --batch_size 8 --output_path results/ --log_samples

lmms-eval finds this class through the `lmms_eval.models` entry point (pyproject.toml, `unimm.eval`). The stack
is loaded and prompts are built with `unimm.inference`, as `unimm-chat` does: the task's text is the user turn of
the model's chat format, each image an image slot in front of it (`image_slot`: the visual tokenizer's codes, or its
features when the model has a feature projector), built by the sequence builder without targets. `<image>` in a
task's text marks where its images go instead.

model_args: pretrained (UniMM model folder or LoRA checkpoint), visual_tokenizer (the visual tokenizer it was
trained with; another one is refused, as by `unimm-chat`, unless allow_visual_tokenizer_mismatch=true), dtype,
chat_format, chat_end_token, system_prompt, max_new_tokens (when the task sets none), seed
(sampled generation). --batch_size N batches prompts; --device picks the device (default: cuda if available). One
process only: lmms-eval's data-parallel launch is refused, not silently run N times.

`generate_until` cuts each answer at the first `until` string. `loglikelihood` returns what lmms-eval's API
documents: (sum of the continuation tokens' log-probabilities, is_greedy). Through the evaluator of lmms-eval 0.7.x
(0.7.0, 0.7.2 and 0.7.3 read) no loglikelihood-based task runs, for any model: it passes every response through
`unwrap_generation_output`, which turns a `(float, bool)` into a string. `multiple_choice` requests are refused
outright: lmms-eval scores them with `argmin` over these values (its own models return a loss,
EvolvingLMMs-Lab/lmms-eval#370), so once the string bug is fixed a log-probability would silently pick the least
likely choice.
"""

from __future__ import annotations

import json
import logging
import os
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any

import torch
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from PIL import Image
from tqdm import tqdm

from unimm.data.images import load_image
from unimm.data.sequence import ImageSlot, Sample, Text
from unimm.data.tasks import ChatFormatConfig
from unimm.data.templates import IMAGE_PLACEHOLDER, ChatMessage
from unimm.inference.args import InferenceArguments
from unimm.inference.chat import chat_factory, image_slot
from unimm.inference.stack import InferenceStack, load_inference_stack
from unimm.llm.generation import generate_text
from unimm.llm.layout import IGNORE_INDEX

logger = logging.getLogger(__name__)

# A multi-round task that never signals its last round would otherwise loop forever.
MAX_ROUNDS = 64
# generation_kwargs keys this model reads; others (model-specific ones such as LLaVA's image_aspect_ratio) are
# reported once and ignored.
_GENERATION_KEYS = {"until", "max_new_tokens", "temperature", "do_sample", "top_p", "num_beams"}


def _as_bool(value: Any) -> bool:
    if isinstance(value, str):
        if value.strip().lower() not in ("true", "false", "1", "0"):
            raise ValueError(f"expected true/false, got {value!r}")
        return value.strip().lower() in ("true", "1")
    return bool(value)


def _none_or(value: Any, cast: Callable[[Any], Any]) -> Any:
    return None if value is None or (isinstance(value, str) and value.lower() in ("", "none")) else cast(value)


class UniMMLmms(lmms):
    """lmms-eval model over a UniMM checkpoint (see module doc)."""

    is_simple = True  # requests carry the task's flat text; the chat format is applied here

    def __init__(self, pretrained: str, visual_tokenizer: str, device: str | None = None,
                 dtype: str = "auto", batch_size: int | str = 1, max_batch_size: int | None = None,
                 chat_format: str = "auto", chat_end_token: str | None = None, system_prompt: str | None = None,
                 max_new_tokens: int = 128, seed: int = 0, allow_visual_tokenizer_mismatch: bool = False) -> None:
        super().__init__()
        del max_batch_size  # lmms-eval passes it for --batch_size auto, which is refused below
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if world_size > 1:
            raise RuntimeError(f"the unimm model runs in one process (WORLD_SIZE={world_size}); launch lmms-eval "
                               "with `python -m lmms_eval`, not accelerate/torchrun")
        if str(batch_size).startswith("auto"):
            raise ValueError("batch_size=auto is not supported by the unimm model; pass --batch_size N")
        self.batch_size = int(batch_size)
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.max_new_tokens = int(max_new_tokens)
        self.seed = int(seed)
        self.stack: InferenceStack = load_inference_stack(InferenceArguments(
            model_path=str(pretrained), visual_tokenizer_path=str(visual_tokenizer), device=device or "auto",
            dtype=str(dtype), allow_visual_tokenizer_mismatch=_as_bool(allow_visual_tokenizer_mismatch)))
        self.model, self.tokenizer, self.device = self.stack.model, self.stack.text_tokenizer, self.stack.device
        self.factory = chat_factory(self.stack, ChatFormatConfig(
            chat_format=str(chat_format), chat_end_token=_none_or(chat_end_token, str),
            system_prompt=_none_or(system_prompt, str)))
        self._ignored_keys: set[str] = set()

    # -- prompts ----------------------------------------------------------------------------------------------
    def _doc_images(self, doc_to_visual: Callable | None, task: str, split: str, doc_id: int) -> list[Image.Image]:
        if doc_to_visual is None:
            return []
        return self._as_images(doc_to_visual(self.task_dict[task][split][doc_id]), f"{task}/{doc_id}")

    @staticmethod
    def _as_images(visuals: Any, sample_id: str) -> list[Image.Image]:
        """A task's visuals (None, one image, a list of PIL images or image paths) -> RGB images."""
        if visuals is None:
            return []
        items = visuals if isinstance(visuals, (list, tuple)) else [visuals]
        images = []
        for item in items:
            if isinstance(item, str) and item.lower().endswith((".mp4", ".avi", ".mov", ".mkv", ".webm")):
                raise ValueError(f"{sample_id}: video input ({item}) is not supported by the unimm model")
            images.append(load_image(item, sample_id).convert("RGB"))
        return images

    def _messages(self, context: str, slots: list[ImageSlot], sample_id: str) -> list[ChatMessage]:
        """One user turn: images at the task's `<image>` marks, or all in front of the text (as in training data)."""
        pieces = context.split(IMAGE_PLACEHOLDER)
        if len(pieces) > 1:
            if len(pieces) - 1 != len(slots):
                raise ValueError(f"{sample_id}: the prompt marks {len(pieces) - 1} {IMAGE_PLACEHOLDER} but the task "
                                 f"gives {len(slots)} image(s)")
            parts: list[str | ImageSlot] = [pieces[0]]
            for slot, piece in zip(slots, pieces[1:]):
                parts += [slot, piece]
        else:
            parts = [p for slot in slots for p in (slot, "\n")] + [context]
        messages = []
        if self.factory.config.system_prompt:
            messages.append(ChatMessage("system", [self.factory.config.system_prompt]))
        messages.append(ChatMessage("user", [p for p in parts if not (isinstance(p, str) and p == "")]))
        return messages

    def _segments(self, context: str, images: Sequence[Image.Image], sample_id: str) -> list:
        slots = [image_slot(self.stack, image, sample_id) for image in images]
        messages = self._messages(context, slots, sample_id)
        return self.factory.chat_format.segments(messages, sample_id, add_generation_prompt=True)

    def _batch(self, samples: Sequence[Sample], left_pad: bool) -> dict[str, Any]:
        """Padded model inputs of built samples: input_ids/attention_mask [B, L], visual_codes group -> [B, L, D]
        (-1 off code positions), image_features [images, N, C] in row order (how embed_inputs consumes them)."""
        length = max(len(s) for s in samples)
        pad_id = self.tokenizer.pad_token_id
        input_ids = torch.full((len(samples), length), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(samples), length), dtype=torch.long)
        starts = [length - len(s) if left_pad else 0 for s in samples]
        for row, (sample, start) in enumerate(zip(samples, starts)):
            input_ids[row, start:start + len(sample)] = sample.input_ids
            attention_mask[row, start:start + len(sample)] = 1
        visual_codes = None
        if any(s.visual_codes for s in samples):
            visual_codes = {}
            for name, spec in self.model.config.layout.codebook_spec.items():
                codes = torch.full((len(samples), length, spec["depth"]), -1, dtype=torch.long)
                for row, (sample, start) in enumerate(zip(samples, starts)):
                    if sample.visual_codes:
                        codes[row, start:start + len(sample)] = sample.visual_codes[name]
                visual_codes[name] = codes.to(self.device)
        features = [f for s in samples for f in s.image_features]
        image_features = torch.stack(features).to(self.device, self.model.dtype) if features else None
        return {"input_ids": input_ids.to(self.device), "attention_mask": attention_mask.to(self.device),
                "visual_codes": visual_codes, "image_features": image_features, "starts": starts}

    # -- generation -------------------------------------------------------------------------------------------
    def _generation_options(self, gen_kwargs: dict) -> tuple[dict[str, Any], list[str]]:
        unknown = set(gen_kwargs) - _GENERATION_KEYS - self._ignored_keys
        if unknown:
            logger.warning("unimm model ignores generation_kwargs %s", sorted(unknown))
            self._ignored_keys |= unknown
        if int(gen_kwargs.get("num_beams") or 1) != 1:
            raise ValueError(f"num_beams={gen_kwargs['num_beams']}: the unimm model decodes greedily or by sampling")
        until = gen_kwargs.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        temperature = float(gen_kwargs.get("temperature") or 0.0)
        do_sample = _as_bool(gen_kwargs.get("do_sample", temperature > 0)) and temperature > 0
        top_p = _none_or(gen_kwargs.get("top_p"), float)
        options = {"max_new_tokens": int(gen_kwargs.get("max_new_tokens") or self.max_new_tokens),
                   "do_sample": do_sample, "temperature": temperature if do_sample else 1.0,
                   "top_p": top_p if do_sample else None, "seed": self.seed}
        return options, until

    def _generate(self, prompts: Sequence[tuple[str, list[Image.Image], str]], options: dict,
                  until: Sequence[str]) -> list[str]:
        """Answers to (context, images, sample id) prompts, one batch."""
        samples = [self.factory.builder.build(self._segments(context, images, sample_id), sample_id, "lmms_eval",
                                              require_supervision=False) for context, images, sample_id in prompts]
        inputs = self._batch(samples, left_pad=True)
        answers = generate_text(self.model, self.tokenizer, inputs["input_ids"], inputs["attention_mask"],
                                visual_codes=inputs["visual_codes"], image_features=inputs["image_features"],
                                **options)
        return [_cut_at(answer, until) for answer in answers]

    def generate_until(self, requests: list[Instance]) -> list[str]:
        """Requests are batched by equal generation_kwargs and similar prompt length; results keep request order."""
        results: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = defaultdict(list)
        for i, request in enumerate(requests):
            groups[json.dumps(request.args[1], sort_keys=True, default=str)].append(i)
        progress = tqdm(total=len(requests), desc="unimm generate_until", disable=len(requests) < 2)
        for indices in groups.values():
            indices.sort(key=lambda i: -len(requests[i].args[0]))
            options, until = self._generation_options(dict(requests[indices[0]].args[1]))
            for begin in range(0, len(indices), self.batch_size):
                chunk = indices[begin:begin + self.batch_size]
                prompts = []
                for i in chunk:
                    context, _, doc_to_visual, doc_id, task, split = requests[i].args
                    prompts.append((context, self._doc_images(doc_to_visual, task, split, doc_id), f"{task}/{doc_id}"))
                for i, answer in zip(chunk, self._generate(prompts, options, until)):
                    results[i] = answer
                    self.cache_hook.add_partial("generate_until", requests[i].args[:2], answer)
                progress.update(len(chunk))
        progress.close()
        return results

    def generate_until_multi_round(self, requests: list[Instance]) -> list[list[str]]:
        """lmms-eval's multi-round protocol: round 0 answers the request's text and images; after each round the
        task's doc_to_text(doc, previous_output=answers so far, round_idx=r, previous_round_info=...) returns
        (visuals, text, is_last, answers, round_info) for the next. Each round is its own prompt (the task decides
        what history it carries). One list of answers per request."""
        results = []
        for request in tqdm(requests, desc="unimm multi-round", disable=len(requests) < 2):
            context, gen_kwargs, doc_to_visual, doc_to_text, doc_id, task, split = request.args
            doc = self.task_dict[task][split][doc_id]
            sample_id = f"{task}/{doc_id}"
            options, until = self._generation_options(dict(gen_kwargs))
            images = self._doc_images(doc_to_visual, task, split, doc_id)
            answers: list[str] = []
            round_info = None
            for round_idx in range(1, MAX_ROUNDS + 1):
                answers.append(self._generate([(context, images, f"{sample_id}/round{round_idx - 1}")], options,
                                              until)[0])
                visuals, context, is_last, previous, round_info = doc_to_text(
                    doc, previous_output=list(answers), round_idx=round_idx, previous_round_info=round_info)
                if previous is not None:
                    answers = list(previous)
                if is_last:
                    break
                images = self._as_images(visuals, sample_id)
            else:
                raise RuntimeError(f"{sample_id}: the task gave no last round within {MAX_ROUNDS} rounds")
            results.append(answers)
        return results

    # -- scoring ----------------------------------------------------------------------------------------------
    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        """(sum of log p(continuation token | everything before it), whether greedy decoding yields exactly the
        continuation) per request; the continuation follows the chat-formatted context where the answer starts.
        multiple_choice requests (the only ones whose continuation comes as a string) are refused: see the module
        doc."""
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        for begin in range(0, len(requests), self.batch_size):
            chunk = list(range(begin, min(begin + self.batch_size, len(requests))))
            samples = []
            for i in chunk:
                if len(requests[i].args) != 6:
                    raise ValueError(f"loglikelihood request {requests[i].args!r}: expected (context, doc_to_target, "
                                     "doc_to_visual, doc_id, task, split); acc_mutual_info is not supported")
                context, target, doc_to_visual, doc_id, task, split = requests[i].args
                sample_id = f"{task}/{doc_id}"
                if isinstance(target, str):
                    raise ValueError(f"{sample_id}: multiple_choice tasks are not supported by the unimm model: "
                                     "lmms-eval picks the choice with the smallest returned value (it expects a loss, "
                                     "EvolvingLMMs-Lab/lmms-eval#370), so log-likelihoods would pick the least "
                                     "likely choice; ask the question as a generate_until task")
                continuation = target(self.task_dict[task][split][doc_id])
                if not isinstance(continuation, str) or not continuation:
                    raise ValueError(f"{sample_id}: the continuation must be a non-empty string, got {continuation!r}")
                images = self._doc_images(doc_to_visual, task, split, doc_id)
                segments = [*self._segments(context, images, sample_id), Text(continuation, supervise=True)]
                samples.append(self.factory.builder.build(segments, sample_id, "lmms_eval"))
            for i, score in zip(chunk, self._score(samples)):
                results[i] = score
                self.cache_hook.add_partial("loglikelihood", requests[i].args[:2], score)
        return results

    @torch.no_grad()
    def _score(self, samples: Sequence[Sample]) -> list[tuple[float, bool]]:
        """Per sample: (sum of log-probs of its supervised tokens, all of them the argmax)."""
        inputs = self._batch(samples, left_pad=False)
        logits = self.model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                            visual_codes=inputs["visual_codes"], image_features=inputs["image_features"],
                            use_cache=False).logits.float()  # [B, L, V]
        logprobs = logits[:, :-1].log_softmax(-1)  # position t predicts token t + 1
        scores = []
        for row, sample in enumerate(samples):
            targets = (sample.labels != IGNORE_INDEX).nonzero().squeeze(-1).to(self.device)  # all > 0
            token_ids = sample.input_ids.to(self.device)[targets]
            predicted = logprobs[row, targets - 1]  # [T, V]
            logprob = predicted.gather(-1, token_ids[:, None]).sum()
            scores.append((float(logprob), bool((predicted.argmax(-1) == token_ids).all())))
        return scores


def _cut_at(text: str, until: Sequence[str]) -> str:
    """`text` up to the first occurrence of any stop string."""
    cut = len(text)
    for stop in until:
        if stop:
            position = text.find(stop)
            if position != -1:
                cut = min(cut, position)
    return text[:cut]
