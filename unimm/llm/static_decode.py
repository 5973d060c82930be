"""A fixed-shape decode step for text-to-image generation: the LLM writes its keys and values into a transformers
`StaticCache` sized for the prefix plus every image position, and the attention mask covers that whole length from
the start, so every decode step sees tensors of the same shapes. That is what lets `torch.compile` (and, on CUDA,
CUDA graphs through `mode="reduce-overhead"`) turn the step into one graph instead of hundreds of Python-dispatched
operators.

`StaticImageDecoder` is a drop-in for the state `generate_images` keeps (`hidden`, `append`), adds `extend` (several
positions in one forward, for Jacobi decoding) and `rewind` (forget the last positions: a static cache only moves its
write index back), and gives the logits of the flat layout's code tokens from the code rows of the LM head alone.
With `compile=True` the LLM step and the depth heads' steps go through `torch.compile`; where compiling fails (no
C++ compiler, an unsupported backend) one warning is printed and the same functions run eagerly.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable

import torch
from torch.nn import functional as F
from transformers import StaticCache

from unimm.llm.modeling import UniMMForCausalLM
from unimm.utils import hf_compat

# Graphs one compiled function may keep: the LLM step compiles once per number of positions fed at a time (1, and the
# Jacobi window), a depth head once per depth; torch's default limit (8) would drop paper-shaped heads back to eager.
RECOMPILE_LIMIT = 64
# torch.compile backend ("inductor": generated C++ / Triton kernels; "aot_eager" traces the same graphs but runs
# them with eager kernels, which the tests use because inductor takes minutes to warm up on a 2-core CPU).
COMPILE_BACKEND = "inductor"
# Compiled decoding rounds the cache length up to a multiple of this, so that batches whose prompts differ in length
# (and images of nearby sizes) share one compiled graph instead of compiling one each.
CACHE_LENGTH_BUCKET = 256


def _recompile_limit() -> contextlib.AbstractContextManager:
    from unimm.utils.hf_compat import dynamo_recompile_limit

    return dynamo_recompile_limit(RECOMPILE_LIMIT)


class MaybeCompiled:
    """`fn` through `torch.compile`, or `fn` itself when `enabled` is False or compiling fails. `before_retry` runs
    before the eager retry of a call whose compiled run failed (it undoes what that attempt may have changed). After
    one failure with a backend, later instances in the process do not try that backend again."""

    failed_backends: set[str] = set()

    def __init__(self, fn: Callable, enabled: bool, mode: str | None = None,
                 before_retry: Callable[[], None] | None = None):
        self.fn = fn
        self.before_retry = before_retry
        self.backend = COMPILE_BACKEND
        enabled = enabled and self.backend not in self.failed_backends
        if enabled and self.backend != "inductor":
            mode = None  # modes are inductor's
        self.compiled = torch.compile(fn, dynamic=False, mode=mode, backend=self.backend) if enabled else None

    @property
    def is_compiled(self) -> bool:
        return self.compiled is not None

    def __call__(self, *args):
        if self.compiled is not None:
            try:
                with _recompile_limit():
                    return self.compiled(*args)
            except Exception as error:  # noqa: BLE001 - any compiler failure: fall back, the eager run re-raises model errors
                first_line = (str(error).splitlines() or [""])[0][:200]
                warnings.warn(f"torch.compile failed ({type(error).__name__}: {first_line}); decoding eagerly",
                              RuntimeWarning, stacklevel=2)
                self.compiled = None
                self.failed_backends.add(self.backend)
                if self.before_retry is not None:
                    self.before_retry()
        return self.fn(*args)


class StaticImageDecoder:
    """LLM state of one batch of text-to-image decoding on a `StaticCache` of at least `prefix + capacity` positions.

    input_ids / attention_mask: the left-padded prefixes `[rows, L]` (`[cond; uncond]` with guidance).
    capacity: image positions that may be fed after the prefix (Jacobi decoding needs its window beyond N).
    """

    def __init__(self, model: UniMMForCausalLM, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 capacity: int, compile: bool = False):
        self.model = model
        self.decoder = model.get_decoder()
        rows, prefix = input_ids.shape
        self.prefix_length = prefix
        length = prefix + capacity
        if compile:  # eager steps gain nothing from a longer cache: every step attends over its whole length
            length = -(-length // CACHE_LENGTH_BUCKET) * CACHE_LENGTH_BUCKET
        self.cache = StaticCache(config=model.config.text_config, max_cache_len=length)
        # One mask for the whole run: the positions not yet written are hidden by causality, not by the mask.
        self.attention_mask = torch.cat([attention_mask, attention_mask.new_ones(rows, length - prefix)], dim=1)
        self.first_position = attention_mask.sum(-1, keepdim=True)  # position id of image position 0, [rows, 1]
        self.length = 0  # image positions in the cache
        embeddings = model.get_input_embeddings()
        self.dtype = embeddings.weight.dtype
        layout = model.config.layout
        self.code_weight = self.code_bias = None
        if model.config.flat_codes and layout is not None:
            start, stop = layout.code_token_range
            head = model.get_output_embeddings()
            self.code_weight = head.weight[start:stop]
            self.code_bias = None if getattr(head, "bias", None) is None else head.bias[start:stop]
        mode = "reduce-overhead" if compile and input_ids.device.type == "cuda" else None
        self._graph_outputs = mode is not None  # CUDA graphs overwrite their outputs at the next replay
        self._step = MaybeCompiled(self._forward, compile, mode, before_retry=self._restore_write_index)
        self._saved_lengths: list[torch.Tensor] = []
        self._heads: dict[str, MaybeCompiled] = {}
        self._compile = compile
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        self.hidden = self._forward(embeddings(input_ids), position_ids)[:, -1]  # the prefill runs eagerly

    @property
    def is_compiled(self) -> bool:
        return self._step.is_compiled

    def _forward(self, inputs_embeds: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        out = self.decoder(inputs_embeds=inputs_embeds, attention_mask=self.attention_mask, position_ids=position_ids,
                           use_cache=True, **hf_compat.cache_kwargs(self.cache))
        return out.last_hidden_state

    def _layers(self) -> list:
        return list(self.cache.layers)

    def _restore_write_index(self) -> None:
        for layer, saved in zip(self._layers(), self._saved_lengths):
            if getattr(layer, "is_initialized", False):
                layer.cumulative_length.copy_(saved)

    def extend(self, embeds: torch.Tensor) -> torch.Tensor:
        """Feed `embeds [rows, T, H]` as the next T image positions; returns their last hidden states `[rows, T, H]`
        (also kept: `self.hidden` is the last one's)."""
        steps = embeds.shape[1]
        offsets = torch.arange(self.length, self.length + steps, device=embeds.device)
        position_ids = self.first_position + offsets
        self._saved_lengths = [layer.cumulative_length.clone() for layer in self._layers()]
        hidden = self._step(embeds.to(self.dtype), position_ids)
        if self._graph_outputs:
            hidden = hidden.clone()
        self.length += steps
        self.hidden = hidden[:, -1]
        return hidden

    def append(self, embeds: torch.Tensor) -> None:
        """Feed one position (`embeds [rows, H]`) and update `self.hidden` to its last hidden state."""
        self.extend(embeds.unsqueeze(1))

    def rewind(self, steps: int) -> None:
        """Forget the last `steps` image positions (the next `extend` overwrites them)."""
        if steps <= 0:
            return
        if steps > self.length:
            raise ValueError(f"cannot rewind {steps} positions: only {self.length} are cached")
        self.cache.crop(-steps)
        self.length -= steps

    def code_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Flat layout: logits of the code tokens only (`[..., K]`), from the LM head's code rows."""
        return F.linear(hidden, self.code_weight, self.code_bias)

    def head_logits(self, name: str, hidden: torch.Tensor, prefix: torch.Tensor) -> torch.Tensor:
        """`depth_heads[name].next_logits`, compiled along with the LLM step when this decoder compiles."""
        if name not in self._heads:
            self._heads[name] = MaybeCompiled(self.model.depth_heads[name].next_logits, self._compile)
        return self._heads[name](hidden, prefix)
