"""Joint loss: hand-computed parts, supervised positions only, gradients, gradient-accumulation normalisation."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from tests.llm.conftest import DUAL_SPEC, image_batch, make_unimm


def _hand_loss(model, batch, layout):
    """The loss written out position by position from full logits and explicit head calls."""
    with torch.no_grad():
        hidden = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       visual_codes=batch["visual_codes"]).last_hidden_state
        logits = model.get_output_embeddings()(hidden).float()
    text, visual = [], {name: [] for name in DUAL_SPEC}
    for b in range(batch["labels"].shape[0]):
        for t in range(1, batch["labels"].shape[1]):
            target = int(batch["labels"][b, t])
            if target == -100:
                continue
            if target != layout.image_token_id:
                text.append(F.cross_entropy(logits[b, t - 1], torch.tensor(target)))
                continue
            for name, head in model.depth_heads.items():
                codes = batch["visual_codes"][name][b, t].unsqueeze(0)
                with torch.no_grad():
                    head_logits = head(hidden[b, t - 1].unsqueeze(0), codes)[0].float()  # [D, K]
                visual[name].append(F.cross_entropy(head_logits, codes[0], reduction="none"))
    num_visual = len(visual["pixel"])
    total = sum(text) + sum(torch.stack(v).mean(dim=1).sum() for v in visual.values())
    return dict(total=total / (len(text) + num_visual), text=torch.stack(text).mean(),
                visual={name: torch.stack(v).mean() for name, v in visual.items()},
                depth={name: torch.stack(v).mean(dim=0) for name, v in visual.items()},
                num_items=len(text) + num_visual)


def test_loss_parts_match_hand_computation(tiny_qwen2_path):
    model, tokenizer, layout = make_unimm(tiny_qwen2_path, DUAL_SPEC)
    model.eval()
    batch = image_batch(tokenizer, layout, DUAL_SPEC, ["a red circle", "a green square at the top right"], 4)
    batch["labels"][0, -3:] = -100  # leave some positions unsupervised, including two visual ones
    expected = _hand_loss(model, batch, layout)
    assert expected["num_items"] == int((batch["labels"][:, 1:] != -100).sum())
    with torch.no_grad():
        out = model(**batch)
    torch.testing.assert_close(out.loss, expected["total"])
    torch.testing.assert_close(out.text_loss, expected["text"])
    for name in DUAL_SPEC:
        torch.testing.assert_close(out.visual_losses[name], expected["visual"][name])
        torch.testing.assert_close(out.visual_depth_losses[name], expected["depth"][name])
    assert out.logits is None


def test_unsupervised_positions_do_not_count(tiny_qwen2_path):
    model, tokenizer, layout = make_unimm(tiny_qwen2_path, DUAL_SPEC)
    model.eval()
    batch = image_batch(tokenizer, layout, DUAL_SPEC, ["a red circle"], 4)
    text_only = dict(batch, labels=batch["labels"].masked_fill(batch["labels"] == layout.image_token_id, -100))
    with torch.no_grad():
        out = model(**text_only)
        # codes at visual positions that are not targets still shape the inputs but add no loss term
        shifted = {k: torch.where(v >= 0, (v + 1) % DUAL_SPEC[k][0], v) for k, v in batch["visual_codes"].items()}
        out_other_inputs = model(**dict(text_only, visual_codes=shifted))
    assert out.visual_losses == {}
    # the only supervised label is <|eoi|>
    assert int((text_only["labels"] != -100).sum()) == 1
    torch.testing.assert_close(out.loss, out.text_loss)
    assert not torch.allclose(out.loss, out_other_inputs.loss)


def test_gradients_reach_heads_code_embeddings_and_new_rows(tiny_llm_path):
    model, tokenizer, layout = make_unimm(tiny_llm_path, DUAL_SPEC)
    model.train()
    batch = image_batch(tokenizer, layout, DUAL_SPEC, ["a red circle", "a blue square"], 3)
    model(**batch).loss.backward()
    for name in DUAL_SPEC:
        for pname, param in model.depth_heads[name].named_parameters():
            assert param.grad is not None and param.grad.abs().sum() > 0, f"{name}.{pname}"
        assert model.visual_embedding.tables[name].weight.grad.abs().sum() > 0
    assert model.get_input_embeddings().weight.grad[layout.boi_token_id].abs().sum() > 0
    assert model.get_output_embeddings().weight.grad[layout.eoi_token_id].abs().sum() > 0


def test_num_items_in_batch_makes_gradient_accumulation_exact(tiny_qwen2_path):
    model, tokenizer, layout = make_unimm(tiny_qwen2_path, DUAL_SPEC)
    model.eval()
    batch = image_batch(tokenizer, layout, DUAL_SPEC, ["a red circle", "a green square at the top right"], 4)
    batch["labels"][1, -4:] = -100  # micro-batches with different numbers of targets
    total_items = int((batch["labels"][:, 1:] != -100).sum())
    with torch.no_grad():
        full = model(**batch).loss
        micro = [model(**{k: (v[i : i + 1] if torch.is_tensor(v) else {g: c[i : i + 1] for g, c in v.items()})
                          for k, v in batch.items()}, num_items_in_batch=torch.tensor(total_items)).loss
                 for i in range(2)]
    torch.testing.assert_close(sum(micro), full)


def _head(shared: bool, depth: int = 3, num_codes: int = 50, seed: int = 0):
    from unimm.llm.depth_head import DepthTransformerHead
    from unimm.tokenizer.types import CodebookGroupSpec

    torch.manual_seed(seed)
    return DepthTransformerHead(CodebookGroupSpec(num_codes=num_codes, depth=depth, code_dim=4), llm_hidden_size=12,
                                hidden_size=16, num_layers=2, num_heads=2, shared_classifier=shared).double()


@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("chunk_size", [1, 3, 7, 64])
def test_chunked_depth_loss_equals_unchunked_with_exact_gradients(shared, chunk_size):
    """The fused, chunked cross-entropy gives the loss, per-depth losses and every gradient of logits +
    F.cross_entropy (float64, so the comparison is tight)."""
    head = _head(shared)
    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(10, 12, dtype=torch.float64, generator=gen, requires_grad=True)
    codes = torch.randint(0, head.num_codes, (10, head.depth), generator=gen)
    weight = 0.7

    logits = head(hidden, codes)  # [M, D, K], the unchunked form
    ce = F.cross_entropy(logits.flatten(0, 1), codes.flatten(), reduction="none").view(codes.shape)
    reference = weight * ce.mean(dim=1).sum()
    reference.backward()
    expected = {"hidden": hidden.grad.clone(), **{n: p.grad.clone() for n, p in head.named_parameters()}}
    head.zero_grad()
    hidden.grad = None

    loss, depth_sums = head(hidden, codes, loss_scale=weight, chunk_size=chunk_size)
    assert not depth_sums.requires_grad
    torch.testing.assert_close(loss, reference, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(depth_sums.double(), ce.sum(dim=0).detach(), rtol=1e-6, atol=1e-6)
    (loss * 2.5).backward()  # the incoming gradient scales every gradient
    got = {"hidden": hidden.grad, **{n: p.grad for n, p in head.named_parameters()}}
    assert set(got) == set(expected)
    for name, grad in got.items():
        torch.testing.assert_close(grad, 2.5 * expected[name], rtol=1e-10, atol=1e-12, msg=name)


def test_chunked_depth_loss_without_grad_computes_no_gradient_buffers():
    head = _head(False)
    hidden, codes = torch.randn(5, 12, dtype=torch.float64), torch.randint(0, 50, (5, 3))
    with torch.no_grad():
        loss, depth_sums = head(hidden, codes, loss_scale=1.0, chunk_size=2)
    logits = head(hidden, codes).detach()
    ce = F.cross_entropy(logits.flatten(0, 1), codes.flatten(), reduction="none").view(codes.shape)
    torch.testing.assert_close(loss, ce.mean(dim=1).sum())
    assert not loss.requires_grad


def test_default_chunk_bounds_logits_memory():
    from unimm.llm.depth_head import LOSS_CHUNK_BYTES

    head = _head(False, depth=8, num_codes=16384)
    chunk = max(1, LOSS_CHUNK_BYTES // (4 * head.depth * head.num_codes))
    assert chunk == 128 and chunk * head.depth * head.num_codes * 4 <= LOSS_CHUNK_BYTES
