"""VQRAE and DualToken models: the docs/DESIGN.md §2.6 interface, save/load, training stages, presets,
pre/post-processing."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from unimm.tokenizer import TokenizerOutput, build_tokenizer, load_tokenizer
from unimm.tokenizer.encoders import EncoderAccess
from unimm.tokenizer.presets import tiny_encoder_config

TINY = ["vqrae-tiny", "dualtoken-tiny"]


def _pixels(batch: int = 2, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("preset", TINY)
def test_encode_decode_contract(preset):
    model = build_tokenizer(preset).eval()
    x = _pixels()
    codes = model.encode(x)
    spec = model.codebook_spec
    assert list(codes) == list(spec)  # group order = codebook_spec order
    assert model.image_size == 32 and model.num_positions == 64
    for group, value in codes.items():
        assert value.dtype == torch.long
        assert value.shape == (2, 64, spec[group].depth)
        assert 0 <= int(value.min()) and int(value.max()) < spec[group].num_codes
    image = model.decode(codes)
    assert image.shape == x.shape and image.dtype == torch.float32 and torch.isfinite(image).all()
    features = model.encode_features(x)
    assert features.shape == (2, 64, model.encoder_hidden_size)
    assert len(model.config_hash()) == 64
    with pytest.raises(ValueError, match="32x32"):
        model.encode(_pixels(size=16))


def test_codebook_specs():
    vqrae, dual = build_tokenizer("vqrae-tiny"), build_tokenizer("dualtoken-tiny", pixel_depth=3)
    assert vqrae.codebook_spec["semantic"].depth == 1
    assert vqrae.codebook_spec["semantic"].num_codes == vqrae.config.num_codes
    assert dual.codebook_spec["pixel"].depth == 3 and dual.codebook_spec["semantic"].depth == 2
    assert dual.encode(_pixels())["pixel"].shape[-1] == 3


@pytest.mark.parametrize("preset", TINY)
def test_training_forward_and_save_load_round_trip(preset, tmp_path):
    model = build_tokenizer(preset)
    x = _pixels()
    model.train()
    out = model(x)
    assert isinstance(out, TokenizerOutput)
    assert out.reconstruction.shape == x.shape
    assert "quantizer" in out.losses and all(v.dim() == 0 for v in out.losses.values())
    for group in model.codebook_spec:
        assert f"{group}/utilisation" in out.stats and f"{group}/perplexity" in out.stats
    (out.loss + out.reconstruction.pow(2).mean()).backward()
    assert model.decoder_last_layer().grad is not None
    assert all(p.grad is None for p in model.encoder.parameters())  # frozen encoder by default

    model.eval()
    codes, image = model.encode(x), model.decode(model.encode(x))
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["encoder_config"]["model_type"] == "siglip_vision_model"  # the encoder lives in the checkpoint
    loaded = load_tokenizer(tmp_path)
    assert type(loaded) is type(model)
    loaded_codes = loaded.encode(x)
    for group in codes:
        assert torch.equal(codes[group], loaded_codes[group])
    assert torch.equal(image, loaded.decode(loaded_codes))
    assert torch.equal(model.encode_features(x), loaded.encode_features(x))
    assert loaded.config_hash() == model.config_hash()


def test_load_tokenizer_rejects_other_checkpoints(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    with pytest.raises(ValueError, match="not a UniMM tokenizer"):
        load_tokenizer(tmp_path)


def test_vqrae_stage2_teacher_frozen_and_distill_zero_at_start(tmp_path):
    model = build_tokenizer("vqrae-tiny")
    assert model.parameter_groups()["encoder"] == [] and model.teacher is None
    model.set_stage(2)
    model.train()
    teacher = model.teacher
    assert teacher is not None and not teacher.training
    assert all(not p.requires_grad for p in teacher.parameters())
    teacher_ids = {id(p) for p in teacher.parameters()}
    assert not teacher_ids & {id(p) for p in model.parameters()}  # not a submodule: not trained, not saved
    groups = model.parameter_groups()
    assert len(groups["encoder"]) > 0 and not {id(p) for p in groups["encoder"]} & {id(p) for p in groups["other"]}

    x = _pixels()
    out = model(x)
    assert out.losses["distill"].item() == 0.0
    optimizer = torch.optim.SGD(groups["encoder"], lr=1.0)
    (out.reconstruction.pow(2).mean() + out.losses["quantizer"]).backward()
    optimizer.step()
    teacher_before = [p.clone() for p in teacher.parameters()]
    assert model(x).losses["distill"].item() > 0
    assert all(torch.equal(a, b) for a, b in zip(teacher_before, teacher.parameters()))

    model.save_pretrained(tmp_path)
    assert load_tokenizer(tmp_path).state_dict().keys() == model.state_dict().keys()
    model.set_stage(1)
    assert model.teacher is None and "distill" not in model(x).losses


def test_vqrae_encoder_families():
    x = _pixels()
    for encoder_type, mean in (("siglip2", (0.5, 0.5, 0.5)), ("dinov2", (0.485, 0.456, 0.406))):
        model = build_tokenizer("vqrae-tiny", encoder_type=encoder_type).eval()
        assert model.image_mean == mean
        assert model.encode(x)["semantic"].shape == (2, 64, 1)  # DINOv2's CLS token is dropped
        assert model.encode_features(x).shape == (2, 64, 64)
        assert model.decode(model.encode(x)).shape == x.shape


def test_dualtoken_semantic_codes_replace_the_hidden_state():
    model = build_tokenizer("dualtoken-tiny").eval()
    x = _pixels()
    codes = model.encode(x)
    features = model.encode_features(x)
    # Downstream layers see only the de-quantised codes: recompute them by hand from the codes.
    access = EncoderAccess(model.encoder)
    hidden = model.semantic_proj_out(model.semantic_quantizer.lookup(codes["semantic"]))
    for layer in model.encoder.encoder.layers[model.config.semantic_layer :]:
        hidden = layer(hidden, None)
    expected = model.encoder.post_layernorm(hidden)
    torch.testing.assert_close(features, expected)
    torch.testing.assert_close(model.features_from_codes(codes)[0], features)
    # ... and not the continuous encoder output.
    plain = access.patch_features(x)
    assert not torch.allclose(features, plain, atol=1e-3)
    # Changing only the semantic codes changes the features; the pixel codes do not matter.
    changed = dict(codes, semantic=(codes["semantic"] + 1) % model.config.semantic_num_codes)
    assert not torch.allclose(model.features_from_codes(changed)[0], features)
    changed_pixel = dict(codes, pixel=(codes["pixel"] + 1) % model.config.pixel_num_codes)
    torch.testing.assert_close(model.features_from_codes(changed_pixel)[0], features)
    # DualToken decodes from pixel codes only.
    assert torch.equal(model.decode(codes), model.decode({"pixel": codes["pixel"]}))


def test_dualtoken_semantic_loss_and_trainable_encoder():
    model = build_tokenizer("dualtoken-tiny", train_encoder=True)
    model.train()
    x = _pixels()
    out = model(x)  # no explicit teacher: a copy of the current encoder is taken (with a warning)
    assert model.teacher is not None and out.losses["semantic"].item() > 0
    out.loss.backward()
    assert model.semantic_proj_in.weight.grad is not None and model.semantic_proj_out.weight.grad is not None
    assert any(p.grad is not None for p in model.encoder.parameters())
    assert len(model.parameter_groups()["encoder"]) > 0
    model.set_train_encoder(False)
    assert model.teacher is None and model.parameter_groups()["encoder"] == []


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"semantic_layer": 40}, "semantic_layer=40 but the encoder has 4 layers"),
        ({"pixel_layer": 0}, "pixel_layer=0 but the encoder has 4 layers"),
        ({"shortcut_layer": 9}, "shortcut_layer=9"),
        ({"pixel_layer": 4, "semantic_layer": 3}, "pixel_layer=4 must not be deeper than semantic_layer=3"),
        ({"pixel_code_dim": 0}, "pixel_code_dim=0"),
        ({"semantic_num_codes": 1}, "semantic_num_codes=1"),
    ],
)
def test_dualtoken_invalid_config_names_the_key(overrides, message):
    with pytest.raises(ValueError, match=message):
        build_tokenizer("dualtoken-tiny", **overrides)


def test_invalid_preset_arguments():
    with pytest.raises(ValueError, match="unknown tokenizer preset"):
        build_tokenizer("vqrae-huge")
    with pytest.raises(ValueError, match="unknown override"):
        build_tokenizer("vqrae-tiny", num_kodes=3)
    with pytest.raises(ValueError, match="SigLIP"):
        build_tokenizer("dualtoken-tiny", encoder_type="dinov2")


@pytest.mark.parametrize("preset", ["vqrae-siglip2-so400m-256", "dualtoken-siglip-so400m-384"])
def test_paper_presets_need_encoder_path(preset):
    with pytest.raises(ValueError, match="encoder_path"):
        build_tokenizer(preset)


def test_paper_presets_from_local_encoder_checkpoint(tmp_path):
    from transformers import SiglipConfig, SiglipModel

    # A full SigLIP checkpoint (vision + text towers), as published, with its image-processor file.
    vision = tiny_encoder_config("siglip", num_layers=4, use_head=True)
    vision.pop("model_type")
    text = dict(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        vocab_size=64,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    siglip = SiglipModel(SiglipConfig(vision_config=vision, text_config=text))
    encoder_dir = tmp_path / "siglip"
    siglip.save_pretrained(encoder_dir)
    (encoder_dir / "preprocessor_config.json").write_text(
        json.dumps({"image_mean": [0.4, 0.4, 0.4], "image_std": [0.2, 0.2, 0.2], "size": {"height": 32, "width": 32}})
    )
    small = dict(decoder_num_layers=1)
    dual = build_tokenizer(
        "dualtoken-siglip-so400m-384",
        encoder_path=encoder_dir,
        pixel_layer=2,
        shortcut_layer=1,
        semantic_layer=3,
        pixel_num_codes=64,
        semantic_num_codes=64,
        decoder_type="vit",  # this test is about the encoder checkpoint; the paper's CNN decoder is pinned apart
        **small,
    )
    vqrae = build_tokenizer("vqrae-siglip2-so400m-256", encoder_path=encoder_dir, num_codes=64, code_dim=16, **small)
    for model in (dual, vqrae):
        assert torch.equal(
            model.encoder.embeddings.patch_embedding.weight, siglip.vision_model.embeddings.patch_embedding.weight
        )
        assert model.image_mean == (0.4, 0.4, 0.4) and model.image_std == (0.2, 0.2, 0.2)
        assert model.image_size == 32
        # neither paper trains with l-DeTok (the -detok presets do)
        assert model.config.denoising["noise_gamma"] == 0.0 and model.config.denoising["mask_ratio_max"] == 0.0
    assert dual.config.pixel_depth == 4 and vqrae.config.code_dim == 16  # depth follows positions: 64 < 729

    # The saved tokenizer carries its encoder: it loads after the encoder checkpoint is gone.
    x = _pixels()
    dual.eval()
    codes = dual.encode(x)
    dual.save_pretrained(tmp_path / "tok")
    for file in encoder_dir.iterdir():
        file.unlink()
    loaded = load_tokenizer(tmp_path / "tok")
    assert torch.equal(loaded.encode(x)["semantic"], codes["semantic"])
    assert loaded.image_mean == (0.4, 0.4, 0.4)

    # A directory without a checkpoint fails clearly.
    with pytest.raises(FileNotFoundError, match="config.json"):
        build_tokenizer("dualtoken-siglip-so400m-384", encoder_path=encoder_dir)


def test_dualtoken_depth_follows_resolution_and_position_grid_resizes(tmp_path):
    from transformers import SiglipVisionConfig, SiglipVisionModel

    config = tiny_encoder_config("siglip", num_layers=4, use_head=True)
    config.pop("model_type")
    SiglipVisionModel(SiglipVisionConfig(**config)).save_pretrained(tmp_path)
    model = build_tokenizer(
        "dualtoken-siglip-so400m-384",
        encoder_path=tmp_path,
        image_size=16,
        pixel_layer=2,
        shortcut_layer=1,
        semantic_layer=3,
        pixel_num_codes=64,
        semantic_num_codes=64,
        decoder_type="vit",
        decoder_num_layers=1,
    ).eval()
    assert model.config.pixel_depth == 4 and model.num_positions == 16
    x = _pixels(size=16)
    assert model.encode(x)["pixel"].shape == (2, 16, 4)
    assert model.decode(model.encode(x)).shape == x.shape


def test_config_hash_ignores_training_options(tmp_path):
    base = build_tokenizer("vqrae-tiny")
    assert build_tokenizer("vqrae-tiny", denoising={"noise_gamma": 3.0}).config_hash() == base.config_hash()
    assert build_tokenizer("vqrae-tiny", distill_weight=0.5).config_hash() == base.config_hash()
    assert build_tokenizer("vqrae-tiny", num_codes=256).config_hash() != base.config_hash()
    assert build_tokenizer("vqrae-tiny", image_size=16).config_hash() != base.config_hash()


def test_preprocess_and_postprocess_use_processor_settings():
    model = build_tokenizer("vqrae-tiny", encoder_type="dinov2")
    rng = np.random.default_rng(0)
    array = rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
    pixels = model.preprocess([Image.fromarray(array), Image.fromarray(array).convert("L")])
    assert pixels.shape == (2, 3, 32, 32) and pixels.dtype == torch.float32
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    expected = ((array / 255.0 - mean) / std).transpose(2, 0, 1)
    np.testing.assert_allclose(pixels[0].numpy(), expected, atol=1e-5)
    round_trip = model.postprocess(pixels)
    assert round_trip[0].mode == "RGB" and round_trip[0].size == (32, 32)
    assert np.array_equal(np.asarray(round_trip[0]), array)
    resized = model.preprocess(Image.fromarray(rng.integers(0, 256, size=(50, 70, 3), dtype=np.uint8)))
    assert resized.shape == (1, 3, 32, 32)


def test_decoder_only_finetune_freezes_all_but_decoder():
    model = build_tokenizer("dualtoken-tiny", denoising={"noise_gamma": 3.0, "mask_ratio_max": 0.7})
    model.set_decoder_only(True)
    model.train()
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(name.startswith("decoder.") for name in trainable)
    assert model.decoder.training and not model.pixel_quantizer.training and not model.encoder.training
    codebooks = model.pixel_quantizer.codebooks.clone()
    x = _pixels()
    out = model(x)
    assert torch.equal(model.pixel_quantizer.codebooks, codebooks)  # EMA codebooks do not move
    model.eval()
    torch.testing.assert_close(out.reconstruction, model(x).reconstruction)  # no denoising in training either
    model.set_decoder_only(False)
    assert model.denoiser.active and model.semantic_proj_in.weight.requires_grad
    assert not any(p.requires_grad for p in model.encoder.parameters())


def test_gradient_checkpointing_reaches_encoder_and_decoder():
    model = build_tokenizer("vqrae-tiny")
    model.gradient_checkpointing_enable()
    model.set_stage(2)
    model.train()
    out = model(_pixels())
    (out.loss + out.reconstruction.pow(2).mean()).backward()
    assert model.decoder.blocks[0].gradient_checkpointing
    assert model.encoder.encoder.layers[0].self_attn.q_proj.weight.grad is not None


@pytest.mark.parametrize(
    ("preset", "overrides"),
    [
        ("vqrae-tiny", {"encoder_use_head": True}),
        ("vqrae-tiny", {"encoder_type": "dinov2"}),
        ("dualtoken-tiny", {"train_encoder": True}),
        ("dualtoken-tiny", {"train_encoder": True, "semantic_pooled_loss": False}),
        ("dualtoken-tiny", {"train_encoder": True, "semantic_weight": 0.0}),
    ],
)
def test_every_trainable_parameter_gets_a_gradient(preset, overrides):
    """DDP (find_unused_parameters=False) needs a gradient for each trainable parameter at every step."""
    model = build_tokenizer(preset, **overrides)
    if preset.startswith("vqrae"):
        stages = [2]
    else:  # DualToken: every reference stage (stage 1 is the one-stage recipe)
        model.set_train_encoder(True)
        stages = [0, 1, 2]
    for stage in stages:
        model.set_stage(stage)
        model.train()
        model.zero_grad(set_to_none=True)
        out = model(_pixels())
        (out.loss + out.reconstruction.pow(2).mean()).backward()
        missing = [name for name, p in model.named_parameters() if p.requires_grad and p.grad is None]
        assert not missing, (stage, missing)
        # (Stage 0 trains only the encoder layers above semantic_layer, through the pooled loss when it is on.)
        assert model.parameter_groups()["encoder"] or (stage == 0 and model._semantic_pooled_weight == 0)


@pytest.mark.parametrize("encoder_type", ["siglip", "siglip2", "dinov2"])
def test_layerwise_encoder_access_matches_the_hf_forward(encoder_type):
    """Calling the HF modules one by one (as DualToken does) reproduces the model's own forward."""
    model = build_tokenizer("vqrae-tiny", encoder_type=encoder_type, encoder_use_head=encoder_type != "dinov2")
    access = EncoderAccess(model.encoder)
    x = _pixels()
    hidden = access.run_layers(access.embed(x), 0, 1)
    last, pooled = access.finalize(access.run_layers(hidden, 1, access.num_layers))
    torch.testing.assert_close(last, access.patch_features(x))
    if encoder_type != "siglip2":
        torch.testing.assert_close(pooled, model.encoder(pixel_values=x).pooler_output)
