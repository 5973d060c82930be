"""What every inference program starts from: the UniMM model, its text tokenizer and the visual tokenizer, in eval
mode on one device (`unimm.utils.runtime` picks device and dtype)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from unimm.llm import UniMMForCausalLM, check_visual_tokenizer
from unimm.utils.errors import ModelFolderError, model_folder
from unimm.utils.runtime import inference_dtype, resolve_device


@dataclass
class InferenceStack:
    model: UniMMForCausalLM
    text_tokenizer: PreTrainedTokenizerBase
    visual_tokenizer: Any
    device: torch.device


def load_for_inference(model_path: str | Path, device: torch.device,
                       dtype_name: str = "auto") -> tuple[UniMMForCausalLM, PreTrainedTokenizerBase]:
    """(model in eval mode on `device`, text tokenizer) from a UniMM model directory or a LoRA checkpoint (whose
    adapter is merged in memory)."""
    from unimm.train.llm.build import check_unimm_folder
    from unimm.train.llm.lora import is_lora_checkpoint, load_lora_model

    path = Path(model_path)
    if is_lora_checkpoint(path):
        model = load_lora_model(path).merge_and_unload()
    else:
        check_unimm_folder(path)
        with model_folder("model_path", path, "a UniMM model"):
            model = UniMMForCausalLM.from_pretrained(path)
    with model_folder("model_path", path, "the model's text tokenizer"):
        text_tokenizer = AutoTokenizer.from_pretrained(path)
    if model.config.layout is None:
        raise ModelFolderError(f"model_path={path}: the model has no vocabulary layout (not a UniMM model?)")
    return model.to(device=device, dtype=inference_dtype(dtype_name, device)).eval(), text_tokenizer


def load_inference_stack(infer_args: Any) -> InferenceStack:
    """The stack an `InferenceArguments` (`unimm.inference.args`) names. For a model trained with a vision tower
    (`config.vision_tower`, LLaVA-style) the visual encoder is that tower, rebuilt from its recorded folder (or
    `vision_tower`); otherwise it is the visual tokenizer, which is then required."""
    from unimm.llm.vision_tower import VisionTower
    from unimm.tokenizer import load_visual_tokenizer
    from unimm.utils.errors import ConfigError

    device = resolve_device(infer_args.device)
    model, text_tokenizer = load_for_inference(infer_args.model_path, device, infer_args.dtype)
    if model.config.vision_tower:
        visual = VisionTower.from_dict(model.config.vision_tower, path=getattr(infer_args, "vision_tower", None),
                                       dtype=model.dtype)
    elif not infer_args.visual_tokenizer_path:
        raise ConfigError(f"model_path={infer_args.model_path} has no vision tower: set visual_tokenizer_path")
    else:
        visual = load_visual_tokenizer(infer_args.visual_tokenizer_path)
        check_visual_tokenizer(model.config, visual, allow_mismatch=infer_args.allow_visual_tokenizer_mismatch)
    visual = visual.to(device)  # hashed above in the dtype it was saved in
    return InferenceStack(model, text_tokenizer, visual, device)
