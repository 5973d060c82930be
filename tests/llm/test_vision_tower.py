"""The plain vision tower (LLaVA-1.5's `--vision_tower`): tiny random CLIP and SigLIP encoders saved locally give
the hidden states HF gives, with LLaVA's layer selection and CLS handling; the tower's pixels are those of the
encoder's image processor (and of LLaVA's pad-to-square); a UniMM model fed by the tower through the real data path
trains its projector while the tower stays frozen."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer, CLIPModel, CLIPVisionModel, SiglipVisionModel

from unimm.llm import UniMMForCausalLM, extend_tokenizer_and_model
from unimm.llm.projector import load_mm_projector
from unimm.llm.vision_tower import VisionTower, vision_tower_family
from unimm.testing import build_tiny_vision_tower
from unimm.utils.errors import ModelFolderError

HF_CLASSES = {"clip": CLIPVisionModel, "siglip": SiglipVisionModel}


@pytest.fixture(autouse=True)
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def tower_paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("towers")
    return {family: build_tiny_vision_tower(root / family, family) for family in ("clip", "siglip")}


def _pixels(batch=2, seed=0):
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", ["clip", "siglip"])
@pytest.mark.parametrize("select_layer", [-2, -1, 1])
def test_features_are_the_selected_hidden_state_without_cls(tower_paths, family, select_layer):
    path = tower_paths[family]
    tower = VisionTower.from_path(path, select_layer=select_layer)
    pixels = _pixels()
    reference = HF_CLASSES[family].from_pretrained(path).eval()
    with torch.no_grad():
        hidden = reference(pixel_values=pixels, output_hidden_states=True).hidden_states
        features = tower(pixels)
    expected = hidden[select_layer][:, 1:] if family == "clip" else hidden[select_layer]  # CLIP: CLS first
    assert features.shape == (2, 16, 32) == (2, tower.num_positions, tower.feature_dim)
    assert torch.equal(features, expected)
    other_layer = hidden[select_layer - 1][:, 1:] if family == "clip" else hidden[select_layer - 1]
    assert not torch.allclose(features, other_layer, atol=1e-3)  # the layer choice is visible


def test_clip_cls_patch_keeps_the_cls_token_and_siglip_has_none(tower_paths):
    tower = VisionTower.from_path(tower_paths["clip"], select_feature="cls_patch")
    pixels = _pixels()
    reference = CLIPVisionModel.from_pretrained(tower_paths["clip"]).eval()
    with torch.no_grad():
        expected = reference(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]
        assert torch.equal(tower(pixels), expected)
    assert tower.num_positions == 17 == expected.shape[1]
    with pytest.raises(ValueError, match="needs a CLS token"):
        VisionTower.from_path(tower_paths["siglip"], select_feature="cls_patch")


def test_full_clip_checkpoint_gives_its_vision_half(tmp_path):
    """LLaVA names whole CLIP checkpoints (`openai/clip-vit-large-patch14-336`); the tower takes their vision half."""
    path = build_tiny_vision_tower(tmp_path / "clip_full", "clip", full_model=True)
    tower = VisionTower.from_path(path)
    reference = CLIPModel.from_pretrained(path).vision_model.eval()
    pixels = _pixels()
    with torch.no_grad():
        assert torch.equal(tower(pixels), reference(pixel_values=pixels, output_hidden_states=True).hidden_states[-2][:, 1:])


def test_tower_is_frozen_and_stays_in_eval_mode(tower_paths):
    tower = VisionTower.from_path(tower_paths["clip"])
    tower.train()
    assert tower.frozen and not tower.encoder.training
    features = tower(_pixels())
    assert not features.requires_grad  # no graph is kept through a frozen tower
    trainable = VisionTower.from_path(tower_paths["clip"], freeze=False).train()
    assert not trainable.frozen and trainable.encoder.training
    trainable(_pixels()).sum().backward()
    grads = {name: p.grad for name, p in trainable.encoder.named_parameters() if "patch_embedding" in name}
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads.values())


def test_family_tells_towers_from_unimm_tokenizers(tower_paths, tmp_path):
    """`--vision_tower` takes a CLIP/SigLIP folder or a UniMM visual tokenizer; the program asks which first."""
    from unimm.tokenizer import build_tokenizer

    build_tokenizer("vqrae-tiny").save_pretrained(tmp_path / "vqrae")
    assert [vision_tower_family(tower_paths[f]) for f in ("clip", "siglip")] == ["clip", "siglip"]
    assert vision_tower_family(tmp_path / "vqrae") is None
    with pytest.raises(ModelFolderError, match="no such local folder"):
        vision_tower_family("google/siglip-so400m-patch14-384")


def test_bad_towers_are_refused_with_the_reason(tower_paths, tiny_llama_path, tmp_path):
    with pytest.raises(ModelFolderError, match="openai/clip-vit-large-patch14-336: no such local folder.*never downloads"):
        VisionTower.from_path("openai/clip-vit-large-patch14-336")
    with pytest.raises(ModelFolderError, match="holds a 'llama' model"):
        VisionTower.from_path(tiny_llama_path)
    with pytest.raises(ValueError, match="mm_vision_select_layer=4 is outside the 4 hidden states"):
        VisionTower.from_path(tower_paths["clip"], select_layer=4)
    assert VisionTower.from_path(tower_paths["clip"], select_layer=-4).select_layer == -4  # the embeddings
    no_processor = tmp_path / "no_processor"
    no_processor.mkdir()
    (no_processor / "config.json").write_text((tower_paths["clip"] / "config.json").read_text())
    with pytest.raises(ModelFolderError, match="preprocessor_config.json missing"):
        VisionTower.from_path(no_processor)
    partial = tmp_path / "partial"
    build_tiny_vision_tower(partial, "clip")
    weights = load_file(partial / "model.safetensors")
    save_file({k: v for k, v in weights.items() if "layers.2." not in k}, partial / "model.safetensors",
              metadata={"format": "pt"})
    with pytest.raises(ModelFolderError, match=r"lacks \d+ weights of the clip vision encoder .*layers\.2\."):
        VisionTower.from_path(partial)
    tower = VisionTower.from_path(tower_paths["clip"])
    with pytest.raises(ValueError, match=r"takes pixel_values \[B, 3, 32, 32\], got \[2, 3, 16, 16\]"):
        tower(torch.zeros(2, 3, 16, 16))


def _photo(width=60, height=40, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _llava_expand2square(image, background):
    """LLaVA's `expand2square` (llava/mm_utils.py), restated: paste centred on a square of `background`."""
    width, height = image.size
    side = max(width, height)
    result = Image.new(image.mode, (side, side), background)
    result.paste(image, ((side - width) // 2, (side - height) // 2))
    return result


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_pixels_are_the_image_processors(tower_paths, family):
    """`square`: the encoder's own processor (CLIP: short side + centre crop; SigLIP: resize to the square);
    `pad`: LLaVA's expand2square with `int(mean * 255)`, then the processor."""
    from transformers import AutoImageProcessor

    path = tower_paths[family]
    processor = AutoImageProcessor.from_pretrained(path)
    image = _photo()
    tower = VisionTower.from_path(path)
    square = tower.image_transform(image)
    assert torch.equal(tower.preprocess([image, image])[1], square)
    expected = processor(images=image, return_tensors="pt")["pixel_values"][0]
    torch.testing.assert_close(square, expected, rtol=0, atol=1e-5)
    padded = VisionTower.from_path(path, image_aspect_ratio="pad").image_transform(image)
    background = tuple(int(x * 255) for x in processor.image_mean)
    expected = processor(images=_llava_expand2square(image, background), return_tensors="pt")["pixel_values"][0]
    torch.testing.assert_close(padded, expected, rtol=0, atol=1e-5)
    assert not torch.allclose(padded, square, atol=0.1)


def test_model_with_tower_trains_its_projector_through_the_data_path(tower_paths, tiny_llama_path, tmp_path):
    """LLaVA stage 1 in miniature: LLaVA records -> PixelImages with the tower's transform -> collated pixel_values
    -> tower features -> the UniMM model; only the projector trains, and the tower does not move."""
    from unimm.data.collator import UniMMCollator
    from unimm.data.sources import normalise_llava_record
    from unimm.data.tasks import PixelImages, SampleConfig, SampleFactory

    tower = VisionTower.from_path(tower_paths["clip"], image_aspect_ratio="pad")
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_path)
    torch.manual_seed(0)
    model = UniMMForCausalLM.from_llm(tiny_llama_path, None, attn_implementation="sdpa", **tower.model_config_kwargs())
    layout = extend_tokenizer_and_model(tokenizer, model, {})
    model.requires_grad_(False)
    model.feature_projector.requires_grad_(True)
    assert model.config.vision_tower == tower.to_dict() and model.config.feature_dim == 32

    for i, colour in enumerate(["red", "blue"]):
        _photo(48 + 8 * i, 32, seed=i).save(tmp_path / f"{colour}.png")
    images = PixelImages(tmp_path, tower.image_transform, tower.num_positions)
    factory = SampleFactory(tokenizer, layout, SampleConfig())
    samples = [factory.conversation(normalise_llava_record({"id": colour, "image": f"{colour}.png", "conversations": [
        {"from": "human", "value": "<image>\nwhat colour is the shape?"},
        {"from": "gpt", "value": f"the shape is {colour}"}]}, 0, "f"), [images(f"{colour}.png", colour)])
        for colour in ["red", "blue"]]
    batch = UniMMCollator(pad_token_id=tokenizer.pad_token_id)(samples)
    assert batch["pixel_values"].shape == (2, 3, 32, 32)
    assert int((batch["input_ids"] == layout.image_token_id).sum()) == 2 * tower.num_positions

    tower_before = {k: v.clone() for k, v in tower.state_dict().items()}
    projector_before = {k: v.clone() for k, v in model.feature_projector.state_dict().items()}
    inputs = {k: v for k, v in batch.items() if k != "pixel_values"}
    model.train()
    tower.train()

    def train(steps):
        optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        losses = []
        for step in range(steps):
            features = tower.encode_features(batch["pixel_values"])  # [2, 16, 32]
            loss = model(**inputs, image_features=features).loss
            loss.backward()
            if step == 0:
                grads = [p.grad for p in model.feature_projector.parameters()]
                assert all(g is not None and g.abs().sum() > 0 for g in grads)
                assert all(p.grad is None for p in tower.parameters())
            optimizer.step()
            optimizer.zero_grad()
            losses.append(float(loss.detach()))
        return losses

    # stage 1 (projector only): the frozen random LLM moves only through the image inputs, so the loss falls
    # steadily but little
    losses = train(6)
    assert all(b < a for a, b in zip(losses, losses[1:])) and losses[-1] < losses[0] - 0.1, losses
    assert all(p.grad is None for p in model.language_model.parameters())
    assert not all(torch.equal(v, model.feature_projector.state_dict()[k]) for k, v in projector_before.items())
    # stage 2 (projector and LLM, the tower still frozen): the fixed batch is learned
    model.language_model.requires_grad_(True)
    losses = train(8)
    assert losses[-1] < 0.5 * losses[0], losses
    assert all(torch.equal(v, tower.state_dict()[k]) for k, v in tower_before.items())


def test_config_records_the_tower_and_rebuilds_it(tower_paths, tiny_llama_path, tmp_path):
    tower = VisionTower.from_path(tower_paths["siglip"], select_layer=-3, image_aspect_ratio="pad")
    model = UniMMForCausalLM.from_llm(tiny_llama_path, None, attn_implementation="sdpa",
                                      **tower.model_config_kwargs("linear"))
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_path)
    extend_tokenizer_and_model(tokenizer, model, {})
    model.save_pretrained(tmp_path / "model")
    loaded = UniMMForCausalLM.from_pretrained(tmp_path / "model")
    assert loaded.config.feature_projector_type == "linear" and not hasattr(loaded.feature_projector, "linear_2")
    rebuilt = VisionTower.from_dict(loaded.config.vision_tower)
    assert (rebuilt.select_layer, rebuilt.image_aspect, rebuilt.family) == (-3, "pad", "siglip")
    pixels = _pixels()
    with torch.no_grad():
        assert torch.equal(rebuilt(pixels), tower(pixels))
    with pytest.raises(ModelFolderError, match="holds a clip encoder but the model was trained on a siglip one"):
        VisionTower.from_dict(loaded.config.vision_tower, path=tower_paths["clip"])


def test_tower_and_projector_match_transformers_llava(tiny_llama_path, tmp_path):
    """Reference: transformers' LLaVA-1.5 port (`LlavaForConditionalGeneration`, select layer -2, CLS dropped,
    Linear-GELU-Linear). Its vision tower as `--vision_tower` and its projector loaded from its model file give
    its image features."""
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
    )

    torch.manual_seed(0)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                              image_size=32, patch_size=8)
    text = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                       num_attention_heads=4, num_key_value_heads=2)
    llava = LlavaForConditionalGeneration(LlavaConfig(vision_config=vision.to_dict(), text_config=text.to_dict(),
                                                      image_token_index=100)).eval()
    assert (llava.config.vision_feature_layer, llava.config.vision_feature_select_strategy) == (-2, "default")
    llava.save_pretrained(tmp_path / "llava")
    llava.model.vision_tower.save_pretrained(tmp_path / "tower")
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        tmp_path / "tower")

    tower = VisionTower.from_path(tmp_path / "tower")
    model = UniMMForCausalLM.from_llm(tiny_llama_path, None, attn_implementation="sdpa", **tower.model_config_kwargs())
    load_mm_projector(model, tmp_path / "llava" / "model.safetensors")
    pixels = _pixels(3)
    with torch.no_grad():
        expected = torch.stack(llava.get_image_features(pixel_values=pixels).pooler_output)  # [3, 16, 64]
        features = model.feature_projector(tower(pixels))
    assert features.shape == expected.shape == (3, 16, 64)
    torch.testing.assert_close(features, expected, rtol=0, atol=1e-6)
