"""Vector quantizers of the visual tokenizers (docs/DESIGN.md §2.1): SimVQ and EMA residual VQ.

Both return `QuantizerOutput(quantized, indices, loss, stats)` from `forward(z [..., dim])` with straight-through
gradients, and `lookup(indices)` gives back the quantized vectors (exactly, in eval mode).
"""

from unimm.tokenizer.quantizers.base import Quantizer
from unimm.tokenizer.quantizers.residual_vq import ResidualVQ
from unimm.tokenizer.quantizers.search import DEFAULT_MEMORY_BUDGET_BYTES, SearchPlan, nearest_code, plan_search
from unimm.tokenizer.quantizers.simvq import SimVQ
from unimm.tokenizer.quantizers.usage import UsageWindow, code_counts, perplexity

__all__ = [
    "DEFAULT_MEMORY_BUDGET_BYTES",
    "Quantizer",
    "ResidualVQ",
    "SearchPlan",
    "SimVQ",
    "UsageWindow",
    "code_counts",
    "nearest_code",
    "perplexity",
    "plan_search",
]
