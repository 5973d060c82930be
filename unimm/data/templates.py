"""Chat formatting: conversation turns -> segments with exactly the assistant answers (and their end token)
supervised.

With a tokenizer that ships a chat template (Qwen ChatML, LLaMA-3 ...) the template itself decides the format:
each message's content is replaced by a sentinel, the template is rendered once, and the text between sentinels
becomes unsupervised scaffolding. The real rendering is then checked to equal scaffolding + contents, so a
template that rewrites content fails loudly with the sample id instead of producing shifted labels. Tokenizers
without a template use a named format: `llama-2` (`<s>[INST] user [/INST] answer </s>`) or `plain`.

LLaVA-1.5's own conversation formats are named by LLaVA's `--version` values: `v1` (vicuna v1) and
`llava_llama_2`, plus `llava_plain` for LLaVA's `plain` (stage-1 captions: image, answer, newline). `v1` and
`llava_llama_2` render exactly the prompt text of LLaVA's templates (`conv_templates[version].get_prompt()` in
haotian-liu/LLaVA `llava/conversation.py`, after `preprocess_multimodal` in `llava/train/train.py` has moved each
image to the start of its message), but their labels come from segments like every other format's: LLaVA's
re-tokenising label masks (off by one without a legacy tokenizer or BOS; whole samples zeroed when user text holds
`</s>`) are not reproduced, and user text such as `</s>` stays text.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

from transformers import PreTrainedTokenizerBase

from unimm.data.sequence import ImageSlot, MalformedRecordError, Segment, Text, TokenIds
from unimm.utils.config import renamed_arguments

logger = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant")
_SENTINEL = "@@UNIMM_CONTENT_{}@@"
IMAGE_PLACEHOLDER = "<image>"  # how an image inside a message is written when the template is rendered as text


@dataclass
class ChatMessage:
    """One turn. `parts` mixes text and image slots in reading order."""

    role: str
    parts: list[str | ImageSlot] = field(default_factory=list)

    @property
    def text(self) -> str:
        return "".join(p if isinstance(p, str) else IMAGE_PLACEHOLDER for p in self.parts)


def _check_roles(messages: Sequence[ChatMessage], sample_id: str, add_generation_prompt: bool) -> None:
    turns = [m for m in messages if m.role != "system"]
    if any(m.role == "system" for m in messages[1:]):
        raise MalformedRecordError(sample_id, "a system message may only come first")
    bad = [m.role for m in messages if m.role not in ROLES]
    if bad:
        raise MalformedRecordError(sample_id, f"unknown role(s) {bad}; expected {list(ROLES)}")
    if not turns:
        raise MalformedRecordError(sample_id, "conversation has no turns")
    for i, message in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if message.role != expected:
            raise MalformedRecordError(sample_id, f"turn {i} is from {message.role!r}, expected {expected!r} "
                                                  "(turns must alternate, starting with the user/human)")
    last = turns[-1].role
    if add_generation_prompt and last != "user":
        raise MalformedRecordError(sample_id, "a generation prompt needs the conversation to end with a user turn")
    if not add_generation_prompt and last != "assistant":
        raise MalformedRecordError(sample_id, "conversation ends with a user turn: it has no answer to train on")


def _content_segments(parts: Sequence[str | ImageSlot], supervise: bool) -> list[Segment]:
    return [Text(part, supervise=supervise) if isinstance(part, str) else part for part in parts if part != ""]


def _answer_segments(parts: Sequence[str | ImageSlot], eos_token_id: int, before_eos: str = "") -> list[Segment]:
    """An assistant turn after its role marker: a space, the supervised answer, then the supervised turn end
    (`before_eos`, if any, and EOS)."""
    out = [Text(" "), *_content_segments(parts, supervise=True)]
    if before_eos:
        out.append(Text(before_eos, supervise=True))
    return out + [TokenIds([eos_token_id], supervise=True)]


class ChatFormat:
    """Base class: `segments(messages, sample_id)` for training, `add_generation_prompt=True` for inference."""

    name = "base"

    def __init__(self, text_tokenizer: PreTrainedTokenizerBase):
        self.text_tokenizer = text_tokenizer

    def segments(self, messages: Sequence[ChatMessage], sample_id: str,
                 add_generation_prompt: bool = False) -> list[Segment]:
        raise NotImplementedError


class HFChatTemplateFormat(ChatFormat):
    """Formats with the tokenizer's own chat template (see module doc). `end_token` is the token that closes an
    assistant turn and is supervised with it; by default the first special token the template puts right after
    the assistant content (`<|im_end|>` for Qwen)."""

    name = "chat_template"

    def __init__(self, text_tokenizer: PreTrainedTokenizerBase, end_token: str | None = None):
        super().__init__(text_tokenizer)
        if not getattr(text_tokenizer, "chat_template", None):
            raise ValueError(f"{type(text_tokenizer).__name__} has no chat template; use chat_format='llama-2' or "
                             "'plain'")
        self.end_token = end_token

    def _render(self, messages: Sequence[dict], add_generation_prompt: bool, sample_id: str) -> str:
        try:
            return self.text_tokenizer.apply_chat_template(list(messages), tokenize=False,
                                                      add_generation_prompt=add_generation_prompt)
        except Exception as err:  # jinja raise_exception(...) in the template, or a rendering error
            raise MalformedRecordError(sample_id, f"the chat template refused the conversation: {err}") from err

    def _end_token(self, suffix: str, sample_id: str) -> str:
        """The end token after an assistant answer, with any spaces the template puts before it (`' </s>'`)."""
        if self.end_token is not None:
            candidates = [self.end_token]
        else:
            candidates = sorted(set(self.text_tokenizer.get_added_vocab()) | {self.text_tokenizer.eos_token or ""},
                                key=len, reverse=True)
        stripped = suffix.lstrip(" ")
        for token in candidates:
            if token and stripped.startswith(token):
                return suffix[: len(suffix) - len(stripped)] + token
        raise MalformedRecordError(sample_id, f"the chat template puts {suffix[:40]!r} after an assistant answer, "
                                              f"which does not start with an end token {candidates[:5]}; set "
                                              "chat_end_token")

    def segments(self, messages: Sequence[ChatMessage], sample_id: str,
                 add_generation_prompt: bool = False) -> list[Segment]:
        _check_roles(messages, sample_id, add_generation_prompt)
        sentinels = [_SENTINEL.format(i) for i in range(len(messages))]
        scaffold = self._render([{"role": m.role, "content": s} for m, s in zip(messages, sentinels)],
                                add_generation_prompt, sample_id)
        pieces: list[str] = []
        rest = scaffold
        for sentinel in sentinels:
            before, found, rest = rest.partition(sentinel)
            if not found:
                raise MalformedRecordError(sample_id, "the tokenizer's chat template does not render message "
                                                      "content verbatim; use a named chat_format instead")
            pieces.append(before)
        pieces.append(rest)
        full = self._render([{"role": m.role, "content": m.text} for m in messages], add_generation_prompt,
                            sample_id)
        joined = pieces[0] + "".join(m.text + piece for m, piece in zip(messages, pieces[1:]))
        if joined != full:
            raise MalformedRecordError(sample_id, "chat template rendering differs from scaffolding + contents "
                                                  "(the template rewrites message content); refusing to guess labels")
        out: list[Segment] = []
        carry = pieces[0]
        for message, after in zip(messages, pieces[1:]):
            if carry:
                out.append(Text(carry, special=True))
            supervise = message.role == "assistant"
            out.extend(_content_segments(message.parts, supervise))
            if supervise:
                end = self._end_token(after, sample_id)
                spaces = end[: len(end) - len(end.lstrip(" "))]
                if spaces:
                    out.append(Text(spaces, supervise=True))
                out.append(Text(end[len(spaces):], supervise=True, special=True))
                after = after[len(end):]
            carry = after
        if carry:
            out.append(Text(carry, special=True))
        return out


class Llama2Format(ChatFormat):
    """`<s>[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{user} [/INST] {answer}</s>` per turn pair (LLaMA-2 chat), the
    text Meta's reference tokenises in one call per pair. The space after `[/INST]` joins the answer's first word
    (`▁answer`, see `attach_boundary_spaces`), so it is supervised with it; a generation prompt ends at `[/INST]`."""

    name = "llama-2"

    def segments(self, messages: Sequence[ChatMessage], sample_id: str,
                 add_generation_prompt: bool = False) -> list[Segment]:
        _check_roles(messages, sample_id, add_generation_prompt)
        tok = self.text_tokenizer
        if tok.bos_token_id is None or tok.eos_token_id is None:
            raise ValueError("the llama-2 chat format needs a tokenizer with BOS and EOS tokens")
        system = messages[0].text if messages and messages[0].role == "system" else None
        turns = [m for m in messages if m.role != "system"]
        out: list[Segment] = []
        for i, message in enumerate(turns):
            if message.role == "user":
                out.append(TokenIds([tok.bos_token_id]))
                head = "[INST] "
                if system is not None and i == 0:
                    head += f"<<SYS>>\n{system}\n<</SYS>>\n\n"
                out.append(Text(head))
                out.extend(_content_segments(message.parts, supervise=False))
                out.append(Text(" [/INST]"))
            else:
                out.extend(_answer_segments(message.parts, tok.eos_token_id))
        return out


class PlainFormat(ChatFormat):
    """No roles: user content, a newline, then the answer and EOS (LLaVA's `plain` pretraining format)."""

    name = "plain"

    def segments(self, messages: Sequence[ChatMessage], sample_id: str,
                 add_generation_prompt: bool = False) -> list[Segment]:
        _check_roles(messages, sample_id, add_generation_prompt)
        eos = self.text_tokenizer.eos_token_id
        if eos is None:
            raise ValueError("the plain chat format needs a tokenizer with an EOS token")
        out: list[Segment] = []
        if self.text_tokenizer.bos_token_id is not None:
            out.append(TokenIds([self.text_tokenizer.bos_token_id]))
        for message in messages:
            if message.role == "assistant":
                out.extend(_content_segments(message.parts, supervise=True))
                out.append(TokenIds([eos], supervise=True))
            else:
                out.extend(_content_segments(message.parts, supervise=False))
                out.append(Text("\n"))
        return out


def llava_image_first(parts: Sequence[str | ImageSlot]) -> list[str | ImageSlot]:
    """A message laid out as LLaVA's `preprocess_multimodal` lays it out: when it holds images, they move to its
    start, each followed by a newline, and the remaining text is stripped (`"<image>\n" + text.strip()`, stripped
    again, so an image-only message has no newline). Messages without images are left as they are."""
    images = [part for part in parts if not isinstance(part, str)]
    if not images:
        return list(parts)
    text = "".join(part for part in parts if isinstance(part, str)).strip()
    out: list[str | ImageSlot] = []
    for image in images:
        out += [image, "\n"]
    if text:
        out[-1] = "\n" + text
    else:
        out.pop()
    return out


class _LlavaFormat(ChatFormat):
    """What LLaVA's formats share: a default system prompt, LLaVA's image placement and an EOS token."""

    default_system = ""

    def _split(self, messages: Sequence[ChatMessage], sample_id: str,
               add_generation_prompt: bool) -> tuple[str, list[ChatMessage]]:
        _check_roles(messages, sample_id, add_generation_prompt)
        if self.text_tokenizer.eos_token_id is None:
            raise ValueError(f"the {self.name} chat format needs a tokenizer with an EOS token")
        system = messages[0].text if messages[0].role == "system" else self.default_system
        turns = [ChatMessage(m.role, llava_image_first(m.parts)) for m in messages if m.role != "system"]
        return system, turns


class VicunaV1Format(_LlavaFormat):
    """LLaVA-1.5's `v1` (`conv_vicuna_v1`, separator style TWO): `{system} USER: {user} ASSISTANT: {answer}</s>`
    per turn pair, with `USER: ` right after the previous `</s>`. A generation prompt ends at `ASSISTANT:`, whose
    following space joins the answer's first word and is supervised with it (see `attach_boundary_spaces`)."""

    name = "v1"
    default_system = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives "
                      "helpful, detailed, and polite answers to the user's questions.")

    def segments(self, messages: Sequence[ChatMessage], sample_id: str,
                 add_generation_prompt: bool = False) -> list[Segment]:
        system, turns = self._split(messages, sample_id, add_generation_prompt)
        tok = self.text_tokenizer
        out: list[Segment] = [TokenIds([tok.bos_token_id])] if tok.bos_token_id is not None else []
        out.append(Text(system + " "))
        for message in turns:
            if message.role == "user":
                out.append(Text("USER: "))
                out.extend(_content_segments(message.parts, supervise=False))
                out.append(Text(" ASSISTANT:"))
            else:
                out.extend(_answer_segments(message.parts, tok.eos_token_id))
        return out


class LlavaLlama2Format(_LlavaFormat):
    """LLaVA's `llava_llama_2` (`conv_llava_llama_2`, separator style LLAMA_2):
    `<s>[INST] <<SYS>>\n{system}\n<</SYS>>\n\n{user} [/INST] {answer} </s><s>[INST] {user} [/INST] ...`.

    Unlike `llama-2` (Meta's reference, one tokenizer call per turn pair), LLaVA tokenises the whole prompt in one
    call: the `<s>` between turns is scaffolding parsed inside the running text, so the `[INST]` after it continues
    that text as the tokenizer would. The space before `</s>` belongs to the answer's turn end and is supervised."""

    name = "llava_llama_2"
    default_system = ("You are a helpful language and vision assistant. You are able to understand the visual "
                      "content that the user provides, and assist the user with a variety of tasks using natural "
                      "language.")

    def segments(self, messages: Sequence[ChatMessage], sample_id: str,
                 add_generation_prompt: bool = False) -> list[Segment]:
        system, turns = self._split(messages, sample_id, add_generation_prompt)
        tok = self.text_tokenizer
        if tok.bos_token_id is None:
            raise ValueError("the llava_llama_2 chat format needs a tokenizer with BOS and EOS tokens")
        out: list[Segment] = [TokenIds([tok.bos_token_id])]
        for i, message in enumerate(turns):
            if message.role == "user":
                if i == 0:
                    out.append(Text("[INST] " + (f"<<SYS>>\n{system}\n<</SYS>>\n\n" if system else "")))
                else:
                    out.append(Text(f"{tok.bos_token}[INST] ", special=True))
                out.extend(_content_segments(message.parts, supervise=False))
                out.append(Text(" [/INST]"))
            else:
                out.extend(_answer_segments(message.parts, tok.eos_token_id, before_eos=" "))
        return out


class LlavaPlainFormat(ChatFormat):
    """LLaVA-1.5's pretraining format (`--version plain`, `preprocess_plain`): the user's text is dropped and only
    their image kept, then the answer and a newline, both supervised, and no EOS: `[BOS] <image>{answer}\n`. One
    user turn with an image and one answer, as LLaVA asserts. UniMM's own `plain` keeps the user text and ends
    with EOS instead."""

    name = "llava_plain"

    def segments(self, messages: Sequence[ChatMessage], sample_id: str,
                 add_generation_prompt: bool = False) -> list[Segment]:
        _check_roles(messages, sample_id, add_generation_prompt)
        if messages[0].role == "system":
            raise ValueError("LLaVA's plain format has no system prompt; unset system_prompt")
        if len(messages) != (1 if add_generation_prompt else 2):
            raise MalformedRecordError(sample_id, f"the llava_plain format takes one user turn with an image and "
                                                  f"one answer, got {len(messages)} turns")
        images = [part for part in messages[0].parts if not isinstance(part, str)]
        if not images:
            raise MalformedRecordError(sample_id, "the llava_plain format needs an image in the user turn")
        bos = self.text_tokenizer.bos_token_id
        out: list[Segment] = [TokenIds([bos])] if bos is not None else []
        out.extend(images)
        if not add_generation_prompt:
            out.extend(_content_segments(messages[1].parts, supervise=True))
            out.append(Text("\n", supervise=True))
        return out


CHAT_FORMATS: dict[str, type[ChatFormat]] = {"chat_template": HFChatTemplateFormat, "llama-2": Llama2Format,
                                             "plain": PlainFormat, "v1": VicunaV1Format,
                                             "llava_llama_2": LlavaLlama2Format, "llava_plain": LlavaPlainFormat}


@renamed_arguments(tokenizer="text_tokenizer")
def get_chat_format(text_tokenizer: PreTrainedTokenizerBase, name: str = "auto",
                    end_token: str | None = None) -> ChatFormat:
    """`auto`: the tokenizer's chat template when it has one, else `llama-2`. Otherwise a name in CHAT_FORMATS."""
    if name == "auto":
        name = "chat_template" if getattr(text_tokenizer, "chat_template", None) else "llama-2"
        if name == "llama-2":
            logger.info("tokenizer has no chat template; using the llama-2 chat format")
    if name not in CHAT_FORMATS:
        raise ValueError(f"unknown chat_format {name!r}; choose 'auto' or one of {sorted(CHAT_FORMATS)}")
    if name == "chat_template":
        return HFChatTemplateFormat(text_tokenizer, end_token=end_token)
    return CHAT_FORMATS[name](text_tokenizer)
