"""Memory of the depth heads' training (issue 23): the classifier cross-entropy holds no gradient buffers from forward
to backward, and the model's activation checkpointing reaches the depth heads' blocks."""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch.autograd.graph import saved_tensors_hooks
from torch.nn import functional as F

from tests.llm.conftest import DUAL_SPEC, image_batch, make_unimm
from unimm.llm.depth_head import ClassifierCrossEntropy, DepthBlock


def _tensors_in(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for item in value for t in _tensors_in(item)]
    if isinstance(value, dict):
        return [t for item in value.values() for t in _tensors_in(item)]
    return []


def _held_bytes(run, exclude: list[torch.Tensor]) -> tuple[object, int]:
    """Run `run()` and return its output and the bytes its autograd graph keeps alive for backward, apart from the
    storages of `exclude` (inputs, parameters): every tensor saved for backward (seen through `saved_tensors_hooks`)
    plus every tensor kept as an attribute of a custom `autograd.Function`'s context, found by walking the graph."""
    saved = []

    def pack(tensor):
        saved.append(tensor)
        return tensor

    with saved_tensors_hooks(pack, lambda tensor: tensor):
        output = run()
    held = list(saved)
    seen, stack = set(), [t.grad_fn for t in _tensors_in(output) if t.grad_fn is not None]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        held += _tensors_in(list(getattr(node, "__dict__", {}).values()))
        stack += [next_node for next_node, _ in node.next_functions]
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in held}
    return output, sum(size for ptr, size in storages.items() if ptr not in skip)


@pytest.mark.parametrize("shared", [False, True])
def test_classifier_cross_entropy_holds_no_gradient_from_forward_to_backward(shared):
    """Between forward and backward only the per-row log-sum-exp [M, D] is held beyond the inputs: no [D, K, h]
    classifier gradient, no [M, D, h] state gradient. The graph can then be backpropagated twice."""
    num, depth, num_codes, width = 40, 4, 1024, 64
    gen = torch.Generator().manual_seed(0)
    states = torch.randn(num, depth, width, generator=gen, requires_grad=True)
    weight = (0.1 * torch.randn(1 if shared else depth, num_codes, width, generator=gen)).requires_grad_()
    targets = torch.randint(0, num_codes, (num, depth), generator=gen)
    scale = torch.tensor([0.1, 0.2, 0.3, 0.4])

    (loss, ce_sums), held = _held_bytes(lambda: ClassifierCrossEntropy.apply(states, weight, targets, scale, 8),
                                        exclude=[states, weight, targets, scale])
    assert held <= num * depth * 4 + 64  # the log-sum-exp (plus at most a few scalars)
    assert held * 100 < weight.numel() * 4  # against the 1 MiB (shared: 256 KiB) classifier gradient held before

    loss.backward(retain_graph=True)
    first = (states.grad.clone(), weight.grad.clone())
    states.grad = weight.grad = None
    (3.0 * loss).backward()
    torch.testing.assert_close(states.grad, 3.0 * first[0])
    torch.testing.assert_close(weight.grad, 3.0 * first[1])


@pytest.mark.parametrize("shared", [False, True])
def test_classifier_cross_entropy_gradcheck_against_unfused_reference(shared):
    """float64: the loss and its gradients equal logits + `F.cross_entropy` with per-depth scales, and
    `torch.autograd.gradcheck` (finite differences, repeated backward through one graph) passes."""
    num, depth, num_codes, width = 7, 3, 11, 5
    gen = torch.Generator().manual_seed(2)
    states = torch.randn(num, depth, width, dtype=torch.float64, generator=gen, requires_grad=True)
    weight = torch.randn(1 if shared else depth, num_codes, width, dtype=torch.float64, generator=gen,
                         requires_grad=True)
    targets = torch.randint(0, num_codes, (num, depth), generator=gen)
    scale = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)

    logits = torch.einsum("mdh,dkh->mdk", states, weight.expand(depth, -1, -1))
    ce = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").view(num, depth)
    reference = (ce * scale).sum()
    expected = torch.autograd.grad(reference, (states, weight))
    loss, ce_sums = ClassifierCrossEntropy.apply(states, weight, targets, scale, 1)  # chunks of 3 rows
    got = torch.autograd.grad(loss, (states, weight))
    torch.testing.assert_close(loss, reference, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ce_sums, ce.sum(dim=0).detach(), rtol=1e-12, atol=1e-12)
    for name, a, b in zip(("states", "weight"), got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=name)
    assert torch.autograd.gradcheck(lambda s, w: ClassifierCrossEntropy.apply(s, w, targets, scale, 2)[0],
                                    (states, weight))
    # a frozen classifier (e.g. heads not trained): only the states' gradient is formed, and it is the same
    (frozen,) = torch.autograd.grad(ClassifierCrossEntropy.apply(states, weight.detach(), targets, scale, 1)[0], states)
    torch.testing.assert_close(frozen, expected[0], rtol=1e-10, atol=1e-12)


@contextlib.contextmanager
def _saved_bytes_inside(modules, counts: list[int]):
    """Count the bytes saved for backward while any of `modules` runs its forward (hooks pushed on entry)."""
    stack = []

    def pack(tensor):
        counts.append(tensor.untyped_storage().nbytes())
        return tensor

    def enter(module, args):
        stack.append(saved_tensors_hooks(pack, lambda tensor: tensor))
        stack[-1].__enter__()

    def leave(module, args, output):
        stack.pop().__exit__(None, None, None)

    handles = [h for m in modules for h in (m.register_forward_pre_hook(enter), m.register_forward_hook(leave))]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@pytest.mark.parametrize("enable", ["gradient_checkpointing_enable", "activation_checkpointing_enable"])
def test_model_checkpointing_reaches_depth_heads(tiny_qwen2_path, enable):
    """Through `UniMMForCausalLM.<enable>()`: every depth-head block is checkpointed (non-reentrant), the
    gradients are those of the plain run, and the heads' forward saves less than a third of the activation bytes."""
    model, tokenizer, layout = make_unimm(tiny_qwen2_path, DUAL_SPEC)
    model.train()
    batch = image_batch(tokenizer, layout, DUAL_SPEC, ["a red circle", "a blue square"], num_positions=6)

    def run() -> tuple[dict[str, torch.Tensor], int]:
        model.zero_grad(set_to_none=True)
        counts: list[int] = []
        with _saved_bytes_inside(list(model.depth_heads.values()), counts):
            loss = model(**batch).loss
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return grads, sum(counts)

    plain, plain_bytes = run()
    with pytest.warns(FutureWarning) if enable == "gradient_checkpointing_enable" else contextlib.nullcontext():
        getattr(model, enable)()
    blocks = [m for m in model.depth_heads.modules() if isinstance(m, DepthBlock)]
    assert len(blocks) == 2 * 2 and all(block.gradient_checkpointing for block in blocks)
    assert blocks[0]._gradient_checkpointing_func.keywords == {"use_reentrant": False}
    checkpointed, checkpointed_bytes = run()

    assert set(checkpointed) == set(plain) and any(n.startswith("depth_heads.") for n in plain)
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, rtol=1e-5, atol=1e-6, msg=name)
    assert checkpointed_bytes * 3 < plain_bytes
