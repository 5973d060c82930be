"""`UniMMForCausalLM`: a Hugging Face causal LM (wrapped, never copied) plus the visual modules of
docs/DESIGN.md §3 — code embeddings, the continuous-feature projector and one depth-transformer head per codebook
group."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM, GenerationMixin, PreTrainedModel

from unimm.llm.configuration import UniMMConfig
from unimm.llm.depth_head import DepthTransformerHead
from unimm.llm.embedding import (
    CodeEmbedding,
    FeatureProjector,
    SinCosImagePositionEmbedding,
    VisualCodeEmbedding,
    build_image_position_embedding,
    image_position_index,
    scatter_visual_embeddings,
)
from unimm.llm.identity import visual_tokenizer_identity
from unimm.llm.layout import VocabLayout
from unimm.llm.loss import joint_loss
from unimm.tokenizer.types import CodebookSpec
from unimm.utils import hf_compat
from unimm.utils.attention import select_attn_implementation


def _check_safetensors_files(folder: Path) -> None:
    """Open the header of every `*.safetensors` file in `folder` and check its size against it: a truncated or
    damaged weights file is named here, not deep inside loading."""
    from safetensors import safe_open

    from unimm.utils.errors import ModelFolderError

    for file in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(file), framework="pt") as handle:
                handle.keys()
        except Exception as err:  # noqa: BLE001 - safetensors raises its own SafetensorError for every defect
            raise ModelFolderError(f"{file}: damaged weights file ({' '.join(str(err).split())[:160]}); copy or "
                                   "save it again") from None


@dataclass
class UniMMCausalLMOutput(hf_compat.CausalLMOutputWithCache):
    """`loss` = normalised total; `text_loss` / `visual_losses[group]` / `visual_depth_losses[group] [D]` are
    detached per-target means for logging. `logits` is None in training (the LM head only runs where supervised)
    unless `return_logits=True`.

    The fields `loss`, `logits`, the KV cache, `hidden_states` and `attentions` are those of transformers'
    `CausalLMOutputWithPast`, so HF generation finds the cache under the name the installed release uses
    (`cache` from 5.24, `past_key_values` before); `kv_cache` reads it under either."""

    text_loss: torch.FloatTensor | None = None
    visual_losses: dict[str, torch.FloatTensor] | None = None
    visual_depth_losses: dict[str, torch.FloatTensor] | None = None
    last_hidden_state: torch.FloatTensor | None = None

    @property
    def kv_cache(self):
        return hf_compat.output_cache(self)


class UniMMPreTrainedModel(PreTrainedModel):
    """Activation (gradient) checkpointing: `activation_checkpointing_enable()` (or its older name
    `gradient_checkpointing_enable()`, HF Trainer's `gradient_checkpointing`) from `PreTrainedModel` reaches the
    wrapped LLM's decoder layers and the depth heads' blocks (`DepthBlock` is a `GradientCheckpointingLayer`): at the
    paper shape a head's 729 x 8-token transformer holds more activations per image than two LLM layers. Without
    explicit kwargs the checkpoint is non-reentrant."""

    config_class = UniMMConfig
    base_model_prefix = ""
    supports_gradient_checkpointing = True
    _no_split_modules = ["DepthBlock"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = False
    _can_compile_fullgraph = False
    # No tie of its own, but a mapping (not None): tools that look for heads tied to the input embedding (peft's
    # trainable tokens, which must give a tied LM head the same new rows) then collect the wrapped LLM's
    # `_tied_weights_keys`, e.g. Qwen2.5-0.5B's `lm_head.weight -> model.embed_tokens.weight`.
    _tied_weights_keys: dict[str, str] = {}

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, SinCosImagePositionEmbedding):
            module.gain.fill_(module.init_gain)
        elif isinstance(module, CodeEmbedding) or module is getattr(self, "image_position_embedding", None):
            nn.init.normal_(module.weight, std=0.02)
        elif isinstance(module, DepthTransformerHead):
            nn.init.normal_(module.depth_embedding, std=0.02)
            nn.init.normal_(module.classifier, std=0.02)
        else:
            super()._init_weights(module)


class UniMMForCausalLM(UniMMPreTrainedModel, GenerationMixin):
    """Wraps `AutoModelForCausalLM` (`self.language_model`) and adds:

    - `visual_embedding`: codes -> input vectors (absent in flat mode, where codes are vocabulary tokens);
    - `feature_projector`: continuous encoder features -> input vectors (when `config.feature_dim` is set);
    - `depth_heads[group]`: predict a visual position's codes from the previous hidden state;
    - `image_position_embedding` (optional, `config.image_position_embedding`): position inside the image.

    Build from an existing checkpoint with `UniMMForCausalLM.from_llm(path_or_model, codebook_spec)`, then call
    `unimm.llm.vocab.extend_tokenizer_and_model` (before DeepSpeed wraps the model) to add the special tokens.
    """

    def __init__(self, config: UniMMConfig, language_model: PreTrainedModel | None = None):
        super().__init__(config)
        if language_model is None:
            # an implementation requested through from_pretrained(attn_implementation=...) wins over the config's
            requested = hf_compat.attn_implementation_of(config.text_config) or config.llm_attn_implementation
            attn = select_attn_implementation(requested, config.text_config.dtype)
            language_model = AutoModelForCausalLM.from_config(config.text_config, attn_implementation=attn)
        else:
            # A loaded checkpoint: post_init below must not re-initialise it.
            hf_compat.mark_weights_initialized(language_model)
        self.language_model = language_model
        # One config object, so that resizing the vocabulary updates what save_pretrained writes.
        self.config.text_config = language_model.config
        hidden = config.hidden_size
        groups = config.groups
        self.visual_embedding = None
        self.depth_heads = None
        if groups and not config.flat_codes:
            self.visual_embedding = VisualCodeEmbedding(groups, config.embed_dim, hidden,
                                                        config.per_depth_code_embeddings)
            self.depth_heads = nn.ModuleDict({
                name: DepthTransformerHead(
                    group, hidden, config.head_hidden_size, config.depth_head_layers, config.head_num_heads,
                    config.head_intermediate_size, config.depth_head_dropout, config.shared_depth_classifier,
                    config.per_depth_code_embeddings,
                )
                for name, group in groups.items()
            })
        self.feature_projector = (FeatureProjector(config.feature_dim, hidden, config.feature_projector_type)
                                  if config.feature_dim else None)
        self.image_position_embedding = (
            build_image_position_embedding(config.image_position_embedding_type, config.num_image_positions, hidden,
                                           config.image_position_sincos_temperature)
            if config.image_position_embedding else None)
        self.post_init()

    # -- construction -----------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, allow_missing: tuple[str, ...] = (), **kwargs):
        """`PreTrainedModel.from_pretrained`, checked: a local folder's `config.json` must hold the keys that fix the
        architecture (`check_saved_config`) and its safetensors files must be whole, before anything is built; and
        every parameter must come from the weights (a "missing key" would be a randomly initialised layer) unless
        its name starts with one of `allow_missing` (new modules the caller adds on purpose). Each failure is a
        `ModelFolderError` naming the file or the keys."""
        import json

        from unimm.llm.configuration import check_saved_config
        from unimm.utils.errors import ModelFolderError, invalid_json

        folder = Path(pretrained_model_name_or_path) if isinstance(pretrained_model_name_or_path, (str, Path)) else None
        if folder is not None and (folder / "config.json").is_file() and "config" not in kwargs:
            try:
                config_dict = json.loads((folder / "config.json").read_text())
            except json.JSONDecodeError as err:
                raise invalid_json(folder / "config.json", err) from None
            check_saved_config(config_dict, str(folder / "config.json"))
            _check_safetensors_files(folder)
        wants_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(pretrained_model_name_or_path, *args, output_loading_info=True, **kwargs)
        missing = [key for key in info.get("missing_keys", ()) if not key.startswith(tuple(allow_missing))]
        if missing:
            shown = ", ".join(sorted(missing)[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            raise ModelFolderError(f"{pretrained_model_name_or_path}: the weights lack {len(missing)} parameter(s) "
                                   f"the config asks for ({shown}): they would be random; the config.json does not "
                                   "match the weights")
        return (model, info) if wants_info else model

    @classmethod
    def from_llm(
        cls,
        llm: str | Path | PreTrainedModel,
        codebook_spec: CodebookSpec | dict | None = None,
        flat_codes: bool = False,
        feature_dim: int | None = None,
        dtype: torch.dtype | None = None,
        attn_implementation: str = "auto",
        **config_kwargs,
    ) -> UniMMForCausalLM:
        """Wrap a causal LM (a local checkpoint path or a loaded model) and add freshly initialised visual modules
        for `codebook_spec` (group -> `CodebookGroupSpec`, dict, or `(num_codes, depth[, code_dim])`), or for a
        visual tokenizer passed in its place: its `codebook_spec`, its `num_positions` as `num_image_positions`
        (so `generate_images` knows the image length) unless given, and its identity (`unimm.llm.identity`), which
        `save_pretrained` writes into the config.

        The LLM keeps the dtype it is loaded in (`dtype`, else the checkpoint's); the new visual modules are float32
        unless `dtype` is given, so a bf16 checkpoint does not silently give bf16 master weights to modules trained
        from scratch."""
        if hasattr(codebook_spec, "codebook_spec"):  # a visual tokenizer (VQRAE, DualToken)
            visual_tokenizer = codebook_spec
            codebook_spec = visual_tokenizer.codebook_spec
            if getattr(visual_tokenizer, "num_positions", None) is not None:
                config_kwargs.setdefault("num_image_positions", int(visual_tokenizer.num_positions))
            config_kwargs.setdefault("visual_tokenizer_identity", visual_tokenizer_identity(visual_tokenizer))
        if isinstance(llm, (str, Path)):
            if not Path(llm).exists():
                raise FileNotFoundError(f"LLM checkpoint not found: {llm} (UniMM never downloads weights)")
            attn = select_attn_implementation(attn_implementation, dtype)
            llm = AutoModelForCausalLM.from_pretrained(llm, dtype=dtype, attn_implementation=attn)
        config = UniMMConfig(
            text_config=llm.config, codebook_spec=UniMMConfig.spec_to_dict(codebook_spec or {}), flat_codes=flat_codes,
            feature_dim=feature_dim, llm_attn_implementation=attn_implementation,
            # propagates to text_config; without it the nested config's implementation would be reset to None
            attn_implementation=hf_compat.attn_implementation_of(llm.config), **config_kwargs,
        )
        model = cls(config, language_model=llm)
        return model.to(dtype) if dtype is not None else model

    # -- HF plumbing, delegated to the wrapped LLM ----------------------------------------------------------
    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.language_model.get_output_embeddings()

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_output_embeddings(value)

    def get_decoder(self) -> nn.Module:
        return self.language_model.get_decoder()

    def resize_token_embeddings(self, *args, **kwargs) -> nn.Embedding:
        embeddings = self.language_model.resize_token_embeddings(*args, **kwargs)
        self.config.text_config = self.language_model.config
        return embeddings

    @property
    def layout(self) -> VocabLayout | None:
        return self.config.layout

    @property
    def group_names(self) -> list[str]:
        return list(self.config.codebook_spec)

    def visual_module_names(self) -> list[str]:
        """Names of the visual modules, in the form peft's `modules_to_save` accepts (LoRA finetuning keeps them
        fully trainable): `visual_embedding`, `feature_projector`, `image_position_embedding`, `depth_heads.<group>`."""
        names = [n for n in ("visual_embedding", "feature_projector", "image_position_embedding")
                 if getattr(self, n) is not None]
        if self.depth_heads is not None:
            names += [f"depth_heads.{group}" for group in self.depth_heads]
        return names

    def _require_layout(self) -> VocabLayout:
        layout = self.config.layout
        if layout is None:
            raise ValueError("this UniMM model has no vocabulary layout yet: call "
                             "unimm.llm.vocab.extend_tokenizer_and_model(tokenizer, model, codebook_spec) first")
        return layout

    # -- inputs -------------------------------------------------------------------------------------------------
    def flatten_visual_inputs(self, input_ids: torch.Tensor, labels: torch.Tensor | None,
                              visual_codes: dict[str, torch.Tensor] | None):
        """Flat mode: positions holding `image_token_id` with codes become code tokens `offset + code` in both
        `input_ids` and `labels`, so batches built for the depth-head layout also train a flat model."""
        layout = self._require_layout()
        (name,) = self.group_names
        codes = visual_codes[name][..., 0].to(input_ids.device)
        has_code = (codes >= 0) & (input_ids == layout.image_token_id)
        input_ids = torch.where(has_code, layout.code_to_token(codes), input_ids)
        if labels is not None:
            labels = torch.where(has_code & (labels == layout.image_token_id), layout.code_to_token(codes), labels)
        return input_ids, labels

    def embed_inputs(self, input_ids: torch.Tensor, visual_codes: dict[str, torch.Tensor] | None = None,
                     image_features: torch.Tensor | None = None, sample_ids: list[str] | None = None) -> torch.Tensor:
        """Token embeddings with visual positions replaced: positions with codes are embedded from their codes;
        remaining `image_token_id` positions take `image_features` rows in order (CONTRACTS.md)."""
        inputs_embeds = self.get_input_embeddings()(input_ids)
        layout = self.config.layout
        if layout is None:
            if visual_codes or image_features is not None:
                self._require_layout()
            return inputs_embeds
        where = f" (samples {sample_ids})" if sample_ids else ""
        has_code = torch.zeros_like(input_ids, dtype=torch.bool)
        if visual_codes and self.visual_embedding is not None:
            first = visual_codes[self.group_names[0]].to(input_ids.device)
            has_code = first[..., 0] >= 0  # [B, L]
            for name in self.group_names[1:]:
                if not torch.equal(visual_codes[name][..., 0].to(input_ids.device) >= 0, has_code):
                    raise ValueError(f"visual_codes groups disagree on which positions hold codes{where}")
            if not bool((input_ids[has_code] == layout.image_token_id).all()):
                raise ValueError(f"visual_codes are set at positions whose input_ids are not image_token_id{where}")
            codes = {}
            for name, group in self.config.groups.items():
                selected = visual_codes[name].to(input_ids.device)[has_code]  # [M, D]
                if selected.shape[-1] != group.depth or (selected >= group.num_codes).any() or (selected < 0).any():
                    raise ValueError(f"visual_codes[{name!r}] must have depth {group.depth} and codes in "
                                     f"[0, {group.num_codes}) at image positions{where}")
                codes[name] = selected
            if has_code.any():
                inputs_embeds = scatter_visual_embeddings(inputs_embeds, has_code, self.visual_embedding(codes))
        if self.training and self.visual_embedding is not None and not has_code.any():
            # keep every rank's backward over the same parameters (DDP) when a batch holds no codes
            empty = {name: input_ids.new_zeros((0, g.depth)) for name, g in self.config.groups.items()}
            inputs_embeds = inputs_embeds + self.visual_embedding(empty).sum() * 0.0
        needs_features = (input_ids == layout.image_token_id) & ~has_code
        num_feature_positions = int(needs_features.sum())
        num_features = 0 if image_features is None else image_features.shape[0] * image_features.shape[1]
        if num_feature_positions != num_features:
            raise ValueError(f"{num_feature_positions} image positions have no codes but image_features provide "
                             f"{num_features} vectors{where}")
        if num_features:
            if self.feature_projector is None:
                raise ValueError("image_features were given but the model has no feature projector "
                                 "(set UniMMConfig.feature_dim / from_llm(feature_dim=...))")
            features = image_features.to(inputs_embeds.device).flatten(0, 1)
            inputs_embeds = scatter_visual_embeddings(
                inputs_embeds, needs_features, self.feature_projector(features.to(inputs_embeds.dtype)))
        elif self.training and self.feature_projector is not None:
            # as for the code embedding above: text-only batches (LLaVA mixes) still reach every projector parameter
            empty = inputs_embeds.new_zeros((0, self.config.feature_dim))
            inputs_embeds = inputs_embeds + self.feature_projector(empty).sum() * 0.0
        if self.image_position_embedding is not None:
            is_image = input_ids == layout.image_token_id
            if self.config.flat_codes:
                is_image |= layout.is_code_token(input_ids)
            index = image_position_index(is_image)
            if index.numel() and int(index.max()) >= self.image_position_embedding.num_embeddings:
                raise ValueError(f"an image holds more than num_image_positions="
                                 f"{self.image_position_embedding.num_embeddings} positions{where}")
            positions = self.image_position_embedding(index) * is_image.unsqueeze(-1).to(inputs_embeds.dtype)
            inputs_embeds = inputs_embeds + positions.to(inputs_embeds.dtype)
        return inputs_embeds

    def add_image_position(self, embeds: torch.Tensor, position: int) -> torch.Tensor:
        """Generation: `embeds [rows, H]`, the inputs of image position `position`, plus that position's
        embedding (unchanged when the model has no `image_position_embedding`)."""
        if self.image_position_embedding is None:
            return embeds
        return embeds + self.image_position_embedding.weight[position].to(embeds.dtype)

    def compute_logits(self, hidden_states: torch.Tensor, logits_to_keep: int | torch.Tensor = 0) -> torch.Tensor:
        """Full LM-head logits (eval / generation), like the HF model (`logits_to_keep=0` keeps all positions)."""
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        return self.get_output_embeddings()(hidden_states[:, keep, :])

    # -- forward ----------------------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        visual_codes: dict[str, torch.Tensor] | None = None,
        image_features: torch.FloatTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        return_logits: bool | None = None,
        num_items_in_batch: int | torch.Tensor | None = None,
        sample_ids: list[str] | None = None,
        **kwargs,
    ) -> UniMMCausalLMOutput:
        """The batch of CONTRACTS.md. `return_logits` defaults to `labels is None`: in training the LM head runs
        only on supervised text positions. `num_items_in_batch` (from HF Trainer) replaces the per-batch
        normaliser so gradient accumulation is exact. The KV cache is taken as `cache=` or `past_key_values=`
        (the two names transformers has used), and returned as the output's `kv_cache`."""
        cache = hf_compat.pop_cache(kwargs)
        layout = self.config.layout
        packed = position_ids is not None and attention_mask is None
        if use_cache is None and cache is None and (labels is not None or packed):
            # transformers derives the block-diagonal mask of packed rows from position_ids only when it builds no
            # KV cache; with a cache, packed samples would silently attend to each other. Training needs no cache.
            use_cache = False
        if self.config.flat_codes and visual_codes and input_ids is not None:
            input_ids, labels = self.flatten_visual_inputs(input_ids, labels, visual_codes)
            visual_codes = None
        if inputs_embeds is None:
            inputs_embeds = self.embed_inputs(input_ids, visual_codes, image_features, sample_ids)
        outputs = self.get_decoder()(
            inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
            use_cache=use_cache, **hf_compat.cache_kwargs(cache), **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        result = UniMMCausalLMOutput(
            **hf_compat.cache_kwargs(hf_compat.output_cache(outputs)), hidden_states=getattr(outputs, "hidden_states", None),
            attentions=getattr(outputs, "attentions", None), last_hidden_state=hidden_states,
        )
        if labels is not None:
            flat = self.config.flat_codes and layout is not None
            parts = joint_loss(
                hidden_states, labels, self.get_output_embeddings(), self.depth_heads, visual_codes,
                image_token_id=layout.image_token_id if layout is not None else None,
                code_token_range=layout.code_token_range if flat else None,
                flat_group=self.group_names[0] if flat else None,
                visual_loss_weight=self.config.visual_loss_weight, num_items_in_batch=num_items_in_batch,
            )
            result.loss, result.text_loss = parts.loss, parts.text_loss
            result.visual_losses, result.visual_depth_losses = parts.visual_losses, parts.visual_depth_losses
        if return_logits if return_logits is not None else labels is None:
            result.logits = self.compute_logits(hidden_states, logits_to_keep)
        return result
