"""LoRA for UniMM models (peft).

Adapters go on the wrapped LLM's linear layers only. Next to them train:
- the rows of the tokens added to the vocabulary (visual and special tokens), as peft trainable tokens on the input
  embedding and, for an untied model, on the LM head: the original rows stay bit-identical, and a head tied to the
  embedding (Qwen2.5 up to 3B, the small Qwen3) shares the embedding's new rows in training, in every checkpoint and
  after merging, exactly as the served model uses them;
- in full, as peft `modules_to_save`: the visual code embeddings, the depth heads and the feature projector.
Every checkpoint (`adapter_model.safetensors` + `adapter_config.json`) holds everything that changed and reloads on top
of its base UniMM model.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

from transformers import AutoTokenizer

from unimm.llm import UniMMForCausalLM
from unimm.train.args import LoraArguments, ModelArguments
from unimm.utils.imports import is_peft_available, require

logger = logging.getLogger(__name__)


def modules_to_save(model: UniMMForCausalLM, model_args: ModelArguments) -> list[str]:
    """Names (peft suffix matches) of the modules trained in full next to the adapters."""
    names: list[str] = []
    if model_args.train_visual_heads:
        if model.visual_embedding is not None:
            names.append("visual_embedding")
        if model.image_position_embedding is not None:
            names.append("image_position_embedding")
        if model.depth_heads is not None:
            # One entry per head: a ModuleDict is indexed, never called, so it cannot be wrapped itself.
            names.extend(f"depth_heads.{group}" for group in model.depth_heads)
    if model_args.train_projector and model.feature_projector is not None:
        names.append("feature_projector")
    return names


def trainable_token_indices(model: UniMMForCausalLM, model_args: ModelArguments) -> dict[str, list[int]] | None:
    """peft `trainable_token_indices`: the added vocabulary rows (from the layout's original vocabulary size to the
    end of the table) on the input embedding, and on the LM head when it is not tied to it (a tied head gets the
    embedding's rows from peft itself). None when `train_new_embeddings` is off or nothing was added."""
    layout = model.config.layout
    if not model_args.train_new_embeddings or layout is None:
        return None
    rows = list(range(layout.original_vocab_size, model.get_input_embeddings().weight.shape[0]))
    if not rows:
        return None
    indices = {"embed_tokens": rows}
    if not model.config.tie_word_embeddings:
        indices["lm_head"] = rows
    return indices


def token_delta_names(model) -> set[str]:
    """Names of the trainable-token parameters of a peft model (the new vocabulary rows): kept out of weight decay,
    like the row-masked tables of a run without LoRA."""
    return {name for name, _ in model.named_parameters() if "trainable_tokens_delta" in name}


def wrap_lora(model: UniMMForCausalLM, lora_args: LoraArguments, model_args: ModelArguments,
              engine: str | None = None):
    """Return a `peft.PeftModel` with LoRA on the LLM's `lora_target_modules` and the visual parts trainable.
    `engine` (`unimm.utils.parallel.ENGINES`; default: the live one): under ZeRO-3 and FSDP2 the embedding tables
    train whole."""
    require(is_peft_available(), "peft", "dev")
    from peft import LoraConfig, get_peft_model

    from unimm.utils import parallel

    engine = engine or parallel.engine()
    zero3 = engine == "deepspeed-zero3"

    targets = "|".join(re.escape(name) for name in lora_args.target_modules())
    # Only the LLM's own linear layers (the depth heads may use the same projection names).
    target_regex = rf"language_model\..*\.({targets})"
    modules, token_rows = modules_to_save(model, model_args), trainable_token_indices(model, model_args)
    tied = bool(model.config.tie_word_embeddings)
    partitioned = engine in parallel.PARTITIONING_ENGINES
    if token_rows is not None and (lora_args.lora_embeddings == "full" or partitioned):
        if lora_args.lora_embeddings != "full":
            # ZeRO-3 and FSDP2 partition the tables, and peft's trainable tokens read and write them outside the
            # layer that owns them (FSDP2 would shard the shared table in two units): the tables train whole instead
            # (a tied head shares its copy through peft's weight tying).
            logger.warning("%s: LoRA cannot restrict the embedding%s to the %d added rows; the whole table%s "
                           "train (use ZeRO-2 or DDP to train only the added rows)", engine,
                           "" if tied else " and LM head", len(token_rows["embed_tokens"]), "" if tied else "s")
        modules = ["embed_tokens", *([] if tied else ["lm_head"]), *modules]
        token_rows = None
    config = LoraConfig(
        r=lora_args.lora_r, lora_alpha=lora_args.lora_alpha, lora_dropout=lora_args.lora_dropout,
        target_modules=target_regex, modules_to_save=modules, bias=lora_args.lora_bias,
        trainable_token_indices=token_rows, ensure_weight_tying=tied and "embed_tokens" in modules,
    )
    if model_args.train_llm:
        logger.warning("use_lora trains adapters instead of the full LLM; train_llm is ignored")

    # peft upcasts bf16 adapters to float32 by default; ZeRO-3 flattens each param group into one buffer of a
    # single dtype, so there the adapters keep the model's dtype (as LLaVA's bf16 LoRA does; DeepSpeed's
    # optimizer holds float32 master weights anyway).
    peft_model = get_peft_model(model, config, autocast_adapter_dtype=not zero3)
    _check_tied_head(peft_model)
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in peft_model.parameters())
    logger.info("LoRA: trainable parameters %d of %d (%.2f%%)", trainable, total, 100.0 * trainable / total)
    return peft_model


def _check_tied_head(peft_model) -> None:
    """A tied LM head must read the embedding's trainable rows: peft wraps it with an adapter tied to the
    embedding's. Without that wrapper the head would train nothing while merging folds the embedding's rows into it."""
    base = peft_model.get_base_model()
    if not base.config.tie_word_embeddings:
        return
    head, embed = base.get_output_embeddings(), base.get_input_embeddings()
    if hasattr(embed, "modules_to_save"):  # tables trained whole (ZeRO-3, FSDP2): the head must wrap the same copy
        head_copies = getattr(head, "modules_to_save", None)
        head_copy = head_copies["default"] if head_copies is not None and "default" in head_copies else None
        if head_copy is None or head_copy.weight is not embed.modules_to_save["default"].weight:
            raise RuntimeError("peft did not tie the LM head's trained copy to the input embedding's (model with "
                               "tie_word_embeddings)")
        return
    if not token_delta_names(peft_model):
        return
    if getattr(getattr(head, "token_adapter", None), "tied_adapter", None) is None:
        raise RuntimeError("peft did not tie the LM head's trainable tokens to the input embedding's (model with "
                           "tie_word_embeddings); the head would not train the new rows")


def is_lora_checkpoint(path: str | Path) -> bool:
    return (Path(path) / "adapter_config.json").is_file()


def base_model_path(adapter_dir: str | Path) -> Path:
    """The base UniMM model an adapter checkpoint was trained on (recorded in adapter_config.json)."""
    config_file = Path(adapter_dir) / "adapter_config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{adapter_dir} is not a LoRA checkpoint (adapter_config.json missing)")
    base = json.loads(config_file.read_text()).get("base_model_name_or_path")
    if not base or not (Path(base) / "config.json").is_file():
        raise FileNotFoundError(f"{config_file}: base_model_name_or_path={base!r} is not a local UniMM model; "
                                "pass the base model path explicitly")
    return Path(base)


def load_lora_model(adapter_dir: str | Path, base_path: str | Path | None = None, is_trainable: bool = False):
    """Base UniMM model + the adapter (and modules_to_save) of `adapter_dir` -> `peft.PeftModel`."""
    require(is_peft_available(), "peft", "dev")
    from peft import PeftModel

    base = UniMMForCausalLM.from_pretrained(base_path or base_model_path(adapter_dir))
    return PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=is_trainable)


def _tensor_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor in the safetensors files of `folder` (headers only)."""
    from safetensors import safe_open

    shapes: dict[str, tuple[int, ...]] = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            shapes.update({name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()})
    return shapes


def _check_base_fits_adapter(adapter_dir: Path, base_path: Path) -> None:
    """Every tensor of the adapter must fit the base it is merged into: LoRA's A (`[r, in]`) and B (`[out, r]`) the
    base weight `[out, in]`, a fully trained module (`modules_to_save`) the base tensor's shape. Raises
    `ModelFolderError` naming the first tensor that does not fit, before anything is loaded."""
    from unimm.utils.errors import ModelFolderError

    base = _tensor_shapes(base_path)
    for name, shape in _tensor_shapes(adapter_dir).items():
        key = name.removeprefix("base_model.model.")
        lora = re.match(r"(.*)\.lora_([AB])(?:\.default)?\.weight$", key)
        target = f"{lora.group(1)}.weight" if lora else re.sub(r"\.modules_to_save\.default\.", ".", key)
        if target not in base:
            continue  # a tensor of a module the base names otherwise (e.g. tied): peft reports it on load
        want = base[target]
        fits = (shape[1] == want[1] if lora.group(2) == "A" else shape[0] == want[0]) if lora else shape == want
        if not fits:
            raise ModelFolderError(
                f"base_model_path={base_path}: not the base of the adapter {adapter_dir}: its {target} has shape "
                f"{list(want)}, the adapter's {name} {list(shape)} (a model of another size)")


def _same_model(first: Path, second: Path) -> str | None:
    """None when the UniMM folders `first` and `second` hold the same architecture and weights (tensor by tensor),
    else the first difference."""
    import json

    import torch
    from safetensors import safe_open

    def architecture(folder: Path) -> dict:
        config = json.loads((folder / "config.json").read_text())
        return {key: value for key, value in config.items() if key not in ("_name_or_path", "transformers_version",
                                                                           "dtype", "torch_dtype")}

    if architecture(first) != architecture(second):
        return "config.json differs"
    shapes = _tensor_shapes(first)
    if shapes != _tensor_shapes(second):
        return "the weights have other tensors"
    files: dict[Path, dict[str, Path]] = {first: {}, second: {}}
    for folder in files:
        for file in sorted(folder.glob("*.safetensors")):
            with safe_open(str(file), framework="pt") as handle:
                files[folder].update(dict.fromkeys(handle.keys(), file))
    for name in shapes:
        with safe_open(str(files[first][name]), framework="pt") as a, safe_open(str(files[second][name]),
                                                                                framework="pt") as b:
            if not torch.equal(a.get_tensor(name).float(), b.get_tensor(name).float()):
                return f"weights differ ({name})"
    return None


def _check_base_identity(adapter_dir: Path, base_path: Path) -> None:
    """A base other than the one recorded in the adapter config must be that model (same config and weights, e.g.
    a copy); otherwise the merge would silently produce a model nobody trained."""
    from unimm.utils.errors import ModelFolderError

    recorded = json.loads((adapter_dir / "adapter_config.json").read_text()).get("base_model_name_or_path")
    if not recorded or Path(recorded).resolve() == base_path.resolve():
        return
    if not (Path(recorded) / "config.json").is_file():
        logger.warning("%s was trained on %s, which no longer exists: cannot check that %s is the same model",
                       adapter_dir, recorded, base_path)
        return
    difference = _same_model(Path(recorded), base_path)
    if difference is not None:
        raise ModelFolderError(f"base_model_path={base_path}: not the model the adapter {adapter_dir} was trained "
                               f"on ({recorded}): {difference}; merge onto {recorded}")


def merge_lora(adapter_dir: str | Path, output_dir: str | Path, base_path: str | Path | None = None) -> Path:
    """Fold the adapter of `adapter_dir` into its base model and write a plain UniMM model (+ text tokenizer) to
    `output_dir`, loadable with `UniMMForCausalLM.from_pretrained`. The base must fit the adapter (tensor shapes)
    and, when it is not the base recorded in the adapter config, hold that model's config and weights."""
    base_path = Path(base_path) if base_path is not None else base_model_path(adapter_dir)
    _check_base_fits_adapter(Path(adapter_dir), base_path)
    _check_base_identity(Path(adapter_dir), base_path)
    merged = load_lora_model(adapter_dir, base_path).merge_and_unload()
    output_dir = Path(output_dir)
    merged.save_pretrained(output_dir)
    # The finetune saves the (possibly extended) text tokenizer next to each checkpoint; fall back to the base's.
    text_tokenizer_source = adapter_dir if (Path(adapter_dir) / "tokenizer_config.json").is_file() else base_path
    AutoTokenizer.from_pretrained(text_tokenizer_source).save_pretrained(output_dir)
    logger.info("merged %s into %s -> %s", adapter_dir, base_path, output_dir)
    return output_dir
