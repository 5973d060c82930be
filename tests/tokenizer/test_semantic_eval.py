"""Semantic preservation metrics (unimm.tokenizer.semantic_eval) on tiny random towers."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from unimm.tokenizer import build_tokenizer
from unimm.tokenizer.quantizers import Quantizer
from unimm.tokenizer.semantic_eval import FeatureAgreement, evaluate_semantic_preservation
from unimm.tokenizer.types import QuantizerOutput


class IdentityQuantizer(Quantizer):
    """Passes its input through unchanged (a lossless stand-in for the semantic ResidualVQ)."""

    def __init__(self, dim: int, depth: int):
        super().__init__()
        self.dim, self.depth, self.num_codes = dim, depth, 2

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        indices = torch.zeros(*z.shape[:-1], self.depth, dtype=torch.long, device=z.device)
        return QuantizerOutput(quantized=z, indices=indices, loss=z.new_zeros(()))


def _batches(count: int = 2, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 3, 32, 32, generator=gen) for _ in range(count)]


def _identity_semantic_path(**overrides) -> nn.Module:
    """Fresh tiny DualToken whose semantic path (projection, quantizer, projection back) is the identity."""
    model = build_tokenizer("dualtoken-tiny", semantic_code_dim=64, **overrides)  # code dim = encoder width
    with torch.no_grad():
        for projection in (model.semantic_proj_in, model.semantic_proj_out):
            projection.weight.copy_(torch.eye(64))
            projection.bias.zero_()
    model.semantic_quantizer = IdentityQuantizer(64, model.config.semantic_depth)
    return model.eval()


def test_feature_agreement_formulas():
    agreement = FeatureAgreement()
    reference = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]])
    agreement.update(torch.tensor([[[2.0, 0.0], [0.0, -2.0]]]), reference)
    result = agreement.compute()
    assert result["cosine"] == pytest.approx(0.0)  # (+1 + -1) / 2
    assert result["relative_mse"] == pytest.approx((1.0 + 16.0) / 5.0)
    with pytest.raises(ValueError, match="no features"):
        FeatureAgreement().compute()


def test_identity_semantic_path_scores_cosine_one():
    model = _identity_semantic_path()
    results = evaluate_semantic_preservation(model, _batches())
    assert set(results) == {"layer", "output", "pooled", "semantic_layer", "num_images"}
    assert results["semantic_layer"] == model.config.semantic_layer and results["num_images"] == 4
    for place in ("layer", "output", "pooled"):
        assert results[place]["cosine"] == pytest.approx(1.0, abs=1e-6)
        assert results[place]["relative_mse"] == pytest.approx(0.0, abs=1e-10)


def test_fresh_quantised_semantic_path_loses_semantics():
    model = build_tokenizer("dualtoken-tiny").eval()
    results = evaluate_semantic_preservation(model, [{"pixel_values": x} for x in _batches()])
    for place in ("layer", "output", "pooled"):
        assert results[place]["cosine"] < 0.99 and results[place]["relative_mse"] > 1e-3


def test_reference_is_the_initial_encoder_not_the_trained_one():
    model = _identity_semantic_path(train_encoder=True)
    model.set_train_encoder(True)  # the teacher is a frozen copy of the encoder as it is now
    with torch.no_grad():  # "training" moves the encoder away from its initial weights
        for param in model.encoder.encoder.layers[0].parameters():
            param.add_(0.5 * torch.randn_like(param))
    moved = evaluate_semantic_preservation(model, _batches())
    assert moved["layer"]["cosine"] < 0.999 and moved["layer"]["relative_mse"] > 1e-4
    # Against the moved encoder itself (explicit reference), the identity path agrees exactly again.
    same = evaluate_semantic_preservation(model, _batches(), reference_encoder=copy.deepcopy(model.encoder))
    assert same["layer"]["cosine"] == pytest.approx(1.0, abs=1e-6)

    model.drop_teacher()  # a trained encoder without its teacher: the initial encoder is unknown
    with pytest.raises(ValueError, match="reference_encoder"):
        evaluate_semantic_preservation(model, _batches())


@pytest.mark.parametrize("encoder_type", ["siglip", "dinov2"])
def test_vqrae_compares_encoder_outputs(encoder_type):
    model = build_tokenizer("vqrae-tiny", encoder_type=encoder_type, encoder_use_head=True)
    with pytest.raises(ValueError, match="reference_encoder"):
        evaluate_semantic_preservation(model, _batches())
    model.set_stage(2)  # teacher = the stage-1 encoder
    results = evaluate_semantic_preservation(model, _batches(1))
    assert {"output", "pooled"} <= set(results) and "layer" not in results
    assert results["output"]["cosine"] == pytest.approx(1.0, abs=1e-6)
    with torch.no_grad():
        for param in model.encoder.parameters():
            param.add_(0.2 * torch.randn_like(param))
    assert evaluate_semantic_preservation(model, _batches(1))["output"]["cosine"] < 0.999


def test_eval_tokenizer_json_reports_semantic_preservation(tmp_path):
    from unimm.cli import eval_tokenizer as script

    argv = ["--dataset", "sample_photos", "--image_size", "32", "--max_images", "4", "--num_grid_images", "0"]
    dual = build_tokenizer("dualtoken-tiny")  # encoder never trained: it is its own reference
    dual.save_pretrained(tmp_path / "dual")
    results = script.main([*argv, "--model_path", str(tmp_path / "dual"), "--output_json", str(tmp_path / "d.json")])
    written = json.loads((tmp_path / "d.json").read_text())["semantic"]
    assert written == results["semantic"] and written["num_images"] == 4
    assert 0 < written["layer"]["cosine"] < 1 and written["pooled"]["relative_mse"] > 0

    vqrae = build_tokenizer("vqrae-tiny")  # its encoder may have been trained: needs the initial encoder
    vqrae.save_pretrained(tmp_path / "vqrae")
    argv += ["--model_path", str(tmp_path / "vqrae"), "--output_json", str(tmp_path / "v.json")]
    assert "reference_encoder" in script.main(argv)["semantic"]["skipped"]
    vqrae.encoder.save_pretrained(tmp_path / "encoder")  # unchanged since initialisation: agreement is exact
    semantic = script.main([*argv, "--reference_encoder", str(tmp_path / "encoder")])["semantic"]
    assert semantic["output"]["cosine"] == pytest.approx(1.0, abs=1e-6)
    assert semantic["output"]["relative_mse"] == pytest.approx(0.0, abs=1e-10)


def _sharded_worker(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        torch.manual_seed(0)  # the same tokenizer on both ranks
        model = build_tokenizer("dualtoken-tiny").eval()
        reference = copy.deepcopy(model.encoder)
        with torch.no_grad():  # a reference that differs from the tokenizer's own encoder
            for param in reference.parameters():
                param.add_(0.05 * torch.randn_like(param))
        # Rank 0 gets all three batches, rank 1 none: a rank with an empty shard still takes part in the reduction.
        batches = _batches(count=3) if rank == 0 else []
        results = evaluate_semantic_preservation(model, batches, reference)
        with open(f"{out_dir}/rank{rank}.json", "w") as f:
            json.dump(results, f)
    finally:
        dist.destroy_process_group()


def test_sharded_evaluation_reports_every_ranks_images(tmp_path):
    """Under 2 gloo ranks, each rank reports the metrics of all images, equal to one process evaluating them all."""
    import torch.multiprocessing as mp

    mp.spawn(_sharded_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    torch.manual_seed(0)
    model = build_tokenizer("dualtoken-tiny").eval()
    reference = copy.deepcopy(model.encoder)
    with torch.no_grad():
        for param in reference.parameters():
            param.add_(0.05 * torch.randn_like(param))
    expected = evaluate_semantic_preservation(model, _batches(count=3), reference)
    for rank in range(2):
        results = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert results["num_images"] == 6
        assert set(results) == set(expected)
        for place in ("layer", "output", "pooled"):
            assert results[place] == pytest.approx(expected[place], rel=1e-9)
    assert expected["layer"]["cosine"] < 0.999  # the reference differs: the metric measured something


def test_a_tokenizer_without_stages_or_encoder_training_goes_through_the_base_defaults(tmp_path):
    """A third tokenizer that brings no stages, no encoder training and no semantic layer of its own (here VQRAE's
    building blocks with the base class's switches) is trained and evaluated through the base class's neutral
    defaults; nothing asks which class it is."""
    from types import SimpleNamespace

    from unimm.tokenizer.base import VisualTokenizer
    from unimm.tokenizer.semantic_eval import quantized_feature_zero_shot_unavailable
    from unimm.tokenizer.vqrae import VQRAE
    from unimm.train.tokenizer.build import build_tokenizer_model

    class Plain(VQRAE):
        set_stage = VisualTokenizer.set_stage

    model = Plain(build_tokenizer("vqrae-tiny").config).eval()
    assert model.stage == 1 and model.train_encoder is False and model.initial_encoder is None
    with pytest.raises(ValueError, match="Plain has no training stages"):
        model.set_stage(2)
    with pytest.raises(ValueError, match="Plain does not train its encoder against a teacher"):
        model.set_train_encoder(True)
    model.set_train_encoder(False)
    with pytest.raises(ValueError, match="initial encoder is unknown"):
        evaluate_semantic_preservation(model, _batches(1))
    results = evaluate_semantic_preservation(model, _batches(1), reference_encoder=copy.deepcopy(model.encoder))
    assert results["semantic_layer"] == model.encoder_num_layers and "layer" not in results
    assert results["output"]["cosine"] == pytest.approx(1.0)
    assert "Plain has no quantised semantic features" in quantized_feature_zero_shot_unavailable(model)
    # the trainer's model setup (a saved Plain, loaded by its class): stage 1 and no teacher pass; another stage or
    # a teacher is refused
    import unimm.tokenizer as tokenizer_package

    model.save_pretrained(tmp_path / "plain")
    args = dict(preset=None, model_path=str(tmp_path / "plain"), encoder_path=None, model_overrides={}, stage=1,
                teacher_path=None, decoder_only=False)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tokenizer_package, "load_tokenizer", lambda path, **kwargs: Plain.from_pretrained(path))
        built = build_tokenizer_model(SimpleNamespace(**args))
        assert type(built) is Plain and built.teacher is None
        with pytest.raises(ValueError, match="stage=2: Plain has no training stages"):
            build_tokenizer_model(SimpleNamespace(**{**args, "stage": 2}))
        with pytest.raises(ValueError, match="teacher_path is set"):
            build_tokenizer_model(SimpleNamespace(**{**args, "teacher_path": "t"}))


def test_dualtoken_and_vqrae_answer_the_base_switches_with_their_own_values():
    dualtoken = build_tokenizer("dualtoken-tiny")
    assert dualtoken.semantic_layer == dualtoken.config.semantic_layer < dualtoken.encoder_num_layers
    assert dualtoken.quantizes_semantic_features and dualtoken.initial_encoder is dualtoken.encoder
    dualtoken.set_train_encoder(True)
    assert dualtoken.train_encoder and dualtoken.initial_encoder is dualtoken.teacher is not None
    vqrae = build_tokenizer("vqrae-tiny")
    assert vqrae.semantic_layer == vqrae.encoder_num_layers and not vqrae.quantizes_semantic_features
    assert vqrae.initial_encoder is None
    vqrae.set_stage(2)
    assert vqrae.initial_encoder is vqrae.teacher is not None
