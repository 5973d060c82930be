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
from torch.nn import functional as F

from unimm.llm.embedding import CodeEmbedding
from unimm.tokenizer.types import CodebookGroupSpec

# Logits held at once by the depth-head loss: chunks of visual targets are sized to this many bytes of fp32 logits
# (at 8 depths x 16384 codes: 128 positions, against 729 x 8 x 16384 x 4 B = 382 MB per image unchunked).
LOSS_CHUNK_BYTES = 64 * 2**20


class ClassifierCrossEntropy(torch.autograd.Function):
    """Cross-entropy of the per-depth classifiers, fused with their gradient and computed in chunks of positions, so
    the `[M, D, K]` logits are never all held (forward or backward): each chunk's logits give its loss and, when a
    gradient is needed, `softmax - onehot` at once, which is folded into the gradients of the states and of the
    classifier and dropped. Backward only scales those by the incoming gradient: the same arithmetic as logits +
    `F.cross_entropy`, no recomputation.

    states [M, D, h], weight [D or 1, K, h] (1: shared by all depths), targets [M, D], depth_scale [D]. The
    gradients live on `ctx` from forward to backward, so a graph through it can be backpropagated once only.
    Returns the scalar `sum_{m,d} depth_scale[d] * CE[m, d]` and, not differentiable, the per-depth CE sums [D].
    """

    @staticmethod
    def forward(ctx, states: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, depth_scale: torch.Tensor,
                chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        num, depth, _ = states.shape
        shared = weight.shape[0] == 1
        needs_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        exact = torch.promote_types(states.dtype, torch.float32)  # CE in fp32 (fp64 stays fp64)
        grad_states = torch.empty_like(states) if needs_grad else None
        grad_weight = torch.zeros(weight.shape, dtype=exact, device=weight.device) if needs_grad else None
        ce_sums = torch.zeros(depth, dtype=exact, device=states.device)
        scales = depth_scale.to(exact)
        # Depth by depth, then rows: every GEMM is a plain [c, h] x [h, K] and every row op runs on a contiguous
        # [c, K] block (the chunk budget holds `chunk_size * depth` rows of one depth).
        rows = chunk_size * depth
        for d in range(depth):
            w = weight[0 if shared else d]  # [K, h]
            for start in range(0, num, rows):
                x = states[start:start + rows, d]  # [c, h]
                target = targets[start:start + rows, d].unsqueeze(-1)  # [c, 1]
                logits = (x @ w.t()).to(exact)  # [c, K]
                target_logit = logits.gather(-1, target)
                peak = logits.amax(dim=-1, keepdim=True)
                exp = logits.sub_(peak).exp_()  # in the logits' memory from here on
                total = exp.sum(dim=-1, keepdim=True)
                ce_sums[d] += (total.log() + peak - target_logit).sum()
                if not needs_grad:
                    continue
                # d(scale * CE)/d logits = scale * (softmax - onehot)
                grad_logits = exp.mul_(scales[d] / total)
                grad_logits.scatter_add_(-1, target, (-scales[d]).expand_as(target).contiguous())
                grad_logits = grad_logits.to(weight.dtype)
                grad_states[start:start + rows, d] = grad_logits @ w
                # In place (beta = 1): a per-chunk [K, h] temporary plus a sum would double the traffic.
                if weight.dtype == exact:
                    grad_weight[0 if shared else d].addmm_(grad_logits.t(), x)
                else:
                    grad_weight[0 if shared else d] += (grad_logits.t() @ x).to(exact)
        ctx.mark_non_differentiable(ce_sums)
        # Kept on ctx, not saved tensors, so backward can scale them in place and hand the classifier gradient to
        # autograd without a copy (it becomes `classifier.grad` when that is empty).
        ctx.grads = (grad_states, grad_weight) if needs_grad else None
        ctx.weight_dtype = weight.dtype
        loss = (ce_sums * depth_scale.to(exact)).sum()
        return loss, ce_sums

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor, _grad_ce_sums: torch.Tensor):
        if ctx.grads is None:
            raise RuntimeError("ClassifierCrossEntropy: backward through a forward run without gradients, or twice")
        grad_states, grad_weight = ctx.grads
        ctx.grads = None
        grad_states.mul_(grad_loss.to(grad_states.dtype))
        grad_weight = grad_weight.mul_(grad_loss.to(grad_weight.dtype)).to(ctx.weight_dtype)
        return grad_states, grad_weight, None, None, None


class DepthBlock(nn.Module):
    """Pre-norm causal self-attention + GELU MLP."""

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
