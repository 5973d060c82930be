"""`generate_images(decode=...)`: the static-cache step, its compiled form (and the fallback to eager) and
speculative Jacobi decoding give the codes of sequential eager decoding; Jacobi sampling keeps the model's
distribution."""

from __future__ import annotations

import warnings

import pytest
import torch

from tests.llm.conftest import DUAL_SPEC, VQRAE_SPEC, make_unimm
from unimm.llm import static_decode
from unimm.llm.generation import generate_images, guide, prefix_batch

PROMPTS = ["a red circle", "a blue square at the top right", "a green triangle"]


def _equal(a: dict, b: dict) -> bool:
    return list(a) == list(b) and all(torch.equal(a[n], b[n]) for n in a)


def _positional(path, spec, flat, positions=9):
    model, tokenizer, layout = make_unimm(path, spec, flat_codes=flat, num_image_positions=positions,
                                          image_position_embedding=True)
    with torch.no_grad():  # a clearly non-zero embedding, so a path that dropped or shifted it would disagree
        model.image_position_embedding.weight.normal_(std=1.0)
    return model.eval(), tokenizer, layout


@pytest.mark.parametrize("spec, flat", [(DUAL_SPEC, False), (VQRAE_SPEC, True)], ids=["dual", "flat"])
def test_static_cache_decoding_equals_eager(tiny_qwen2_path, spec, flat):
    model, tokenizer, _ = _positional(tiny_qwen2_path, spec, flat)
    # batches of 2 and 1 prompts: prefixes of different lengths, so different left padding per batch
    for kwargs in (dict(temperature=0.0), dict(temperature=1.0, top_k=20, top_p=0.9, seed=5)):
        kwargs.update(num_positions=9, cfg_scale=2.5, batch_size=2)
        eager = generate_images(model, tokenizer, PROMPTS, **kwargs)
        stats: dict = {}
        static = generate_images(model, tokenizer, PROMPTS, decode="static", stats=stats, **kwargs)
        assert _equal(static, eager), kwargs
        assert stats == {"llm_forwards": 2 * 9, "image_positions": 2 * 9}  # one forward per position and batch


def test_compiled_decoding_equals_eager_and_falls_back(tiny_qwen2_path, monkeypatch):
    # aot_eager traces the graphs torch.compile would hand to inductor (the static cache's in-place writes, the mask of
    # the final length) without generating kernels, which take minutes on a 2-core CPU; the benchmark uses inductor.
    monkeypatch.setattr(static_decode, "COMPILE_BACKEND", "aot_eager")
    for spec, flat in ((VQRAE_SPEC, True), (DUAL_SPEC, False)):
        model, tokenizer, _ = make_unimm(tiny_qwen2_path, spec, flat_codes=flat)
        kwargs = dict(num_positions=6, cfg_scale=2.5, temperature=0.0)
        eager = generate_images(model, tokenizer, PROMPTS, **kwargs)
        assert _equal(generate_images(model, tokenizer, PROMPTS, decode="compile", **kwargs), eager), spec
    assert _equal(generate_images(model, tokenizer, PROMPTS, decode="compile", **kwargs), eager)  # reuses graphs

    # A compiler that fails after the step has written into the cache: one warning, the write index is restored and
    # the step runs eagerly, with the same codes.
    model, tokenizer, _ = make_unimm(tiny_qwen2_path, VQRAE_SPEC, flat_codes=True)
    eager = generate_images(model, tokenizer, PROMPTS, **kwargs)

    def crashing_compile(fn, **_):
        def run(*args):
            fn(*args)
            raise RuntimeError("InvalidCxxCompiler: no working C++ compiler found")
        return run

    monkeypatch.setattr(static_decode.torch, "compile", crashing_compile)
    monkeypatch.setattr(static_decode, "COMPILE_BACKEND", "failing")
    monkeypatch.setattr(static_decode.MaybeCompiled, "failed_backends", set())
    with pytest.warns(RuntimeWarning, match="torch.compile failed .*InvalidCxxCompiler.*decoding eagerly"):
        fallback = generate_images(model, tokenizer, PROMPTS, decode="compile", **kwargs)
    assert _equal(fallback, eager)
    assert static_decode.MaybeCompiled.failed_backends == {"failing"}  # later calls go straight to eager
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert _equal(generate_images(model, tokenizer, PROMPTS, decode="compile", **kwargs), eager)
    assert not [w for w in caught if "torch.compile failed" in str(w.message)]


@pytest.mark.parametrize("positions", [9, 7], ids=["square", "not-square"])
def test_jacobi_greedy_equals_sequential(tiny_qwen2_path, positions):
    model, tokenizer, _ = _positional(tiny_qwen2_path, VQRAE_SPEC, True, positions)
    for cfg in (2.5, None):
        sequential = generate_images(model, tokenizer, PROMPTS, num_positions=positions, cfg_scale=cfg,
                                     temperature=0.0, batch_size=2)
        for window in (2, 4, 16):
            stats: dict = {}
            jacobi = generate_images(model, tokenizer, PROMPTS, num_positions=positions, cfg_scale=cfg,
                                     temperature=0.0, batch_size=2, decode="jacobi", jacobi_window=window,
                                     stats=stats)
            assert _equal(jacobi, sequential), (cfg, window)
            assert stats["image_positions"] == 2 * positions and stats["llm_forwards"] <= 2 * positions
    # this random model repeats codes, which the drafts guess: fewer forwards than positions
    stats = {}
    generate_images(model, tokenizer, PROMPTS, num_positions=positions, cfg_scale=2.5, temperature=0.0,
                    decode="jacobi", jacobi_window=4, stats=stats)
    assert stats["llm_forwards"] < positions


def test_jacobi_sampling_keeps_the_model_distribution(tiny_qwen2_path):
    """Three positions of three codes: the empirical joint law of Jacobi-sampled images (draft acceptance p/q, residual
    draws, carried drafts) is the exact law of the guided model, computed by enumeration."""
    spec = {"semantic": (3, 1)}
    model, tokenizer, layout = make_unimm(tiny_qwen2_path, spec, flat_codes=True)
    model.eval()
    prompt, cfg, temperature, positions = "a red circle", 2.0, 1.5, 3
    with torch.no_grad():
        start, stop = layout.code_token_range
        # large code rows in and out: a law far from uniform whose next code depends on the codes before
        torch.manual_seed(1)
        model.get_output_embeddings().weight[start:stop].normal_(std=0.3)
        model.get_input_embeddings().weight[start:stop].normal_(std=3.0)
        prefix_ids, prefix_mask = prefix_batch(tokenizer, layout, [prompt], cfg, None, torch.device("cpu"))

        def next_probs(codes: list[int]) -> torch.Tensor:
            tokens = torch.tensor([[layout.code_to_token(c) for c in codes]] * 2, dtype=torch.long)
            ids = torch.cat([prefix_ids, tokens], 1)
            mask = torch.cat([prefix_mask, torch.ones_like(tokens)], 1)
            position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
            logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids).logits[:, -1, start:stop]
            return (guide(logits.float(), cfg) / temperature).softmax(-1)[0]

        exact = torch.zeros(3, 3, 3)
        first = next_probs([])
        for a in range(3):
            second = next_probs([a])
            for b in range(3):
                exact[a, b] = first[a] * second[b] * next_probs([a, b])
    samples = 1600
    codes = generate_images(model, tokenizer, [prompt] * samples, num_positions=positions, cfg_scale=cfg,
                            temperature=temperature, seed=0, batch_size=4, decode="jacobi", jacobi_window=3)
    flat_index = (codes["semantic"][..., 0] * torch.tensor([9, 3, 1])).sum(-1)
    empirical = torch.bincount(flat_index, minlength=27).float() / samples
    total_variation = 0.5 * (empirical - exact.flatten()).abs().sum()
    # sampling noise: E[TV] ~ 0.05 for 1600 draws over 27 outcomes; wrong acceptance rules give 0.15 and more
    assert exact.max() > 0.1 and exact.min() < 0.01  # the law is not uniform
    assert total_variation < 0.1, (total_variation, exact.flatten(), empirical)


def test_decode_mode_errors(tiny_qwen2_path):
    model, tokenizer, _ = make_unimm(tiny_qwen2_path, DUAL_SPEC)
    with pytest.raises(ValueError, match="decode must be one of eager, static, compile, jacobi, jacobi-compile"):
        generate_images(model, tokenizer, PROMPTS, num_positions=2, decode="fast")
    with pytest.raises(ValueError, match="needs the flat layout"):
        generate_images(model, tokenizer, PROMPTS, num_positions=2, decode="jacobi")
    with pytest.raises(ValueError, match="use_cache=False is only for decode='eager'"):
        generate_images(model, tokenizer, PROMPTS, num_positions=2, decode="static", use_cache=False)
    flat, flat_tokenizer, _ = make_unimm(tiny_qwen2_path, VQRAE_SPEC, flat_codes=True)
    with pytest.raises(ValueError, match="jacobi_window must be at least 2"):
        generate_images(flat, flat_tokenizer, PROMPTS, num_positions=2, decode="jacobi", jacobi_window=1)


@pytest.mark.parametrize("decode", ["static", "jacobi"])
def test_progress_reaches_every_position_in_the_cache_modes(tiny_qwen2_path, decode):
    model, tokenizer, _ = _positional(tiny_qwen2_path, VQRAE_SPEC, True, 9)
    kwargs = dict(num_positions=9, cfg_scale=2.5, temperature=0.0, batch_size=2, decode=decode, jacobi_window=4)
    calls: list[tuple[int, int]] = []
    reported = generate_images(model, tokenizer, PROMPTS, progress=lambda done, total: calls.append((done, total)),
                               **kwargs)
    assert _equal(reported, generate_images(model, tokenizer, PROMPTS, **kwargs))
    batches = [[]]
    for done, total in calls:
        assert total == 9
        if batches[-1] and done <= batches[-1][-1]:
            batches.append([])
        batches[-1].append(done)
    assert len(batches) == 2 and all(b[-1] == 9 and b[0] >= 1 for b in batches), calls
    if decode == "static":
        assert batches == [list(range(1, 10))] * 2
    else:  # several positions per forward: fewer reports than positions, strictly increasing
        assert len(calls) < 18 and all(b == sorted(set(b)) for b in batches)
