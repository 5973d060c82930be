"""UniMM: a training stack for unified multimodal LLMs (understanding and generation over discrete visual codes).

Importing `unimm` has one deliberate side effect: it registers the UniMM model with transformers' `AutoConfig` and
`AutoModelForCausalLM` (`unimm.llm.auto`), so that `AutoModelForCausalLM.from_pretrained(folder)` opens a UniMM model
in any program that imports it. Nothing else happens at import (no logging setup, no downloads, no DeepSpeed).
"""

from unimm.llm.auto import register_auto_classes

__version__ = "0.1.0"

register_auto_classes()
