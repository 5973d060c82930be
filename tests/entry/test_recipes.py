"""Every shipped LLM recipe (`configs/pretrain`, `configs/finetune`, `configs/quickstart`), run as written but shrunk:
a tiny LLM of the family its comment names (`unimm.testing.LLM_FAMILIES`: Qwen2.5 tied, no BOS), a tiny visual
tokenizer of its kind, 2 steps, with its packing, LoRA, bf16, gradient checkpointing, accumulation and understanding
input as the YAML has them. Each run is audited:

- parameter movement: every parameter the recipe trains moved, every frozen one (and every original vocabulary row
  that only the added rows should change) is bit-identical;
- the optimizer holds exactly the trainable parameters, with the recipe's weight decay, the stock and UniMM decay
  exclusions, and the projector's own learning rate where the recipe sets one;
- the saved model (merged, for LoRA) reloads and gives the trained model's logits.

The recipes run in one process here (the audit reads the live trainer); their multi-GPU launch is checked by
`test_llava_full_recipe_under_zero3_with_vqrae_features` (2 gloo ranks, ZeRO-3) and by the DeepSpeed tests of
`test_pretrain_deepspeed.py` and the quickstart (`test_quickstart.py`, ZeRO-2).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from tests.entry.conftest import REPO, deepspeed_launcher, log_history, run_script

pytestmark = pytest.mark.slow


@dataclass(frozen=True)
class Recipe:
    program: str  # pretrain | finetune
    family: str  # the LLM family the recipe's comment names
    visual: str  # dualtoken | vqrae
    base: str = "llm"  # llm: a plain LLM (llm_path); unimm: a pretrained UniMM model (model_path)
    idle: tuple[str, ...] = ()  # trained modules the recipe's data gives no gradient (say why in the entry)


RECIPES = {
    "configs/pretrain/heads_only.yaml": Recipe("pretrain", "qwen2.5-1.5b", "dualtoken"),
    "configs/pretrain/qwen2.5_0.5b_vqrae.yaml": Recipe("pretrain", "qwen2.5-0.5b", "vqrae"),
    "configs/pretrain/qwen2.5_1.5b_dualtoken.yaml": Recipe("pretrain", "qwen2.5-1.5b", "dualtoken"),
    "configs/finetune/llava_full.yaml": Recipe("finetune", "qwen2.5-1.5b", "vqrae"),
    # conversations only: no image is a target, so the depth heads (trained, weight decay 0) get no gradient
    "configs/finetune/llava_lora.yaml": Recipe("finetune", "qwen2.5-1.5b", "dualtoken", base="unimm",
                                               idle=("depth_heads",)),
    # the quickstart's tiny Qwen2 keeps the untied structure its recorded figures were measured with
    "configs/quickstart/pretrain.yaml": Recipe("pretrain", "qwen2.5-7b", "dualtoken"),
    "configs/quickstart/pretrain_vqrae.yaml": Recipe("pretrain", "qwen2.5-7b", "vqrae"),
    "configs/quickstart/finetune.yaml": Recipe("finetune", "qwen2.5-7b", "dualtoken", base="unimm"),
    "configs/quickstart/finetune_vqrae.yaml": Recipe("finetune", "qwen2.5-7b", "vqrae", base="unimm"),
}
# Tokenizer recipes: run by the quickstart's --fast test through scripts/train_tokenizer.py.
TOKENIZER_RECIPES = {"configs/quickstart/tokenizer_dualtoken.yaml", "configs/quickstart/tokenizer_vqrae.yaml"}


def test_every_shipped_recipe_is_audited():
    shipped = {str(p.relative_to(REPO)) for folder in ("pretrain", "finetune", "quickstart")
               for p in (REPO / "configs" / folder).glob("*.yaml")}
    assert shipped == set(RECIPES) | TOKENIZER_RECIPES


@pytest.fixture(scope="session")
def family_llms(tmp_path_factory, qwen_tokenizer_path) -> dict[str, Path]:
    from transformers import AutoTokenizer

    from unimm.testing import build_tiny_llm

    root = tmp_path_factory.mktemp("recipe_llms")
    tokenizer = AutoTokenizer.from_pretrained(qwen_tokenizer_path)  # Qwen kind: byte-level BPE, no BOS, ChatML
    return {family: build_tiny_llm(root / family, family, tokenizer, hidden_size=32, num_layers=2, num_heads=2,
                                   num_kv_heads=1)
            for family in sorted({r.family for r in RECIPES.values()})}


@pytest.fixture(scope="session")
def pretrained_unimm(family_llms, toy, vqrae_toy, tmp_path_factory):
    """The model_path a finetune recipe starts from: a saved UniMM model of the family, with a feature projector
    for the VQRAE recipes (pretrained with understanding_input features)."""
    from unimm.train.args import ModelArguments, VisualModulesConfig
    from unimm.train.llm.build import build_model

    made: dict[tuple[str, str], Path] = {}

    def get(family: str, visual: str) -> Path:
        if (family, visual) not in made:
            assets = vqrae_toy if visual == "vqrae" else toy
            path = tmp_path_factory.mktemp(f"unimm_{family}_{visual}")
            built = build_model(ModelArguments(llm_path=str(family_llms[family]),
                                               visual_tokenizer_path=str(assets["tokenizer"])),
                                VisualModulesConfig(depth_head_layers=1), use_image_features=visual == "vqrae")
            built.model.save_pretrained(path)
            built.text_tokenizer.save_pretrained(path)
            made[(family, visual)] = path
        return made[(family, visual)]

    return get


def _argv(recipe_file: str, recipe: Recipe, paths: dict, model: Path, output_dir: Path) -> list[str]:
    import yaml

    config = yaml.safe_load((REPO / recipe_file).read_text())
    argv = [str(REPO / recipe_file), "--output_dir", str(output_dir), "--visual_tokenizer_path",
            str(paths["tokenizer"]), ("--llm_path" if recipe.base == "llm" else "--model_path"), str(model)]
    if recipe.base == "unimm" and "llm_path" in config:
        argv += ["--llm_path", "null"]
    if recipe.base == "llm" and "model_path" in config:
        argv += ["--model_path", "null"]
    if config.get("caption_weight", 1.0) > 0 or config.get("t2i_weight", 1.0) > 0:
        argv += ["--code_cache", str(paths["cache"])]
    if config.get("text_weight", 0) > 0:
        argv += ["--text_data", str(paths["text"])]
    if config.get("conversation_weight", 0) > 0:
        argv += ["--conversation_json", str(paths["conversations"]), "--image_folder", str(paths["images"])]
        if "conversation_code_cache" in config or (recipe.visual == "dualtoken" and recipe.program == "finetune"
                                                   and "conversation_json" not in config):
            # the quickstart passes its conversation cache on the command line
            argv += ["--conversation_code_cache", str(paths["conversation_cache"])]
    # shrunk: sizes and lengths only; packing, LoRA, bf16, checkpointing, accumulation, LRs stay as written
    argv += ["--max_steps", "2", "--per_device_train_batch_size", "4", "--max_length", "64", "--num_samples", "16",
             "--warmup_steps", "0", "--logging_steps", "1", "--save_steps", "1000", "--dataloader_num_workers", "0",
             "--use_cpu", "true", "--report_to", "none", "--seed", "5"]
    if config.get("use_lora"):
        argv += ["--lora_r", "4"]
    return argv


def _without(argv: list[str], option: str) -> list[str]:
    """`argv` without `option` and its value (the launcher's ranks pick their device themselves)."""
    at = argv.index(option)
    return argv[:at] + argv[at + 2:]


def _classify(name: str) -> str:
    """What a parameter name is: adapter, token_rows (peft trainable tokens), vocab (embedding / head table),
    visual (code embeddings, depth heads, image positions), projector, llm (the LLM body)."""
    if "lora_" in name:
        return "adapter"
    if "trainable_tokens_delta" in name:
        return "token_rows"
    if "embed_tokens" in name or "lm_head" in name:
        return "vocab"
    if "feature_projector" in name:
        return "projector"
    if any(part in name for part in ("visual_embedding", "depth_heads", "image_position_embedding")):
        return "visual"
    return "llm"


def _group_depth(name: str, layout) -> int:
    group = name.split("depth_heads.")[1].split(".")[0]
    return int(layout.codebook_spec[group]["depth"])


def _expected_to_move(kind: str, name: str, model_args, lora: bool, layout, full_tables: bool = False) -> bool:
    if ".original_module." in name:  # peft keeps the frozen original beside a modules_to_save copy
        return False
    if ".code_embedding." in name and _group_depth(name, layout) == 1:
        return False  # embeds codes 1..d-1 of a depth-d group: a depth-1 group (VQRAE) never reads it
    return {
        "adapter": True,
        "token_rows": model_args.train_new_embeddings,
        # LoRA with lora_embeddings full trains the tables' modules_to_save copies, every row
        "vocab": (model_args.train_llm and not lora) or (full_tables and ".modules_to_save." in name),
        "projector": model_args.train_projector,
        "visual": model_args.train_visual_heads,
        "llm": model_args.train_llm and not lora,
    }[kind]


@pytest.mark.parametrize("recipe_file", sorted(RECIPES))
def test_shipped_recipe_trains_what_it_says(recipe_file, toy, vqrae_toy, family_llms, pretrained_unimm, tmp_path,
                                            monkeypatch):
    from unimm.cli import finetune, pretrain
    from unimm.train.llm import trainer as trainer_module

    torch.set_num_threads(1)
    recipe = RECIPES[recipe_file]
    paths = dict(vqrae_toy if recipe.visual == "vqrae" else toy)
    paths["text"] = tmp_path / "text.jsonl"
    paths["text"].write_text("".join(f'{{"id": "t{i}", "text": "a {c} image"}}\n'
                                     for i, c in enumerate(["red", "green", "blue", "yellow"])))
    model = family_llms[recipe.family] if recipe.base == "llm" else pretrained_unimm(recipe.family, recipe.visual)
    output_dir = tmp_path / "run"
    program = pretrain if recipe.program == "pretrain" else finetune
    argv = _argv(recipe_file, recipe, paths, model, output_dir)
    parsed = program.parse_args(argv)
    model_args = parsed[0]
    lora = recipe.program == "finetune" and parsed[3].use_lora
    full_tables = lora and parsed[3].lora_embeddings == "full" and model_args.train_new_embeddings
    training_args = parsed[-1]

    # Snapshot the live model right before training, through the real program.
    before: dict[str, torch.Tensor] = {}
    original_train = trainer_module.UniMMTrainer.train

    precision: list[str] = []

    def snapshot_then_train(self, *args, **kwargs):
        before.update({n: p.detach().clone() for n, p in self.model.named_parameters()})
        precision.append(torch.backends.mkldnn.matmul.fp32_precision)
        return original_train(self, *args, **kwargs)

    monkeypatch.setattr(trainer_module.UniMMTrainer, "train", snapshot_then_train)
    precision_before = torch.backends.mkldnn.matmul.fp32_precision
    trainer = program.main(argv)
    # the recipe's float32 product precision holds while it trains (a CPU without native bf16 keeps ieee), and the
    # process's own comes back after
    from unimm.utils.hf_compat import cpu_has_native_bf16

    wanted = training_args.cpu_matmul_precision
    assert precision == [wanted if cpu_has_native_bf16() else "ieee"]
    assert torch.backends.mkldnn.matmul.fp32_precision == precision_before
    trained = trainer.model
    after = dict(trained.named_parameters())
    assert before.keys() == after.keys()

    # -- parameter movement
    base = trained.get_base_model() if lora else trained
    layout = base.config.layout
    rows = layout.original_vocab_size
    wrong = []
    for name, value in after.items():
        kind = _classify(name)
        moved = not torch.equal(value.detach(), before[name])
        should = _expected_to_move(kind, name, model_args, lora, layout, full_tables)
        if should and any(part in name for part in recipe.idle):
            assert not moved, f"{name} moved although {recipe_file} gives it no gradient (update RECIPES)"
            continue
        if kind == "vocab" and not should:
            # the original rows never move; the added rows move exactly when the recipe trains them (no LoRA)
            assert torch.equal(value[:rows], before[name][:rows]), f"{name}: original vocabulary rows moved"
            new_rows_move = model_args.train_new_embeddings and not lora
            if new_rows_move != (not torch.equal(value[rows:], before[name][rows:])):
                wrong.append(f"{name} new rows {'did not move' if new_rows_move else 'moved'}")
            continue
        if moved != should:
            wrong.append(f"{name} ({kind}) {'moved' if moved else 'did not move'}")
    assert not wrong, f"{recipe_file}: " + "; ".join(wrong)

    # -- optimizer groups
    optimizer = trainer.optimizer
    optimized = {id(p) for group in optimizer.param_groups for p in group["params"]}
    trainable = {id(p) for p in trained.parameters() if p.requires_grad}
    assert optimized == trainable
    names = {id(p): n for n, p in trained.named_parameters()}
    decayed = set(trainer.get_decay_parameter_names(trained))
    for group in optimizer.param_groups:
        group_names = {names[id(p)] for p in group["params"]}
        if group["weight_decay"] > 0:
            assert group_names <= decayed
            assert not any("bias" in n or "norm" in n or "trainable_tokens_delta" in n for n in group_names)
        if training_args.weight_decay > 0 and group_names & decayed:
            assert group["weight_decay"] == training_args.weight_decay
    projector_lr = getattr(training_args, "projector_learning_rate", None)
    if projector_lr is not None:
        projector_groups = [g for g in optimizer.param_groups
                            if any("feature_projector" in names[id(p)] for p in g["params"])]
        assert projector_groups and all(g["initial_lr"] == projector_lr for g in projector_groups)

    # -- save and reload (merged, for LoRA) give the trained model's logits
    from unimm.llm import UniMMForCausalLM

    batch = next(iter(trainer.get_train_dataloader()))
    batch.pop("labels")
    batch.pop("sample_ids", None)
    if "pixel_values" in batch:
        batch = trainer._encode_pixels(batch)
    if lora:
        from unimm.train.llm.lora import merge_lora

        reloaded = UniMMForCausalLM.from_pretrained(merge_lora(output_dir, tmp_path / "merged"))
    else:
        reloaded = UniMMForCausalLM.from_pretrained(output_dir)
    trained.eval()
    reloaded.eval()
    # In float32: the class's forward, not the instance's, which accelerate wrapped in the recipe's bf16 autocast
    # (there a merged weight rounds differently from base + adapter).
    with torch.no_grad():
        expected = type(trained).forward(trained, **batch).logits.float()
        got = reloaded(**batch).logits.float()
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_llava_full_recipe_under_zero3_with_vqrae_features(vqrae_toy, family_llms, tmp_path):
    """The LLaVA full-finetune recipe as its comment launches it (ZeRO-3), on 2 gloo ranks, reading images as
    VQRAE features: the visual tokenizer runs outside the engine, so it must be whole on every rank (it was
    partitioned, and the first batch died with `weight should have at least three dimensions`)."""
    out = tmp_path / "zero3"
    recipe = "configs/finetune/llava_full.yaml"
    argv = _argv(recipe, RECIPES[recipe], dict(vqrae_toy), family_llms["qwen2.5-1.5b"], out)
    run_script([str(REPO / "scripts" / "finetune.py"), "--deepspeed", str(REPO / "configs/deepspeed/zero3.json"),
                *_without(argv, "--use_cpu")], launcher=deepspeed_launcher())
    losses = [entry["loss"] for entry in log_history(out)]
    assert len(losses) == 2 and all(loss == loss and loss > 0 for loss in losses)
    from unimm.llm import UniMMForCausalLM

    model = UniMMForCausalLM.from_pretrained(out)
    assert model.feature_projector is not None and model.config.tie_word_embeddings


def test_accumulation_of_four_equals_one_batch_of_four_with_packing(toy, family_llms, tmp_path):
    """Packing + gradient accumulation 4 x batch 1 takes the same step as 1 x batch 4 (SGD: the weight change is the
    gradient): the loss is normalised by the items of the whole accumulated batch, whatever the rows hold."""
    from unimm.cli import pretrain
    from unimm.llm import UniMMForCausalLM

    torch.set_num_threads(1)
    common = ["--llm_path", str(family_llms["qwen2.5-1.5b"]), "--visual_tokenizer_path", str(toy["tokenizer"]),
              "--code_cache", str(toy["cache"]), "--caption_weight", "1", "--t2i_weight", "1", "--packing", "true",
              "--max_length", "96", "--num_samples", "8", "--depth_head_layers", "1", "--max_steps", "1",
              "--optim", "sgd", "--learning_rate", "0.5", "--warmup_steps", "0", "--lr_scheduler_type", "constant",
              "--weight_decay", "0", "--max_grad_norm", "0", "--save_strategy", "no", "--report_to", "none",
              "--dataloader_num_workers", "0", "--use_cpu", "true", "--seed", "11"]
    runs = {}
    for name, (batch, accumulation) in {"1x4": (4, 1), "4x1": (1, 4)}.items():
        out = tmp_path / name
        pretrain.main([*common, "--per_device_train_batch_size", str(batch), "--gradient_accumulation_steps",
                       str(accumulation), "--output_dir", str(out)])
        runs[name] = dict(UniMMForCausalLM.from_pretrained(out).named_parameters())
    for name, value in runs["1x4"].items():
        torch.testing.assert_close(runs["4x1"][name], value, rtol=1e-4, atol=1e-6, msg=name)
    from transformers import AutoModelForCausalLM

    original = AutoModelForCausalLM.from_pretrained(family_llms["qwen2.5-1.5b"])
    step = runs["1x4"]["language_model.model.layers.0.mlp.up_proj.weight"] - original.model.layers[0].mlp.up_proj.weight
    assert step.abs().max() > 1e-4  # the step is large enough for the comparison to mean something
