"""Zero-shot top-1 through a contrastive image-text model (unimm.tokenizer.semantic_eval.evaluate_zero_shot), on a
tiny random SigLIP (vision + text towers) and a word-level text tokenizer, both saved and loaded locally."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from unimm.data.images import ImageDataset, ImageTransform, collate_images
from unimm.data.toy.sample_photos import load_sample_photos
from unimm.tokenizer import build_tokenizer
from unimm.tokenizer.semantic_eval import ZeroShotClassifier, evaluate_zero_shot

CLASS_NAMES = ["cat", "dog", "car", "tree", "house", "boat", "bird", "flower"]


@pytest.fixture(scope="module")
def classifier(tmp_path_factory) -> ZeroShotClassifier:
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast, SiglipConfig, SiglipModel

    folder = tmp_path_factory.mktemp("tiny_siglip")
    words = ["<pad>", "<unk>", "a", "photo", "of", "."] + CLASS_NAMES
    text_tokenizer = Tokenizer(WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    text_tokenizer.pre_tokenizer = Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=text_tokenizer, pad_token="<pad>", unk_token="<unk>").save_pretrained(
        folder
    )
    config = SiglipConfig(
        text_config=dict(vocab_size=len(words), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=16),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                           intermediate_size=64),
    )
    torch.manual_seed(0)
    SiglipModel(config).save_pretrained(folder)
    model = SiglipModel.from_pretrained(folder)
    return ZeroShotClassifier(model, PreTrainedTokenizerFast.from_pretrained(folder), CLASS_NAMES,
                              image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5))


class FixedReconstruction(nn.Module):
    """A stand-in tokenizer whose reconstruction is `rebuild(pixel_values)`."""

    def __init__(self, rebuild, reference: nn.Module) -> None:
        super().__init__()
        self.rebuild, self.anchor = rebuild, nn.Linear(1, 1)
        self.image_mean, self.image_std = reference.image_mean, reference.image_std

    def forward(self, pixel_values: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(reconstruction=self.rebuild(pixel_values))


def _batches(tokenizer: nn.Module, labels: list[int] | None = None, batch_size: int = 8) -> list[dict]:
    records = [{"id": name, "image": image} for name, image in load_sample_photos(32)]
    dataset = ImageDataset(records, ImageTransform.for_tokenizer(tokenizer))
    batches = [collate_images([dataset[i] for i in range(s, min(s + batch_size, len(dataset)))])
               for s in range(0, len(dataset), batch_size)]
    for index, batch in enumerate(batches):
        batch["labels"] = (labels or [0] * len(dataset))[index * batch_size : (index + 1) * batch_size]
    return batches


def test_reconstruction_that_keeps_the_image_keeps_top1_and_one_that_loses_it_does_not(classifier):
    vqrae = build_tokenizer("vqrae-tiny")
    # Labels: the classifier's own predictions on the originals (a random tower has no real classes), so the
    # original top-1 is 1 and any reconstruction that changes what the classifier sees loses accuracy.
    from unimm.tokenizer.metrics import denormalize

    labels = []
    for batch in _batches(vqrae):
        labels += classifier.predict(denormalize(batch["pixel_values"], vqrae.image_mean, vqrae.image_std)).tolist()
    assert len(set(labels)) >= 3, labels  # the random tower tells the photos apart: the control below can fail

    identical = evaluate_zero_shot(FixedReconstruction(lambda x: x, vqrae), _batches(vqrae, labels), classifier)
    assert identical == {"top1_original": 1.0, "top1_reconstructed": 1.0, "prediction_agreement": 1.0,
                         "num_images": 16}
    grey = evaluate_zero_shot(FixedReconstruction(torch.zeros_like, vqrae), _batches(vqrae, labels), classifier)
    assert grey["top1_original"] == 1.0
    assert grey["top1_reconstructed"] == grey["prediction_agreement"] <= 1 - 2 / 16  # one class for every image

    real = evaluate_zero_shot(vqrae, _batches(vqrae, labels), classifier)  # an untrained tokenizer, end to end
    assert real["top1_original"] == 1.0 and 0.0 <= real["top1_reconstructed"] <= 1.0 and real["num_images"] == 16


def test_zero_shot_needs_two_classes(classifier):
    with pytest.raises(ValueError, match="at least two classes"):
        ZeroShotClassifier(classifier.model, None, ["cat"], (0.5,) * 3, (0.5,) * 3)


def test_eval_tokenizer_reports_zero_shot_top1_on_a_labelled_folder(classifier, tmp_path):
    """unimm-eval-tokenizer with a local SigLIP and a folder of class subfolders: the JSON's zero_shot block is the
    library's result on the same images."""
    from unimm.cli import eval_tokenizer

    folder = tmp_path / "labelled"
    photos = load_sample_photos(32)
    for index, (name, image) in enumerate(photos[:8]):
        (folder / CLASS_NAMES[index % 2]).mkdir(parents=True, exist_ok=True)
        image.save(folder / CLASS_NAMES[index % 2] / f"{name}.png")
    build_tokenizer("vqrae-tiny").save_pretrained(tmp_path / "vqrae")
    results = eval_tokenizer.main(
        ["--model_path", str(tmp_path / "vqrae"), "--dataset", "sample_photos", "--image_size", "32", "--max_images",
         "4", "--num_grid_images", "0", "--output_json", str(tmp_path / "m.json"), "--zero_shot_model",
         classifier.model.name_or_path, "--zero_shot_dataset", str(folder)]
    )  # fmt: skip
    zero_shot = results["zero_shot"]
    assert zero_shot["class_names"] == ["cat", "dog"] and zero_shot["num_images"] == 4  # --max_images
    assert 0.0 <= zero_shot["top1_original"] <= 1.0 and 0.0 <= zero_shot["prediction_agreement"] <= 1.0
    with pytest.raises(ValueError, match="needs both zero_shot_model and zero_shot_dataset"):
        eval_tokenizer.main(["--model_path", "m", "--dataset", "d", "--output_json", "o", "--zero_shot_model", "z",
                             "--debug"])
    assert "DualToken's zero-shot metric" in zero_shot["quantized_semantic_features_skipped"]


@pytest.fixture(scope="module")
def siglip_with_text(tmp_path_factory):
    """A tiny SigLIP (3 vision layers with the pooling head, text tower, word-level tokenizer) saved whole, and its
    vision tower saved on its own (the encoder a DualToken starts from)."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast, SiglipConfig, SiglipModel, SiglipVisionModel

    folder = tmp_path_factory.mktemp("siglip_text")
    words = ["<pad>", "<unk>", "a", "photo", "of", "."] + CLASS_NAMES
    text_tokenizer = Tokenizer(WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    text_tokenizer.pre_tokenizer = Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=text_tokenizer, pad_token="<pad>", unk_token="<unk>").save_pretrained(
        folder / "full"
    )
    config = SiglipConfig(
        text_config=dict(vocab_size=len(words), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=16),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                           intermediate_size=64),
    )
    torch.manual_seed(0)
    model = SiglipModel(config)
    model.save_pretrained(folder / "full")
    vision = SiglipVisionModel(config.vision_config)
    vision.load_state_dict(model.vision_model.state_dict())
    vision.save_pretrained(folder / "vision")
    full = SiglipModel.from_pretrained(folder / "full")
    classifier = ZeroShotClassifier(full, PreTrainedTokenizerFast.from_pretrained(folder / "full"), CLASS_NAMES,
                                    image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5))
    return folder, classifier


def _dualtoken_from(folder):
    return build_tokenizer("dualtoken-tiny", encoder_path=folder / "vision", image_size=32, pixel_layer=1,
                           shortcut_layer=None, semantic_layer=2, semantic_code_dim=8, semantic_num_codes=16,
                           semantic_depth=1).eval()


def test_quantized_feature_zero_shot_scores_the_semantic_codes_not_the_pixels(siglip_with_text):
    """DualToken's Table 1 figure: its encoder's own pooled output (codes bypassed) is exactly the SigLIP image
    embedding, so it scores what SigLIP scores on the originals; what moves the quantised figure is the semantic
    codebook, not the decoder, and the reverse for the reconstruction-based figure."""
    from unimm.tokenizer.metrics import denormalize
    from unimm.tokenizer.semantic_eval import evaluate_quantized_feature_zero_shot

    folder, classifier = siglip_with_text
    model = _dualtoken_from(folder)
    labels = []
    for batch in _batches(model):
        labels += classifier.predict(denormalize(batch["pixel_values"], model.image_mean, model.image_std)).tolist()
    assert len(set(labels)) >= 3, labels
    before = evaluate_quantized_feature_zero_shot(model, _batches(model, labels), classifier)
    assert before["top1_encoder_features"] == 1.0  # the SigLIP's own embedding of the same pixels
    assert before["num_images"] == 16
    images_before = evaluate_zero_shot(model, _batches(model, labels), classifier)

    with torch.no_grad():  # wreck the pixel decoder: the quantised-feature figure must not notice
        for p in model.decoder.parameters():
            p.copy_(torch.randn_like(p))
    same = evaluate_quantized_feature_zero_shot(model, _batches(model, labels), classifier)
    assert same == before
    images_after = evaluate_zero_shot(model, _batches(model, labels), classifier)
    assert images_after["top1_original"] == images_before["top1_original"] == 1.0

    with torch.no_grad():  # collapse the semantic codebook onto one code: the codes carry nothing
        model.semantic_quantizer.codebooks.zero_()
    collapsed = evaluate_quantized_feature_zero_shot(model, _batches(model, labels), classifier)
    assert collapsed["top1_encoder_features"] == 1.0
    assert collapsed["top1_quantized_semantic_features"] <= max(labels.count(c) for c in set(labels)) / 16
    assert collapsed["quantized_encoder_agreement"] < 1.0


def test_eval_tokenizer_reports_both_zero_shot_figures_for_dualtoken(siglip_with_text, tmp_path):
    from unimm.cli import eval_tokenizer

    folder, classifier = siglip_with_text
    labelled = tmp_path / "labelled"
    for index, (name, image) in enumerate(load_sample_photos(32)[:8]):
        (labelled / CLASS_NAMES[index % 3]).mkdir(parents=True, exist_ok=True)
        image.save(labelled / CLASS_NAMES[index % 3] / f"{name}.png")
    _dualtoken_from(folder).save_pretrained(tmp_path / "dualtoken")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of a {}.\n\na {}.\n")  # averaged per class, as the reference's 80 templates are
    argv = ["--model_path", str(tmp_path / "dualtoken"), "--dataset", "sample_photos", "--image_size", "32",
            "--max_images", "8", "--num_grid_images", "0", "--output_json", str(tmp_path / "m.json"),
            "--zero_shot_model", str(folder / "full"), "--zero_shot_dataset", str(labelled)]
    results = eval_tokenizer.main([*argv, "--zero_shot_prompt_file", str(prompts)])
    zero_shot = results["zero_shot"]
    assert zero_shot["class_names"] == ["car", "cat", "dog"] and zero_shot["num_images"] == 8
    for key in ("top1_original", "top1_reconstructed", "top1_quantized_semantic_features", "top1_encoder_features"):
        assert 0.0 <= zero_shot[key] <= 1.0, key
    # Codes bypassed, the tokenizer's encoder is the SigLIP vision tower: the same predictions as on the originals.
    assert zero_shot["top1_encoder_features"] == zero_shot["top1_original"]

    prompts.write_text("a photo of a {}.\nno placeholder\n")
    with pytest.raises(ValueError, match="every line must be a template.*'no placeholder'"):
        eval_tokenizer.main([*argv, "--zero_shot_prompt_file", str(prompts), "--debug"])


def test_several_prompts_average_their_normalised_embeddings(classifier):
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast.from_pretrained(classifier.model.name_or_path)
    args = (classifier.model, tokenizer, CLASS_NAMES, (0.5,) * 3, (0.5,) * 3)
    one, two = ZeroShotClassifier(*args, prompt="a photo of a {}."), ZeroShotClassifier(*args, prompt="a {}.")
    both = ZeroShotClassifier(*args, prompt=["a photo of a {}.", "a {}."])
    expected = torch.nn.functional.normalize(one.text_embeddings + two.text_embeddings, dim=-1)
    torch.testing.assert_close(both.text_embeddings, expected)
    assert not torch.allclose(one.text_embeddings, two.text_embeddings)  # the prompts differ: the mean is a mix
    with pytest.raises(ValueError, match="must each hold"):
        ZeroShotClassifier(*args, prompt=["a photo"])
