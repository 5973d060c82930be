"""DualToken trained as its reference trains it (songweii/DualToken; docs/TOKENIZER_FIDELITY.md): the three stages'
freezing and loss mixes, the layer-26 term's two placements, the GAN weighting, the depth-by-depth EMA codebook
update, the up-projection masking, the paper presets' values, old checkpoints loading unchanged, and the three
stage recipes chained through the training program."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import SiglipVisionConfig, SiglipVisionModel

from unimm.cli import train_tokenizer as train_cli
from unimm.tokenizer import build_tokenizer, load_tokenizer
from unimm.tokenizer.losses import ReconstructionLoss, ReconstructionLossConfig
from unimm.tokenizer.presets import DUALTOKEN_PAPER, PRESETS, VQRAE_PAPER
from unimm.tokenizer.quantizers import ResidualVQ

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "configs" / "tokenizer"


@pytest.fixture(autouse=True)
def single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _tiny(**overrides):
    return build_tokenizer("dualtoken-tiny", train_encoder=True, **overrides)


def _trainable(model) -> set[str]:
    return {name for name, p in model.named_parameters() if p.requires_grad}


# ----------------------------------------------------------------------------- ResidualVQ: EMA depth by depth
def _ema_step(codebook, count, total, residual, indices, decay, eps):
    """One reference-style EMA step of one codebook from one depth's assignments (test's own arithmetic)."""
    k = codebook.shape[0]
    counts = torch.bincount(indices, minlength=k).float()
    sums = torch.zeros_like(codebook).index_add_(0, indices, residual)
    count = count * decay + counts * (1 - decay)
    total = total * decay + sums * (1 - decay)
    n = count.sum()
    smoothed = (count + eps) / (n + k * eps) * n
    return total / smoothed[:, None], count, total


def test_per_depth_ema_moves_the_shared_codebook_before_the_next_depth_searches():
    torch.manual_seed(0)
    quantizer = ResidualVQ(8, 4, depth=3, decay=0.5, restart_threshold=0.0, ema_per_depth=True).train()
    codebook, count, total = quantizer.codebooks[0].clone(), quantizer.ema_count[0].clone(), quantizer.ema_sum[0].clone()
    z = torch.randn(64, 4)
    out = quantizer(z)
    residual, approximation = z.clone(), torch.zeros_like(z)
    for d in range(3):
        indices = torch.cdist(residual, codebook).argmin(dim=-1)
        assert torch.equal(out.indices[:, d], indices), d  # depth d searched the codebook depths < d had moved
        codes = codebook[indices]
        codebook, count, total = _ema_step(codebook, count, total, residual, indices, 0.5, quantizer.eps)
        residual, approximation = residual - codes, approximation + codes
    torch.testing.assert_close(quantizer.codebooks[0], codebook)
    torch.testing.assert_close(out.quantized, approximation)

    # The default (the reference's semantic `rq_ema`): every depth searches the same codebook, one step after.
    torch.manual_seed(0)
    after_all = ResidualVQ(8, 4, depth=3, decay=0.5, restart_threshold=0.0).train()
    start = after_all.codebooks[0].clone()
    out_all = after_all(z)
    assert not torch.allclose(after_all.codebooks[0], quantizer.codebooks[0])
    residual = z.clone()
    for d in range(3):
        indices = torch.cdist(residual, start).argmin(dim=-1)
        assert torch.equal(out_all.indices[:, d], indices)
        residual = residual - start[indices]


def test_per_depth_ema_restarts_dead_codes_from_that_depths_residuals_and_leaves_eval_alone():
    torch.manual_seed(0)
    quantizer = ResidualVQ(16, 2, depth=2, decay=0.9, restart_threshold=1.0, ema_per_depth=True,
                           shared_codebook=False).train()
    out = quantizer(torch.randn(32, 2) * 0.01 + 5.0)  # far from every initial code: most codes die at once
    assert int(out.stats["restarts"]) > 0
    quantizer.eval()
    before = quantizer.codebooks.clone()
    quantizer(torch.randn(32, 2))
    assert torch.equal(before, quantizer.codebooks)


# ----------------------------------------------------------------------------- stages
def test_stage_switch_freezes_what_the_reference_freezes():
    model = _tiny(projection_block="attention", semantic_weight=0.0, semantic_pooled_weight=5.0)
    model.set_train_encoder(True)
    encoder_layers = [f"encoder.encoder.layers.{i}." for i in range(4)]

    model.set_stage(0)  # reference main.py stage 0: embeddings and layers [0, layer_sem) frozen
    names = _trainable(model)
    assert not any(n.startswith(("encoder.embeddings", *encoder_layers[:3])) for n in names)
    assert any(n.startswith(encoder_layers[3]) for n in names) and any(n.startswith("encoder.head") for n in names)
    assert any(n.startswith("decoder.") for n in names) and any(n.startswith("pixel_proj_in") for n in names)

    model.set_stage(1)  # everything
    names = _trainable(model)
    assert all(any(n.startswith(layer) for n in names) for layer in encoder_layers)
    assert any(n.startswith("encoder.embeddings") for n in names)

    model.set_stage(2)  # embeddings + layers [0, shortcut) frozen, the pixel branch frozen
    names = _trainable(model)
    assert not any(n.startswith(("encoder.embeddings", encoder_layers[0], "decoder.", "pixel_proj_in",
                                 "shortcut_proj_in")) for n in names)
    assert all(any(n.startswith(layer) for n in names) for layer in encoder_layers[1:])
    assert any(n.startswith("semantic_proj_in") for n in names)

    with pytest.raises(ValueError, match="stage must be one of"):
        model.set_stage(3)


def test_stage2_keeps_the_pixel_codebook_still_and_drops_its_commitment_loss():
    model = _tiny()
    model.set_train_encoder(True)
    model.set_stage(2)
    model.train()
    assert not model.pixel_quantizer.training and not model.decoder.training and model.semantic_quantizer.training
    pixels = torch.randn(4, 3, 32, 32)
    pixel_codebook, semantic_codebook = model.pixel_quantizer.codebooks.clone(), model.semantic_quantizer.codebooks.clone()
    model.pixel_quantizer.beta = 1e6  # a pixel commitment term, were it counted, would dwarf everything
    stage2 = model(pixels).losses["quantizer"]
    assert torch.equal(model.pixel_quantizer.codebooks, pixel_codebook)
    assert not torch.equal(model.semantic_quantizer.codebooks, semantic_codebook)
    model.set_stage(1)
    assert float(model(pixels).losses["quantizer"].detach()) > 1e3 * float(stage2.detach())


def test_stage0_semantic_loss_is_the_pooled_term_only():
    """Reference train.py stage 0: 5 x (MSE + 1 - cos) on the pooled output, no layer term. Before this change a
    semantic_weight of 0 switched the pooled term off with it."""
    model = _tiny(semantic_weight=0.0, semantic_pooled_weight=5.0)
    model.set_train_encoder(True)
    model.set_stage(0)
    model.eval()  # codebooks stay put between the forward and the hand computation
    pixels = torch.randn(2, 3, 32, 32)
    loss = model(pixels).losses["semantic"]
    _, _, pooled = model.semantic_features(pixels, quantize=True)
    _, _, target = model.semantic_features(pixels, encoder=model.teacher, quantize=False)
    expected = 5.0 * (F.mse_loss(pooled, target) + 1 - F.cosine_similarity(pooled, target, dim=-1).mean())
    torch.testing.assert_close(loss, expected, rtol=1e-4, atol=1e-5)


def test_layer_term_on_the_encoders_own_state_or_on_the_quantised_path():
    pixels = torch.randn(2, 3, 32, 32)
    for target in ("encoder", "quantized"):
        model = _tiny(semantic_pooled_loss=False, semantic_layer_target=target).eval()
        model.set_train_encoder(True)
        # A different teacher, so the encoder's own state differs from the target.
        with torch.no_grad():
            for p in model.teacher.parameters():
                p.add_(0.05 * torch.randn_like(p))
        loss = model(pixels).losses["semantic"]
        layer3 = model.encoder.encoder.layers[2].mlp.fc2.weight
        assert torch.count_nonzero(torch.autograd.grad(loss, layer3, retain_graph=True)[0]) > 0
        source = "quantize" if target == "quantized" else "own"
        hidden, _, _ = model.semantic_features(pixels, quantize=source == "quantize")
        teacher_hidden, _, _ = model.semantic_features(pixels, encoder=model.teacher, quantize=False)
        expected = model.config.semantic_weight * (
            F.mse_loss(hidden, teacher_hidden) + 1 - F.cosine_similarity(hidden, teacher_hidden, dim=-1).mean()
        )
        torch.testing.assert_close(loss, expected, rtol=1e-4, atol=1e-5)
        proj_out = list(model.semantic_proj_out.parameters())
        if target == "encoder":
            assert not any(p.requires_grad for p in proj_out)  # no loss reaches the projection back
        else:
            assert all(g is not None for g in torch.autograd.grad(loss, proj_out))


def test_cosine_only_layer_term_of_stage2():
    model = _tiny(semantic_pooled_loss=False, semantic_layer_loss="cos", semantic_weight=1.0)
    model.set_train_encoder(True)
    model.set_stage(2)
    model.eval()
    pixels = torch.randn(2, 3, 32, 32)
    loss = model(pixels).losses["semantic"]
    replaced, _, _ = model.semantic_features(pixels, quantize=True)
    target, _, _ = model.semantic_features(pixels, encoder=model.teacher, quantize=False)
    torch.testing.assert_close(loss, 1 - F.cosine_similarity(replaced, target, dim=-1).mean(), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="semantic_layer_loss"):
        _tiny(semantic_layer_loss="l1")


def test_teacher_of_another_shape_is_refused():
    model = _tiny()
    other = SiglipVisionModel(SiglipVisionConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                                 intermediate_size=64, patch_size=4, image_size=32))
    with pytest.raises(ValueError, match="teacher encoder does not match.*hidden_size 32 vs 64"):
        model.set_train_encoder(True, teacher_encoder=other)


# ----------------------------------------------------------------------------- up-projection masking
@pytest.mark.parametrize("causal", [True, False])
def test_up_projections_attend_causally_or_not_as_configured(causal):
    model = _tiny(projection_block="attention", decoder_type="cnn", cnn_decoder_channel_mult=[1, 2],
                  cnn_decoder_channels=8, cnn_decoder_in_channels=16, up_projection_causal=causal).eval()
    codes = torch.randn(1, model.num_positions, model.config.semantic_code_dim)
    changed = codes.clone()
    changed[:, -1] += torch.randn(codes.shape[-1])  # only the last token (raster order) differs
    for block in (model.semantic_proj_out, model.decoder.input_proj):
        first_same = torch.allclose(block(codes)[:, 0], block(changed)[:, 0])
        assert first_same == causal
    # The down-projections are bidirectional in both commits of the reference.
    latent = torch.randn(1, model.num_positions, model.encoder_hidden_size)
    moved = latent.clone()
    moved[:, -1] += torch.randn(latent.shape[-1])
    assert not torch.allclose(model.pixel_proj_in(latent)[:, 0], model.pixel_proj_in(moved)[:, 0])


# ----------------------------------------------------------------------------- GAN weighting
def test_reference_gan_weighting_clamps_a_weight_measured_on_unweighted_mse():
    torch.manual_seed(0)
    config = ReconstructionLossConfig(l2_weight=5.0, perceptual_weight=0.0, gan_weight=0.75, adaptive_gan_weight=True,
                                      adaptive_weight_min=0.3, adaptive_weight_max=10.0, adaptive_weight_l2_weight=1.0,
                                      disc_loss_weight=0.75, disc_loss_weight_from_step=10,
                                      disc_leaky_hinge=True, disc_base_channels=8,
                                      disc_num_layers=2, disc_norm="batch")
    loss = ReconstructionLoss(config, (0.5,) * 3, (0.5,) * 3)
    last_layer = torch.nn.Parameter(torch.randn(3, 3, 1, 1))
    inputs = torch.randn(2, 3, 16, 16)
    source = torch.randn(2, 3, 16, 16)
    for scale in (1.0, 1e-3, 1e3):  # inside the clamp, below 0.3, above 10
        recon = F.conv2d(source, last_layer * scale)
        total, logs = loss.generator_loss(inputs, recon, step=0, last_layer=last_layer)
        l2 = F.mse_loss(recon, inputs)
        generator = -loss.discriminator(recon).mean()
        rec_grad = torch.autograd.grad(l2, last_layer, retain_graph=True)[0]  # MSE at weight 1, not 5
        gen_grad = torch.autograd.grad(generator, last_layer, retain_graph=True)[0]
        expected = (rec_grad.norm() / (gen_grad.norm() + 1e-4)).clamp(0.3, 10.0)
        torch.testing.assert_close(logs["gan_adaptive_weight"], expected, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(total, 5.0 * l2 + 0.75 * expected * generator, rtol=1e-4, atol=1e-5)
        if scale != 1.0:
            assert float(expected) in (pytest.approx(0.3), pytest.approx(10.0))  # the clamp was exercised

    with torch.no_grad():
        hinge = 0.5 * (F.leaky_relu(1 - loss.discriminator(inputs)).mean()
                       + F.leaky_relu(1 + loss.discriminator(recon)).mean())
    first_epoch, _ = loss.discriminator_loss(inputs, recon, step=9)  # before disc_loss_weight_from_step: x 1
    later, logs = loss.discriminator_loss(inputs, recon, step=10)
    assert float(first_epoch.detach()) == pytest.approx(float(hinge), rel=1e-5)
    assert float(later.detach()) == pytest.approx(0.75 * float(hinge), rel=1e-5)
    assert logs["logits_real"].shape == logs["logits_fake"].shape == ()


def test_default_gan_weighting_is_unchanged():
    config = ReconstructionLossConfig()
    assert (config.adaptive_weight_min, config.adaptive_weight_max, config.adaptive_weight_l2_weight,
            config.disc_loss_weight, config.disc_loss_weight_from_step, config.disc_leaky_hinge) == (
        0.0, 1e4, None, 1.0, 0, False)


# ----------------------------------------------------------------------------- presets and old checkpoints
def test_paper_presets_choose_the_reference_behaviour():
    assert DUALTOKEN_PAPER["latent_norm"] is False and VQRAE_PAPER["latent_norm"] is False
    assert DUALTOKEN_PAPER["pixel_ema_per_depth"] is True and DUALTOKEN_PAPER["semantic_ema_per_depth"] is False
    assert DUALTOKEN_PAPER["up_projection_causal"] is True
    assert {"dualtoken-siglip-so400m-384", "dualtoken-siglip-so400m-384-detok"} <= set(PRESETS)


def test_checkpoint_saved_before_the_new_fields_loads_with_the_old_behaviour(tmp_path):
    model = build_tokenizer("dualtoken-tiny", projection_block="attention").eval()
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    new_fields = ("semantic_layer_target", "semantic_layer_loss", "pixel_ema_per_depth", "semantic_ema_per_depth",
                  "up_projection_causal")
    for key in new_fields:
        config.pop(key)
    (tmp_path / "config.json").write_text(json.dumps(config))
    old = load_tokenizer(tmp_path).eval()
    assert (old.config.semantic_layer_target, old.config.semantic_layer_loss, old.config.pixel_ema_per_depth,
            old.config.semantic_ema_per_depth, old.config.up_projection_causal) == ("quantized", "mse_cos", False,
                                                                                    False, True)
    assert old.config_hash() == model.config_hash()
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(old.encode_features(pixels), model.encode_features(pixels))


# ----------------------------------------------------------------------------- the three stages, chained
def _stage_argv(stage: int, root: Path, encoder: Path, steps: int = 3) -> list[str]:
    argv = [str(CONFIGS / f"dualtoken-tiny-stage{stage}.yaml"), "--progress_bar", "false",
            "--output_dir", str(root / f"stage{stage}"), "--max_steps", str(steps), "--logging_steps", "1",
            "--eval_max_images", "8"]
    if stage == 0:
        return argv + ["--encoder_path", str(encoder)]
    return argv + ["--model_path", str(root / f"stage{stage - 1}" / "model"), "--teacher_path", str(encoder)]


@pytest.mark.slow
def test_three_dualtoken_stages_chain_through_the_training_program(tmp_path):
    torch.manual_seed(0)
    encoder = tmp_path / "siglip"
    SiglipVisionModel(SiglipVisionConfig(hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                                         intermediate_size=128, patch_size=4, image_size=32,
                                         vision_use_head=True)).save_pretrained(encoder)
    original = {k: v for k, v in load_file(next(encoder.glob("*.safetensors"))).items()}
    summaries = [train_cli.main(_stage_argv(stage, tmp_path, encoder)) for stage in range(3)]
    weights = [load_file(tmp_path / f"stage{s}" / "model" / "model.safetensors") for s in range(3)]
    logs = [[json.loads(line) for line in (tmp_path / f"stage{s}" / "train_log.jsonl").read_text().splitlines()]
            for s in range(3)]
    assert all(s["status"] == "finished" for s in summaries)

    # Stage 0: the encoder up to the semantic layer is the pretrained one; the layer above it trained.
    def encoder_weight(stage, name):
        return weights[stage][f"encoder.{name}"]

    for name in ("encoder.layers.2.mlp.fc2.weight", "embeddings.patch_embedding.weight"):
        assert torch.equal(encoder_weight(0, name), original[name])
    assert not torch.equal(encoder_weight(0, "encoder.layers.3.mlp.fc2.weight"),
                           original["encoder.layers.3.mlp.fc2.weight"])
    assert all("gan_d" not in r for r in logs[0]) and all(r["loss/semantic"] > 0 for r in logs[0])

    # Stage 1: everything trains, the discriminator is on from the first step with the reference's clamp.
    assert not torch.equal(encoder_weight(1, "encoder.layers.0.mlp.fc2.weight"),
                           encoder_weight(0, "encoder.layers.0.mlp.fc2.weight"))
    assert all("gan_d" in r and 0.3 - 1e-6 <= r["gan_adaptive_weight"] <= 10 + 1e-6 for r in logs[1])

    # Stage 2: the pixel branch (decoder, projections, codebook) and layer 1 stand still; the semantic path moves.
    for key in weights[1]:
        if key.startswith(("decoder.", "pixel_proj_in", "shortcut_proj_in", "pixel_quantizer.",
                           "encoder.embeddings", "encoder.encoder.layers.0.")):
            assert torch.equal(weights[2][key], weights[1][key]), key
    for key in ("semantic_proj_in.weight", "encoder.encoder.layers.2.mlp.fc2.weight"):
        assert not torch.equal(weights[2][key], weights[1][key]), key
    assert all("l2" in r and r["loss"] == pytest.approx(r["loss/quantizer"] + r["loss/semantic"], rel=1e-4)
               for r in logs[2])
    # Every stage's model evaluates its semantic preservation against the pretrained encoder (the teacher).
    assert all("semantic" in s["final_eval"] and "pooled" in s["final_eval"]["semantic"] for s in summaries)


def test_teacher_path_gives_a_continued_stage_the_pretrained_encoders_targets(tmp_path):
    from unimm.train.tokenizer.args import TokenizerModelArguments
    from unimm.train.tokenizer.build import build_tokenizer_model

    torch.manual_seed(0)
    pretrained = SiglipVisionModel(SiglipVisionConfig(hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                                                      intermediate_size=128, patch_size=4, image_size=32))
    pretrained.save_pretrained(tmp_path / "siglip")
    trained = build_tokenizer("dualtoken-tiny", encoder_path=tmp_path / "siglip", train_encoder=True)
    with torch.no_grad():  # what stage 0 leaves: an encoder that moved away from the pretrained one
        trained.encoder.encoder.layers[3].mlp.fc2.weight.add_(1.0)
    trained.save_pretrained(tmp_path / "stage0")
    args = dict(model_path=str(tmp_path / "stage0"), stage=1)
    copied = build_tokenizer_model(TokenizerModelArguments(**args))
    given = build_tokenizer_model(TokenizerModelArguments(**args, teacher_path=str(tmp_path / "siglip")))
    weight = "encoder.layers.3.mlp.fc2.weight"
    assert torch.equal(copied.teacher.state_dict()[weight], trained.encoder.state_dict()[weight])
    assert torch.equal(given.teacher.state_dict()[weight], pretrained.state_dict()[weight])
    with pytest.raises(ValueError, match="teacher_path is set but"):
        build_tokenizer_model(TokenizerModelArguments(preset="vqrae-tiny", teacher_path=str(tmp_path / "siglip")))


def test_stage_recipes_carry_the_reference_values():
    """The values of docs/TOKENIZER_FIDELITY.md's recipe rows, as the training program reads them."""
    parsed = {s: train_cli.parse_args([str(CONFIGS / f"dualtoken-siglip-so400m-384-stage{s}.yaml")]) for s in range(3)}
    for stage, (model_args, _, loss_args, train_args) in parsed.items():
        assert model_args.stage == stage and model_args.model_overrides["train_encoder"] is True
        assert train_args.per_device_train_batch_size == 32 and train_args.weight_decay == 1e-4
        assert train_args.max_grad_norm == 0.0 and train_args.ema_decay == 0.0 and train_args.min_lr_ratio == 0.0
        assert train_args.encoder_learning_rate == train_args.learning_rate
        assert train_args.gradient_checkpointing is True and train_args.bf16 is None  # bf16 where CUDA has it
        assert loss_args.l2_weight == (0.0 if stage == 2 else 5.0)
        assert loss_args.perceptual_weight == (0.0 if stage == 2 else 1.0)
    s0, s1, s2 = (parsed[s] for s in range(3))
    assert (s0[3].learning_rate, s0[3].adam_beta1, s0[3].adam_beta2, s0[3].warmup_steps) == (1e-4, 0.9, 0.98, 100000)
    assert s0[0].preset == "dualtoken-siglip-so400m-384" and s0[2].gan_weight == 0.0
    assert (s0[0].model_overrides["semantic_weight"], s0[0].model_overrides["semantic_pooled_weight"]) == (0.0, 5.0)
    for _, _, _, train_args in (s1, s2):
        assert (train_args.learning_rate, train_args.adam_beta1, train_args.adam_beta2, train_args.warmup_steps) == (
            7.2e-5, 0.5, 0.9, 10000)
    loss1 = s1[2]
    assert (loss1.gan_weight, loss1.gan_start_step, loss1.adaptive_gan_weight, loss1.adaptive_weight_min,
            loss1.adaptive_weight_max, loss1.adaptive_weight_l2_weight, loss1.disc_loss_weight,
            loss1.disc_leaky_hinge, loss1.disc_loss_weight_from_step) == (0.75, 0, True, 0.3, 10.0, 1.0, 0.75, True,
                                                                          39062)
    assert (loss1.disc_arch, loss1.disc_base_channels, loss1.disc_num_layers) == ("residual", 64, 3)
    assert (s1[3].disc_learning_rate, s1[3].disc_warmup_steps) == (7.2e-5, 19531)
    assert s1[3].disc_learning_rate * s1[3].disc_min_lr_ratio == pytest.approx(4e-5, rel=1e-3)
    assert {k: s1[0].model_overrides[k] for k in ("semantic_weight", "semantic_pooled_weight", "semantic_layer_loss")} \
        == {"semantic_weight": 5.0, "semantic_pooled_weight": 1.0, "semantic_layer_loss": "mse_cos"}
    assert {k: s2[0].model_overrides[k] for k in ("semantic_weight", "semantic_pooled_weight", "semantic_layer_loss")} \
        == {"semantic_weight": 1.0, "semantic_pooled_weight": 5.0, "semantic_layer_loss": "cos"}
    assert s2[2].gan_weight == 0.0


def test_vqrae_recipes_use_the_papers_fixed_gan_weight():
    """VQRAE's L_rec = L2 + LPIPS + lambda_G x L_G: a fixed weight, not VQGAN's adaptive one."""
    for stage in (1, 2):
        _, _, loss_args, _ = train_cli.parse_args([str(CONFIGS / f"vqrae-siglip2-so400m-256-stage{stage}.yaml")])
        assert loss_args.adaptive_gan_weight is False and loss_args.gan_weight == 0.1


def test_every_fidelity_table_row_names_a_test_that_exists():
    """docs/TOKENIZER_FIDELITY.md: each row's last cell names tests (file::function) found in tests/tokenizer."""
    short = {"recipe": "test_dualtoken_recipe.py", "arch": "test_dualtoken_architecture.py",
             "presets": "test_paper_presets.py"}
    here = Path(__file__).parent
    rows = [line for line in (REPO / "docs" / "TOKENIZER_FIDELITY.md").read_text().splitlines()
            if re.match(r"\| [A-Z]\d+ \|", line)]
    assert len(rows) >= 50
    for row in rows:
        cell = row.rstrip(" |").rsplit("|", 1)[-1]
        names = re.findall(r"([\w.]+)::(test_\w+)", cell)
        assert names, row
        for file, name in names:
            source = (here / short.get(file, file)).read_text()
            assert f"def {name}(" in source, (file, name)


def test_residual_discriminator_has_the_reference_layout():
    from unimm.tokenizer.discriminator import PatchDiscriminator, PatchDiscriminatorConfig, ResidualDown

    disc = PatchDiscriminator(PatchDiscriminatorConfig(base_channels=64, num_layers=3, arch="residual"))
    blocks = [m for m in disc.net if isinstance(m, ResidualDown)]
    # Strided 3x3 stem, blocks 64 -> 128 (stride 2) -> 256 (stride 2) -> 512 (stride 1), 3x3 head to one logit.
    assert [(b.conv.in_channels, b.conv.out_channels, b.conv.stride[0]) for b in blocks] == [
        (64, 128, 2), (128, 256, 2), (256, 512, 1)]
    assert all(b.norm.num_groups == 32 and b.conv.kernel_size == (3, 3) for b in blocks)
    assert disc.net[0].kernel_size == (3, 3) and disc.net[-1].out_channels == 1
    images = torch.randn(2, 3, 32, 32, requires_grad=True)
    logits = disc(images)
    assert logits.shape == (2, 1, 4, 4)  # 32 / 2 / 2 / 2
    # The shortcut carries the input past each block's convolution.
    block, x = blocks[0], torch.randn(1, 64, 8, 8)
    with torch.no_grad():
        block.conv.weight.zero_()
        block.conv.bias.zero_()
        resized = F.interpolate(x, size=(4, 4), mode="bilinear", align_corners=False)
        torch.testing.assert_close(block(x), block.shortcut(resized))
    with pytest.raises(ValueError, match="arch must be"):
        PatchDiscriminator(PatchDiscriminatorConfig(arch="stylegan"))


def test_discriminator_schedule_has_its_own_warm_up_and_floor():
    from unimm.train.tokenizer.args import TokenizerTrainingArguments
    from unimm.train.tokenizer.build import build_optimisation

    model = build_tokenizer("dualtoken-tiny")
    config = ReconstructionLossConfig(perceptual_weight=0.0, gan_weight=0.1, gan_start_step=4, disc_base_channels=8,
                                      disc_num_layers=2)
    loss = ReconstructionLoss(config, model.image_mean, model.image_std)

    def disc_lrs(**overrides):
        args = TokenizerTrainingArguments(output_dir="unused", max_steps=24, warmup_steps=8, min_lr_ratio=0.0,
                                          disc_learning_rate=1.0, **overrides)
        opt = build_optimisation(model, loss, config, args)
        lrs = []
        for _ in range(24):
            lrs.append(opt.disc_optimizer.param_groups[0]["lr"])
            opt.disc_optimizer.step()
            opt.disc_scheduler.step()
        return lrs

    shared = disc_lrs()  # the generator's warm-up (8) and floor (0)
    own = disc_lrs(disc_warmup_steps=2, disc_min_lr_ratio=0.5)
    assert shared[:4] == own[:4] == [0.0] * 4  # nothing before the GAN starts
    assert own[6] == pytest.approx(1.0) and shared[6] < 0.5  # peak after 2 warm-up steps, not 8
    assert own[-1] >= 0.5 and shared[-1] < 0.1  # cosine down to its own floor
