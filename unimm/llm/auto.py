"""Registration of UniMM with transformers' Auto classes, so generic Hugging Face tooling (`AutoConfig`,
`AutoModelForCausalLM.from_pretrained`, evaluation harnesses, serving engines that accept in-process registrations)
opens a UniMM model folder after `import unimm`, without `trust_remote_code`."""

from __future__ import annotations

from transformers import AutoConfig, AutoModelForCausalLM

from unimm.llm.configuration import UniMMConfig
from unimm.llm.modeling import UniMMForCausalLM


def register_auto_classes() -> None:
    """Register `UniMMConfig` (model_type "unimm") and `UniMMForCausalLM`. Idempotent: a repeated call (a
    re-imported or reloaded `unimm`) replaces the registration instead of raising."""
    AutoConfig.register(UniMMConfig.model_type, UniMMConfig, exist_ok=True)
    AutoModelForCausalLM.register(UniMMConfig, UniMMForCausalLM, exist_ok=True)


__all__ = ["register_auto_classes"]
