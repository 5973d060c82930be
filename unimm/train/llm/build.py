"""Build what the LLM programs train: the UniMM model, its text tokenizer and vocabulary layout, the visual
tokenizer, the training dataset and the collator, from the typed configs of `unimm.train.args`.

A model is built either from a plain causal LM plus a visual tokenizer (`llm_path` + `visual_tokenizer_path`: visual
modules are added and the vocabulary is extended here, before the Trainer/DeepSpeed wraps the model, which
ZeRO-3 requires), from a plain causal LM plus a CLIP / SigLIP vision tower (`vision_tower`, LLaVA-1.5's model:
understanding only, optionally with a visual tokenizer too), or loaded from an existing UniMM model
(`model_path`; a tower recorded in its config is rebuilt).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from unimm.llm import UniMMConfig, UniMMForCausalLM, VocabLayout, check_visual_tokenizer, extend_tokenizer_and_model
from unimm.llm.projector import load_mm_projector
from unimm.llm.vision_tower import VisionTower
from unimm.llm.vocab import ensure_pad_token
from unimm.tokenizer.presets import load_visual_tokenizer  # its home since the floors were drawn; kept importable here
from unimm.train.args import DataArguments, ModelArguments, VisualModulesConfig
from unimm.utils.errors import ModelFolderError, invalid_json, model_folder
from unimm.utils.parallel import full_shape

logger = logging.getLogger(__name__)

@dataclass
class BuiltModel:
    """The model to train and what travels with it."""

    model: UniMMForCausalLM
    text_tokenizer: PreTrainedTokenizerBase
    layout: VocabLayout
    visual_tokenizer: Any | None = None
    # Parameters whose gradient is masked to the new token rows; they must not get weight decay either.
    row_masked_params: set[str] = field(default_factory=set)
    # A plain CLIP / SigLIP tower (LLaVA-style) whose features feed the projector; beside the model, frozen.
    vision_tower: VisionTower | None = None

    @property
    def image_encoder(self) -> Any | None:
        """What turns pixels into projector features: the vision tower, else the visual tokenizer."""
        return self.vision_tower if self.vision_tower is not None else self.visual_tokenizer

    @property
    def reads_pixels(self) -> bool:
        """Whether training reads images as pixels (encoded on the fly for the feature projector)."""
        return self.image_encoder is not None and self.model.feature_projector is not None


def _feature_dim(visual_tokenizer: Any) -> int:
    """Width of `encode_features` (the projector input), measured on one blank image."""
    size = visual_tokenizer.image_size
    with torch.no_grad():
        features = visual_tokenizer.encode_features(torch.zeros(1, 3, size, size))
    return int(features.shape[-1])


def build_model(model_args: ModelArguments, modules: VisualModulesConfig | None = None,
                dtype: torch.dtype = torch.float32, use_image_features: bool = False, load_visual: bool = True,
                seed: int = 0) -> BuiltModel:
    """The UniMM model, text tokenizer and layout described by `model_args`, with the freeze switches applied.

    modules:            a new model's visual-module sizes (preset + fields; default: the `default` preset).
    use_image_features: give a new model a feature projector (continuous understanding inputs, VQRAE style); a
                        new model with a `vision_tower` always has one.
    load_visual:        also load the visual tokenizer from `visual_tokenizer_path` (needed to encode pixels on the
                        fly or to check a code cache's hash).
    seed:               seeds the initialisation of new visual modules; the RNG is reset after the LLM is loaded
                        because loading under ZeRO-3 (`zero.Init`) consumes random numbers and plain loading does
                        not, and ZeRO-2 and ZeRO-3 runs must start from the same weights.

    `pretrained_projector` is loaded into the projector before the freeze switches (and any LoRA wrapping).
    """
    visual_tokenizer = load_visual_tokenizer(model_args.visual_tokenizer_path) if (
        model_args.visual_tokenizer_path and load_visual) else None
    tower = None
    if model_args.model_path is not None:
        model, text_tokenizer = _load_unimm_model(Path(model_args.model_path), dtype, model_args.attn_implementation)
        if visual_tokenizer is not None:
            _check_spec(model.config.codebook_spec, visual_tokenizer, model_args.visual_tokenizer_path)
            # the tokenizer this run trains with is the one recorded (models saved before identities gain one)
            model.config.visual_tokenizer_identity = check_visual_tokenizer(
                model.config, visual_tokenizer, allow_mismatch=model_args.allow_visual_tokenizer_mismatch)
        if model.config.vision_tower:
            tower = VisionTower.from_dict(model.config.vision_tower, path=model_args.vision_tower, dtype=dtype)
        layout = model.config.layout
    else:
        if visual_tokenizer is None and model_args.visual_tokenizer_path:
            visual_tokenizer = load_visual_tokenizer(model_args.visual_tokenizer_path)
        if model_args.vision_tower:
            tower = VisionTower.from_path(model_args.vision_tower, select_layer=model_args.vision_select_layer,
                                          select_feature=model_args.vision_select_feature,
                                          image_aspect_ratio=model_args.tower_aspect_ratio, dtype=dtype)
        model, text_tokenizer, layout = _extend_llm(model_args, modules or VisualModulesConfig(), visual_tokenizer,
                                                    tower, dtype, use_image_features, seed)
    ensure_pad_token(text_tokenizer, model)  # a loaded model's tokenizer may lack one (_extend_llm gave a new one)
    if model_args.pretrained_projector:
        load_mm_projector(model, model_args.pretrained_projector)
        logger.info("loaded the feature projector from %s", model_args.pretrained_projector)
    row_masked = apply_trainable_parts(model, model_args, layout)
    return BuiltModel(model, text_tokenizer, layout, visual_tokenizer, row_masked, tower)


def _load_unimm_model(path: Path, dtype: torch.dtype, attn_implementation: str = "auto",
                      ) -> tuple[UniMMForCausalLM, PreTrainedTokenizerBase]:
    path = path.resolve()  # absolute, so LoRA adapter configs name their base robustly
    check_unimm_folder(path)
    # "auto" keeps the implementation the model was saved with; a named one (--attn_implementation) replaces it
    attn = {} if attn_implementation == "auto" else {"attn_implementation": attn_implementation}
    with model_folder("model_path", path, "a UniMM model and its text tokenizer"):
        model = UniMMForCausalLM.from_pretrained(path, dtype=dtype, **attn)
        text_tokenizer = AutoTokenizer.from_pretrained(path)
    if model.config.layout is None:
        raise ModelFolderError(f"model_path={path}: the model has no vocabulary layout (not a UniMM model?)")
    return model, text_tokenizer


def _extend_llm(model_args: ModelArguments, modules: VisualModulesConfig, visual_tokenizer: Any | None,
                tower: VisionTower | None, dtype: torch.dtype, use_image_features: bool,
                seed: int) -> tuple[UniMMForCausalLM, PreTrainedTokenizerBase, VocabLayout]:
    """A new UniMM model: the plain LLM of `llm_path` with visual modules (codes of `visual_tokenizer`, a projector
    from `tower`'s features or the tokenizer's) and an extended vocabulary. Without a visual tokenizer (a LLaVA-style
    model: a vision tower only) there are no visual codes, so no generation."""
    from transformers import AutoModelForCausalLM, set_seed

    from unimm.utils.attention import select_attn_implementation

    llm_path = Path(model_args.llm_path)
    if not (llm_path / "config.json").is_file():
        raise FileNotFoundError(f"llm_path={llm_path}: no Hugging Face model there (config.json missing)")
    with model_folder("llm_path", llm_path, "a causal language model's text tokenizer"):
        text_tokenizer = AutoTokenizer.from_pretrained(llm_path)
    overrides = modules.overrides()
    if visual_tokenizer is not None:
        overrides.setdefault("num_image_positions", visual_tokenizer.num_positions)
    if tower is not None:
        features = tower.model_config_kwargs(model_args.projector_type)
    elif use_image_features:
        features = {"feature_dim": _feature_dim(visual_tokenizer), "feature_projector_type": model_args.projector_type}
    else:
        features = {}
    with model_folder("llm_path", llm_path, "a Hugging Face causal language model"):
        llm = AutoModelForCausalLM.from_pretrained(llm_path, dtype=dtype, attn_implementation=(
            select_attn_implementation(model_args.attn_implementation, dtype)), **quantization_kwargs(model_args, dtype))
    set_seed(seed)
    model = UniMMForCausalLM.from_llm(
        llm, visual_tokenizer, flat_codes=model_args.flat_codes, dtype=dtype,
        attn_implementation=model_args.attn_implementation, **features, **overrides,
    )
    spec = visual_tokenizer.codebook_spec if visual_tokenizer is not None else {}
    ensure_pad_token(text_tokenizer, model)  # before the extension: a new pad token is a text token
    layout = extend_tokenizer_and_model(text_tokenizer, model, spec, flat_codes=model_args.flat_codes)
    return model, text_tokenizer, layout


def quantization_kwargs(model_args: ModelArguments, dtype: torch.dtype) -> dict[str, Any]:
    """`from_pretrained` keyword arguments that load the LLM quantized (`quantization_bits`, QLoRA) on this
    process's GPU; none without quantization. Refused without CUDA or bitsandbytes."""
    import importlib.util
    import os

    bits = model_args.quantization_bits
    if bits is None:
        return {}
    from unimm.utils.errors import ConfigError

    if not torch.cuda.is_available() or importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError(f"--bits {bits} (QLoRA) needs a CUDA GPU and bitsandbytes")
    from transformers import BitsAndBytesConfig

    config = BitsAndBytesConfig(load_in_4bit=bits == 4, load_in_8bit=bits == 8, bnb_4bit_compute_dtype=dtype,
                                bnb_4bit_use_double_quant=model_args.quantization_double_quant,
                                bnb_4bit_quant_type=model_args.quantization_type)
    return {"quantization_config": config, "device_map": {"": int(os.environ.get("LOCAL_RANK", "0"))}}


def check_unimm_folder(path: Path) -> None:
    """Refuse a `model_path` that holds no UniMM model before building one from its config (a visual tokenizer's
    or a plain LLM's config would otherwise instantiate a UniMM model with meaningless sizes)."""
    import json

    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"model_path={path}: no UniMM model there (config.json missing)")
    try:
        model_type = json.loads(config_file.read_text()).get("model_type")
    except json.JSONDecodeError as err:
        raise invalid_json(config_file, err) from None
    if model_type != UniMMConfig.model_type:
        raise ModelFolderError(f"model_path={path}: holds a {model_type!r} model, not a UniMM model "
                               f"({UniMMConfig.model_type!r}; the output of scripts/pretrain.py, finetune.py or "
                               f"merge_lora.py)")


def _check_spec(model_spec: dict, visual_tokenizer: Any, visual_tokenizer_path: str | None) -> None:
    from unimm.tokenizer.types import codebook_spec_to_dict

    spec = codebook_spec_to_dict(visual_tokenizer.codebook_spec)
    if spec != model_spec:
        raise ValueError(f"visual_tokenizer_path={visual_tokenizer_path} has codebook_spec {spec}, but the model was built for "
                         f"{model_spec}")


def apply_trainable_parts(model: UniMMForCausalLM, model_args: ModelArguments, layout: VocabLayout) -> set[str]:
    """Set `requires_grad` from the freeze switches. Returns the names of embedding parameters that train only
    their new rows (a gradient mask zeroes the original rows; with Adam and no weight decay they stay fixed)."""
    model.requires_grad_(False)
    llm = model.language_model
    if model_args.train_llm:
        llm.requires_grad_(True)
    if model_args.train_visual_heads:
        for module in (model.visual_embedding, model.depth_heads, model.image_position_embedding):
            if module is not None:
                module.requires_grad_(True)
    if model_args.train_projector and model.feature_projector is not None:
        model.feature_projector.requires_grad_(True)
    row_masked: set[str] = set()
    if model_args.train_new_embeddings and not model_args.train_llm:
        from unimm.utils.parallel import zero3_enabled

        if zero3_enabled():
            # ZeRO-3 hands gradients of partitioned parameters around in flat shards, so rows cannot be masked.
            raise ValueError("train_llm=false with train_new_embeddings=true (train only the new token rows) is not "
                             "supported under ZeRO-3; use configs/deepspeed/zero2.json, or train_llm=true")
        first_new_row = layout.original_vocab_size
        names = {id(p): n for n, p in model.named_parameters()}
        seen: set[int] = set()
        for module in (model.get_input_embeddings(), model.get_output_embeddings()):
            weight = module.weight
            if id(weight) in seen:  # tied embeddings
                continue
            seen.add(id(weight))
            weight.requires_grad_(True)
            weight.register_hook(_RowMask(first_new_row))
            row_masked.add(names[id(weight)])
    trainable = sum(_numel(p) for p in model.parameters() if p.requires_grad)
    if trainable == 0:
        raise ValueError("every part is frozen: enable at least one of train_llm, train_new_embeddings, "
                         "train_visual_heads, train_projector (or use_lora)")
    total = sum(_numel(p) for p in model.parameters())
    logger.info("trainable parameters: %d of %d (%.2f%%)", trainable, total, 100.0 * trainable / total)
    return row_masked


class _RowMask:
    """Gradient hook keeping only rows >= `first_row` (the tokens added to the vocabulary)."""

    def __init__(self, first_row: int):
        self.first_row = first_row

    def __call__(self, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        grad[: self.first_row] = 0
        return grad


# ------------------------------------------------------------------------------------------------ data


def build_train_dataset(data_args: DataArguments, built: BuiltModel, seed: int) -> torch.utils.data.Dataset:
    """The task mixture described by `data_args` (code cache / LLaVA JSON / text), checked against the visual
    tokenizer's config hash when one is loaded."""
    from unimm.data.code_cache import TokenizerIdentity
    from unimm.data.images import ImageTransform
    from unimm.data.mixture import build_mixture
    from unimm.data.tasks import PixelImages, SampleFactory

    factory = SampleFactory(built.text_tokenizer, built.layout, data_args.sample_config(seed))
    mixture = data_args.mixture_config(seed)
    visual = built.visual_tokenizer
    encoder = built.image_encoder
    pixel_images = None
    if built.reads_pixels:
        transform = ImageTransform.for_tokenizer(encoder)
        pixel_images = PixelImages(data_args.image_folder or _default_image_folder(data_args), transform,
                                   encoder.num_positions, mixture.allow_outside_image_folder)
    # Config and weights hashes, taken once: a cache made by a tokenizer with other weights is refused.
    identity = TokenizerIdentity.of(visual) if visual is not None else None
    return build_mixture(mixture, factory, tokenizer_hash=identity, pixel_images=pixel_images,
                         visual_tokenizer=visual)


def _default_image_folder(data_args: DataArguments) -> str | None:
    if data_args.conversation_json is None:
        return None
    return str(Path(data_args.conversation_json).parent)


def build_collator(data_args: DataArguments, text_tokenizer: PreTrainedTokenizerBase):
    from unimm.data.collator import UniMMCollator

    return UniMMCollator(pad_token_id=text_tokenizer.pad_token_id, packing=data_args.packing,
                         max_length=data_args.max_length)


def _numel(param: torch.Tensor) -> int:
    """Full size of a parameter, also when ZeRO-3 has partitioned it (then `numel()` is 0)."""
    return math.prod(full_shape(param))
