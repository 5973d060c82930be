"""Depth-transformer head: predicts the D residual codes of one codebook group at one visual position
(RQ-Transformer style), conditioned only on the LLM hidden state that precedes the position.

Sequence fed to the head at a visual target (length D):
    depth 1:   proj(h)                              h = LLM hidden state of the previous position
    depth d>1: sum of the embeddings of codes 1..d-1 (teacher forcing in training, sampled codes in generation)
plus a learned depth position embedding; a small causal transformer; a classifier per depth (or shared).

The blocks are written here (pre-norm, `scaled_dot_product_attention`, GELU MLP) rather than taken from
`torch.nn.TransformerEncoderLayer` or a `transformers` decoder: `nn.MultiheadAttention` reads its output
projection's weight without calling that submodule, which DeepSpeed ZeRO-3 cannot gather; and a HF decoder
would bring a vocabulary table and rotary embeddings this D <= 8 token sequence does not need.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.autograd.function import once_differentiable
from torch.nn import functional as F
from transformers.modeling_layers import GradientCheckpointingLayer

from unimm.llm.embedding import CodeEmbedding
from unimm.tokenizer.types import CodebookGroupSpec

# Logits held at once by the depth-head loss: chunks of visual targets are sized to this many bytes of fp32 logits
# (at 8 depths x 16384 codes: 128 positions, against 729 x 8 x 16384 x 4 B = 382 MB per image unchunked).
LOSS_CHUNK_BYTES = 64 * 2**20


class ClassifierCrossEntropy(torch.autograd.Function):
    """Cross-entropy of the per-depth classifiers, computed in chunks of positions so that the `[M, D, K]` logits are
    never all held, and holding nothing from forward to backward but its inputs and the per-row log-sum-exp `[M, D]`.

    Forward: each chunk's logits give its rows' log-sum-exp and cross-entropy, and are dropped. Backward: each
    chunk's logits are recomputed (one extra `[c, h] x [h, K]` GEMM per chunk, a third more classifier arithmetic
    than logits + `F.cross_entropy`), turned into `scale * (softmax - onehot)` with the saved log-sum-exp and folded
    into the gradients of the states and of the classifier, which are allocated only then. So the `[D, K, h]`
    classifier gradient (fp32) and the `[M, D, h]` state gradient do not live through the rest of the forward and
    backward passes, and the graph can be backpropagated more than once (`retain_graph=True`). Measured on a 2-core
    CPU (benchmarks/RESULTS.md, issue 23): the loss step alone takes ~1.4x the time of forming the gradients in
    forward; a bf16 training step of two paper-shape heads holds 896 MiB less into backward and peaks 370 MiB lower.

    states [M, D, h], weight [D or 1, K, h] (1: shared by all depths), targets [M, D], depth_scale [D]. The CE is
    computed in fp32 (fp64 stays fp64). Returns the scalar `sum_{m,d} depth_scale[d] * CE[m, d]` and, not
    differentiable, the per-depth CE sums [D].
    """

    @staticmethod
    def _logits(states: torch.Tensor, weight: torch.Tensor, rows: slice, d: int, exact: torch.dtype):
        """A chunk's `x [c, h]` and its fp32 (or fp64) logits `[c, K]`. Depth by depth, then rows: every GEMM is a
        plain `[c, h] x [h, K]` and every row op runs on a contiguous `[c, K]` block."""
        x = states[rows, d]
        return x, (x @ weight[0 if weight.shape[0] == 1 else d].t()).to(exact)

    @staticmethod
    def forward(ctx, states: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, depth_scale: torch.Tensor,
                chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        num, depth, _ = states.shape
        exact = torch.promote_types(states.dtype, torch.float32)
        logsumexp = torch.empty((num, depth), dtype=exact, device=states.device)
        ce_sums = torch.zeros(depth, dtype=exact, device=states.device)
        step = chunk_size * depth  # the chunk budget holds `chunk_size * depth` rows of one depth
        for d in range(depth):
            for start in range(0, num, step):
                rows = slice(start, start + step)
                _, logits = ClassifierCrossEntropy._logits(states, weight, rows, d, exact)
                target_logit = logits.gather(-1, targets[rows, d].unsqueeze(-1)).squeeze(-1)
                peak = logits.amax(dim=-1)
                total = logits.sub_(peak.unsqueeze(-1)).exp_().sum(dim=-1)  # in the logits' memory
                logsumexp[rows, d] = total.log_().add_(peak)
                ce_sums[d] += (logsumexp[rows, d] - target_logit).sum()
        ctx.mark_non_differentiable(ce_sums)
        ctx.save_for_backward(states, weight, targets, depth_scale, logsumexp)
        ctx.chunk_size = chunk_size
        return (ce_sums * depth_scale.to(exact)).sum(), ce_sums

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss: torch.Tensor, _grad_ce_sums: torch.Tensor):
        states, weight, targets, depth_scale, logsumexp = ctx.saved_tensors
        if not (ctx.needs_input_grad[0] or ctx.needs_input_grad[1]):
            return None, None, None, None, None
        num, depth, _ = states.shape
        exact = logsumexp.dtype
        shared = weight.shape[0] == 1
        scales = depth_scale.to(exact) * grad_loss.to(exact)  # d loss / d CE[m, d]
        grad_states = torch.empty_like(states) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros(weight.shape, dtype=exact, device=weight.device) if ctx.needs_input_grad[1] else None
        step = ctx.chunk_size * depth
        for d in range(depth):
            for start in range(0, num, step):
                rows = slice(start, start + step)
                x, logits = ClassifierCrossEntropy._logits(states, weight, rows, d, exact)
                target = targets[rows, d].unsqueeze(-1)
                # scale * (softmax - onehot), in the logits' memory
                grad_logits = logits.sub_(logsumexp[rows, d].unsqueeze(-1)).exp_().mul_(scales[d])
                grad_logits.scatter_add_(-1, target, (-scales[d]).expand(target.shape).contiguous())
                grad_logits = grad_logits.to(weight.dtype)
                if grad_states is not None:
                    grad_states[rows, d] = grad_logits @ weight[0 if shared else d]
                if grad_weight is None:
                    continue
                # In place (beta = 1): a per-chunk [K, h] temporary plus a sum would double the traffic.
                if weight.dtype == exact:
                    grad_weight[0 if shared else d].addmm_(grad_logits.t(), x)
                else:
                    grad_weight[0 if shared else d] += (grad_logits.t() @ x).to(exact)
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_states, grad_weight, None, None, None


class DepthBlock(GradientCheckpointingLayer):
    """Pre-norm causal self-attention + GELU MLP. A `GradientCheckpointingLayer`: the model's
    `gradient_checkpointing_enable()` (HF Trainer `gradient_checkpointing`) checkpoints these blocks too."""

    def __init__(self, hidden_size: int, num_heads: int, intermediate_size: int, dropout: float = 0.0):
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"depth head hidden size {hidden_size} is not divisible by its {num_heads} heads")
        self.num_heads = num_heads
        self.dropout = dropout
        self.attn_norm = nn.LayerNorm(hidden_size)
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size)
        self.attn_out = nn.Linear(hidden_size, hidden_size)
        self.mlp_norm = nn.LayerNorm(hidden_size)
        self.fc1 = nn.Linear(hidden_size, intermediate_size)
        self.fc2 = nn.Linear(intermediate_size, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        qkv = self.qkv(self.attn_norm(x)).view(batch, length, 3, self.num_heads, width // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [M, heads, T, head_dim]
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        x = x + self.attn_out(attn.transpose(1, 2).reshape(batch, length, width))
        return x + self.fc2(F.gelu(self.fc1(self.mlp_norm(x))))


class DepthTransformerHead(nn.Module):
    """The head of one codebook group (e.g. the pixel head or the semantic head)."""

    def __init__(self, group: CodebookGroupSpec, llm_hidden_size: int, hidden_size: int, num_layers: int = 3,
                 num_heads: int = 4, intermediate_size: int | None = None, dropout: float = 0.0,
                 shared_classifier: bool = False, per_depth_embeddings: bool = False):
        super().__init__()
        self.num_codes = group.num_codes
        self.depth = group.depth
        self.shared_classifier = shared_classifier
        self.input_proj = nn.Linear(llm_hidden_size, hidden_size)
        self.code_embedding = CodeEmbedding(group.num_codes, group.depth, hidden_size, per_depth_embeddings)
        self.depth_embedding = nn.Parameter(torch.empty(group.depth, hidden_size))
        self.blocks = nn.ModuleList(
            DepthBlock(hidden_size, num_heads, intermediate_size or 4 * hidden_size, dropout) for _ in range(num_layers)
        )
        self.norm = nn.LayerNorm(hidden_size)
        # [D or 1, K, hidden]: one classifier per depth, or one shared by all depths
        self.classifier = nn.Parameter(torch.empty(1 if shared_classifier else group.depth, group.num_codes, hidden_size))
        nn.init.normal_(self.depth_embedding, std=0.02)
        nn.init.normal_(self.classifier, std=0.02)

    def _inputs(self, hidden: torch.Tensor, prefix_codes: torch.Tensor) -> torch.Tensor:
        """`hidden [M, H_llm]`, `prefix_codes [M, d]` -> head inputs `[M, d + 1, hidden]`. The head runs in its own
        dtype (float32 next to a bf16 LLM after `from_llm`)."""
        first = self.input_proj(hidden.to(self.input_proj.weight.dtype)).unsqueeze(1)
        if prefix_codes.shape[1] == 0:
            x = first
        else:
            # input at depth j+1 is the sum of the embeddings of codes 1..j (a running sum over depth)
            cumulative = self.code_embedding.per_depth_embeddings(prefix_codes).cumsum(dim=1)
            x = torch.cat([first, cumulative.to(first.dtype)], dim=1)
        return x + self.depth_embedding[: x.shape[1]].to(x.dtype)

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def _classify(self, states: torch.Tensor, first_depth: int = 0) -> torch.Tensor:
        """`states [M, T, hidden]` at depths first_depth.. -> logits `[M, T, K]`."""
        length = states.shape[1]
        if self.shared_classifier:
            return states @ self.classifier[0].t()
        weight = self.classifier[first_depth : first_depth + length]  # [T, K, hidden]
        return torch.einsum("mth,tkh->mtk", states, weight)

    def forward(self, hidden: torch.Tensor, codes: torch.Tensor, loss_scale: float | None = None,
                chunk_size: int | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Teacher-forced logits for every depth: `hidden [M, H_llm]`, `codes [M, D]` -> `[M, D, K]`.

        With `loss_scale`, the loss instead (training goes through here so ZeRO-3 gathers the classifier): returns
        `loss_scale * sum over targets of the mean CE over depths` and the per-depth CE sums `[D]` (detached), with
        the logits computed `chunk_size` positions at a time (default: `LOSS_CHUNK_BYTES` of fp32 logits)."""
        if codes.shape[-1] != self.depth:
            raise ValueError(f"depth head expects codes of depth {self.depth}, got shape {tuple(codes.shape)}")
        states = self._encode(self._inputs(hidden, codes[:, :-1]))  # [M, D, hidden]
        if loss_scale is None:
            return self._classify(states)
        if chunk_size is None:
            chunk_size = max(1, LOSS_CHUNK_BYTES // (4 * self.depth * self.num_codes))
        depth_scale = torch.full((self.depth,), loss_scale / self.depth,
                                 dtype=torch.promote_types(states.dtype, torch.float32), device=states.device)
        classifier = self.classifier
        if classifier.dtype != states.dtype and torch.is_autocast_enabled(states.device.type):
            # Under autocast (float32 master weights, bf16 compute) the states arrive in the autocast dtype: the
            # classifier follows them as an autocast linear layer would; its gradient flows back in float32.
            classifier = classifier.to(states.dtype)
        return ClassifierCrossEntropy.apply(states, classifier, codes, depth_scale, int(chunk_size))

    def next_logits(self, hidden: torch.Tensor, prefix_codes: torch.Tensor) -> torch.Tensor:
        """Logits `[M, K]` of the code at depth `prefix_codes.shape[1] + 1`, given the codes sampled so far.
        Recomputes the (at most D-token) head sequence: cheaper than managing a cache for it."""
        depth = prefix_codes.shape[1]
        if depth >= self.depth:
            raise ValueError(f"all {self.depth} depths of this group are already sampled")
        states = self._encode(self._inputs(hidden, prefix_codes))
        return self._classify(states[:, -1:], first_depth=depth)[:, 0]
