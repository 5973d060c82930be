"""Visual-loss benchmark: the depth heads' loss, forward + backward, in the forms UniMM has had.

Variants (each `--scope` runs those that apply):
- `unchunked`: the head's `[M, D, K]` logits, `.float()`, `F.cross_entropy` (before issue 11);
- `held`: the chunked cross-entropy fused with its gradient in forward, the `[D, K, h]` fp32 classifier gradient
  and the `[M, D, h]` state gradient held on the autograd context until backward (issue 11 to issue 23; a copy of
  that function is kept below as the baseline);
- `fused`: today's `ClassifierCrossEntropy` (`DepthTransformerHead(..., loss_scale=...)`): forward keeps only the
  per-row log-sum-exp, backward recomputes each chunk's logits;
- `+ ckpt`: the same with activation checkpointing of the depth heads' blocks (`gradient_checkpointing_enable()`).

Scopes:
- `loss` (default): the classifier + cross-entropy from the depth transformer's states `[M, D, h]`;
- `head`: one whole depth head (3-layer transformer + loss) from LLM hidden states `[M, H]`;
- `model`: one training forward + backward of a saved UniMM model (`--model_path`, e.g. the `model` stage of
  `benchmarks/paper_shapes.py`: tied Qwen2.5-0.5B structure, DualToken-384's two 8-depth 16384-code heads) on
  `--batch` text-to-image samples of `--positions` image positions; `held` and `fused` are compared with activation
  checkpointing off, and on (`before` = LLM layers only, as `gradient_checkpointing_enable()` did before issue 23).

    python benchmarks/visual_loss.py                        # paper shape: 729 positions x 8 depths x 16384 codes, batch 8
    python benchmarks/visual_loss.py --batch 1 --llm-hidden 1536 --repeats 1   # the issue 23 shape: 8 x 16384 x 1536
    python benchmarks/visual_loss.py --scope model --model_path runs/paper_shapes/unimm --batch 1 --dtype bfloat16

For `loss` / `head` the head is the one UniMM builds for an LLM of width `--llm-hidden` (head width the same, 3 layers).
Reports per variant, each the minimum over `--repeats` runs (interleaved, after a warm-up; allocator and one-time
effects only add), the forward + backward wall time, the extra memory still held when forward returns (what lives
into backward) and the peak extra memory of forward + backward, both above what was live before the run
(parameters, inputs) and including the gradients the run allocates: on CUDA `torch.cuda.memory_allocated` /
`max_memory_allocated`; on CPU the resident set (Linux VmRSS / VmHWM reset just before the run), with the script
re-executed under `MALLOC_MMAP_THRESHOLD_=65536` so that resident memory follows the live tensors.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from collections.abc import Callable, Iterator

import torch
from torch.nn import functional as F

from unimm.llm import depth_head
from unimm.llm.depth_head import LOSS_CHUNK_BYTES, ClassifierCrossEntropy, DepthBlock, DepthTransformerHead
from unimm.tokenizer.types import CodebookGroupSpec

_MMAP_ENV = "MALLOC_MMAP_THRESHOLD_"
MIB = 1024**2


class HeldGradientCrossEntropy(torch.autograd.Function):
    """Baseline: `ClassifierCrossEntropy` as it was from issue 11 to issue 23 (commit 22517b1). Forward computes each
    chunk's loss and `softmax - onehot` at once and folds it into the state and classifier gradients, which stay on
    `ctx` until backward scales them by the incoming gradient."""

    @staticmethod
    def forward(ctx, states, weight, targets, depth_scale, chunk_size):
        num, depth, _ = states.shape
        shared = weight.shape[0] == 1
        needs_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        exact = torch.promote_types(states.dtype, torch.float32)
        grad_states = torch.empty_like(states) if needs_grad else None
        grad_weight = torch.zeros(weight.shape, dtype=exact, device=weight.device) if needs_grad else None
        ce_sums = torch.zeros(depth, dtype=exact, device=states.device)
        scales = depth_scale.to(exact)
        rows = chunk_size * depth
        for d in range(depth):
            w = weight[0 if shared else d]
            for start in range(0, num, rows):
                x = states[start:start + rows, d]
                target = targets[start:start + rows, d].unsqueeze(-1)
                logits = (x @ w.t()).to(exact)
                target_logit = logits.gather(-1, target)
                peak = logits.amax(dim=-1, keepdim=True)
                exp = logits.sub_(peak).exp_()
                total = exp.sum(dim=-1, keepdim=True)
                ce_sums[d] += (total.log() + peak - target_logit).sum()
                if not needs_grad:
                    continue
                grad_logits = exp.mul_(scales[d] / total)
                grad_logits.scatter_add_(-1, target, (-scales[d]).expand_as(target).contiguous())
                grad_logits = grad_logits.to(weight.dtype)
                grad_states[start:start + rows, d] = grad_logits @ w
                if weight.dtype == exact:
                    grad_weight[0 if shared else d].addmm_(grad_logits.t(), x)
                else:
                    grad_weight[0 if shared else d] += (grad_logits.t() @ x).to(exact)
        ctx.mark_non_differentiable(ce_sums)
        ctx.grads = (grad_states, grad_weight) if needs_grad else None
        ctx.weight_dtype = weight.dtype
        return (ce_sums * depth_scale.to(exact)).sum(), ce_sums

    @staticmethod
    def backward(ctx, grad_loss, _grad_ce_sums):
        grad_states, grad_weight = ctx.grads
        ctx.grads = None
        grad_states.mul_(grad_loss.to(grad_states.dtype))
        grad_weight = grad_weight.mul_(grad_loss.to(grad_weight.dtype)).to(ctx.weight_dtype)
        return grad_states, grad_weight, None, None, None


@contextlib.contextmanager
def loss_function(function: type[torch.autograd.Function]) -> Iterator[None]:
    """`DepthTransformerHead.forward` calls `function` as its classifier cross-entropy inside the block."""
    saved = depth_head.ClassifierCrossEntropy
    depth_head.ClassifierCrossEntropy = function
    try:
        yield
    finally:
        depth_head.ClassifierCrossEntropy = saved


def _parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8, help="Images per batch (`--positions` visual targets each).")
    parser.add_argument("--positions", type=int, default=729, help="Visual targets per image (27 x 27).")
    parser.add_argument("--depth", type=int, default=8, help="Residual depth D (loss / head scopes).")
    parser.add_argument("--num-codes", type=int, default=16384, help="Codes K (loss / head scopes).")
    parser.add_argument("--llm-hidden", type=int, default=896, help="LLM (and head) width (loss / head scopes).")
    parser.add_argument("--head-layers", type=int, default=3, help="Depth-head layers (loss / head scopes).")
    parser.add_argument("--scope", choices=("loss", "head", "model"), default="loss", help=(
        "loss: classifier + cross-entropy from the depth transformer's states [M, D, h]; head: one whole depth head; "
        "model: a training forward + backward of the UniMM model at --model_path."))
    parser.add_argument("--model_path", default=None, help="Saved UniMM model with its tokenizer (scope model).")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="Weights and inputs.")
    parser.add_argument("--repeats", type=int, default=3, help="Measured runs per variant (the minimum is reported).")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU).")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser.parse_args(argv)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _read_status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def _live_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    return _read_status_kib("VmRSS") * 1024


def _measure(forward: Callable[[], torch.Tensor], device: torch.device) -> tuple[float, int, int]:
    """One forward + backward: (seconds, extra bytes held when `forward()` returns, peak extra bytes of forward +
    backward), the bytes above those live before the run."""
    _sync(device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := current RSS
    base = _live_bytes(device)
    start = time.perf_counter()
    loss = forward()
    _sync(device)
    held = _live_bytes(device) - base
    loss.backward()
    del loss
    _sync(device)
    seconds = time.perf_counter() - start
    peak = (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
            else _read_status_kib("VmHWM") * 1024) - base
    return seconds, held, peak


def _set_head_checkpointing(modules, enable: bool) -> None:
    """Checkpoint (non-reentrant) the `DepthBlock`s among `modules`, as `gradient_checkpointing_enable()` does."""
    from functools import partial

    from torch.utils.checkpoint import checkpoint

    for block in (m for module in modules for m in module.modules() if isinstance(m, DepthBlock)):
        block.gradient_checkpointing = enable
        block._gradient_checkpointing_func = partial(checkpoint, use_reentrant=False)


def _loss_or_head_variants(args, device, dtype):
    torch.manual_seed(0)
    group = CodebookGroupSpec(num_codes=args.num_codes, depth=args.depth, code_dim=32)
    head = DepthTransformerHead(group, args.llm_hidden, args.llm_hidden, num_layers=args.head_layers,
                                num_heads=max(1, args.llm_hidden // 64)).to(device, dtype).train()
    num = args.batch * args.positions
    codes = torch.randint(0, args.num_codes, (num, args.depth), device=device)
    chunk = max(1, LOSS_CHUNK_BYTES // (4 * args.depth * args.num_codes))

    def unchunked_loss(logits: torch.Tensor) -> torch.Tensor:
        ce = F.cross_entropy(logits.float().flatten(0, 1), codes.flatten(), reduction="none").view(codes.shape)
        return ce.mean(dim=1).sum()

    if args.scope == "head":
        inputs = torch.randn(num, args.llm_hidden, device=device, dtype=dtype, requires_grad=True)  # hidden [M, H]
        params = list(head.parameters())

        def run(function, checkpointed=False):
            def forward():
                _set_head_checkpointing([head], checkpointed)
                if function is None:
                    return unchunked_loss(head(inputs, codes))
                with loss_function(function):
                    return head(inputs, codes, loss_scale=1.0)[0]
            return forward

        variants = {"unchunked": run(None), "held": run(HeldGradientCrossEntropy),
                    "fused": run(ClassifierCrossEntropy), "fused + ckpt": run(ClassifierCrossEntropy, True)}
    else:
        inputs = torch.randn(num, args.depth, args.llm_hidden, device=device, dtype=dtype, requires_grad=True)
        params = [head.classifier]
        scale = torch.full((args.depth,), 1.0 / args.depth, device=device)
        variants = {
            "unchunked": lambda: unchunked_loss(torch.einsum("mdh,dkh->mdk", inputs, head.classifier)),
            "held": lambda: HeldGradientCrossEntropy.apply(inputs, head.classifier, codes, scale, chunk)[0],
            "fused": lambda: ClassifierCrossEntropy.apply(inputs, head.classifier, codes, scale, chunk)[0],
        }
    shape = (f"M = {args.batch} x {args.positions} = {num} targets, D {args.depth}, K {args.num_codes}, "
             f"width {args.llm_hidden}; fp32 logits would be {num * args.depth * args.num_codes * 4 / MIB:.0f} MiB, "
             f"the fp32 classifier gradient is {args.depth * args.num_codes * args.llm_hidden * 4 / MIB:.0f} MiB")
    return variants, params + [inputs], shape


def _model_variants(args, device, dtype):
    from transformers import AutoTokenizer

    from unimm.llm import UniMMForCausalLM, t2i_prefix_ids

    if args.model_path is None:
        raise SystemExit("--scope model needs --model_path (a saved UniMM model, e.g. paper_shapes.py's <out>/unimm)")
    model = UniMMForCausalLM.from_pretrained(args.model_path, dtype=dtype).to(device).train()
    tokenizer = AutoTokenizer.from_pretrained(args.model_path)
    layout = model.layout
    gen = torch.Generator().manual_seed(0)
    prefix = t2i_prefix_ids(tokenizer, layout, "a cup of coffee on a saucer")
    ids = torch.tensor(prefix + [layout.image_token_id] * args.positions + [layout.eoi_token_id])
    input_ids = ids.repeat(args.batch, 1).to(device)
    labels = input_ids.clone()
    labels[:, : len(prefix)] = -100
    visual_codes = {}
    for name, group in model.config.groups.items():
        codes = torch.full((*input_ids.shape, group.depth), -1)
        codes[:, len(prefix): len(prefix) + args.positions] = torch.randint(
            0, group.num_codes, (args.batch, args.positions, group.depth), generator=gen)
        visual_codes[name] = codes.to(device)
    batch = dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), labels=labels,
                 visual_codes=visual_codes)
    heads = list(model.depth_heads.values())

    def run(function, checkpointing: str):
        def forward():
            if checkpointing == "none":
                model.gradient_checkpointing_disable()
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
                _set_head_checkpointing(heads, checkpointing == "all")  # "llm": the LLM layers only (before)
            with loss_function(function):
                return model(**batch).loss
        return forward

    variants = {"held": run(HeldGradientCrossEntropy, "none"), "fused": run(ClassifierCrossEntropy, "none"),
                "held, LLM ckpt": run(HeldGradientCrossEntropy, "llm"),
                "fused + ckpt (LLM and heads)": run(ClassifierCrossEntropy, "all")}
    groups = ", ".join(f"{n} {g.depth} x {g.num_codes}" for n, g in model.config.groups.items())
    text = model.config.text_config
    shape = (f"model {args.model_path} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, "
             f"{args.dtype}; LLM {text.num_hidden_layers} layers x {text.hidden_size}, heads {groups}, width "
             f"{model.config.head_hidden_size}, {model.config.depth_head_layers} layers); batch {args.batch} x "
             f"{input_ids.shape[1]} tokens, {args.positions} image positions each")
    return variants, list(model.parameters()), shape


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    args = _parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu" and os.environ.get(_MMAP_ENV) is None:
        os.environ[_MMAP_ENV] = "65536"
        os.execv(sys.executable, [sys.executable, *sys.argv])
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    build = _model_variants if args.scope == "model" else _loss_or_head_variants
    variants, tensors, shape = build(args, device, dtype)

    def reset() -> None:  # gradients of the previous run are freed before a run starts (and before its baseline)
        for tensor in tensors:
            tensor.grad = None

    # warm-up: one-time allocations (thread pools, BLAS buffers, weight packing) count for no variant (scope model:
    # one run of the first variant, ~1 GB of such allocations at the paper shape on CPU)
    for fn in variants.values() if args.scope != "model" else list(variants.values())[:1]:
        reset()
        fn().backward()
    results = {name: {"time_s": float("inf"), "held_mib": float("inf"), "peak_mib": float("inf")} for name in variants}
    for _ in range(args.repeats):
        for name, fn in variants.items():
            reset()
            seconds, held, peak = _measure(fn, device)
            print(f"{name}: {seconds:.2f} s, held {held / MIB:,.0f} MiB, peak {peak / MIB:,.0f} MiB", flush=True)
            for key, value in zip(("time_s", "held_mib", "peak_mib"), (seconds, held / MIB, peak / MIB), strict=True):
                results[name][key] = min(results[name][key], value)
    reset()
    print(f"scope {args.scope}; device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}; {shape}")
    print("| variant | time (s) | held from forward to backward | peak extra memory |\n| --- | --- | --- | --- |")
    for name, r in results.items():
        print(f"| {name} | {r['time_s']:.2f} | {r['held_mib']:,.0f} MiB | {r['peak_mib']:,.0f} MiB |")
    baseline = results["held"]
    for name, r in results.items():
        if name != "held":
            print(f"{name} / held: time {r['time_s'] / baseline['time_s']:.2f}x, held "
                  f"{r['held_mib'] / max(baseline['held_mib'], 1e-9):.3f}x, peak {r['peak_mib'] / baseline['peak_mib']:.3f}x")
    return results


if __name__ == "__main__":
    main()
