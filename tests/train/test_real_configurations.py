"""The configurations users actually run, on tiny models with the real structure (`unimm.testing.LLM_FAMILIES`):
packing on BOS-less and BOS tokenizers, LoRA's new rows on tied and untied heads, float32 master weights without
DeepSpeed, and one resume decision for every rank."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer

from unimm.data.collator import UniMMCollator
from unimm.data.sequence import ImageSlot
from unimm.data.sources import normalise_llava_record
from unimm.data.tasks import SampleConfig, SampleFactory
from unimm.llm import UniMMForCausalLM, extend_tokenizer_and_model
from unimm.testing import build_family_llm

SPEC = {"pixel": (16, 2), "semantic": (8, 1)}
HEADS = dict(depth_head_hidden_size=16, depth_head_num_heads=2, depth_head_layers=1, code_embed_dim=8)
NUM_POSITIONS = 4
TEXTS = ["a red circle on the left of the image", "the quick brown fox jumps over the lazy dog",
         "hello world, this is a small corpus", "what colour is the shape? the shape is yellow"]
CAPTIONS = ["a green square at the top right", "a blue triangle in the centre"]


def _family_stack(tmp_path, family: str, seed: int = 0):
    path, _ = build_family_llm(tmp_path / family, family, hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1)
    tokenizer = AutoTokenizer.from_pretrained(path)
    torch.manual_seed(seed)
    model = UniMMForCausalLM.from_llm(path, SPEC, attn_implementation="sdpa", **HEADS)
    layout = extend_tokenizer_and_model(tokenizer, model, SPEC)
    if tokenizer.pad_token_id is None:  # LLaMA-2's tokenizer ships without one; the collator only needs a filler id
        tokenizer.pad_token = tokenizer.unk_token
    return model, tokenizer, layout


def _codes(seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {name: torch.randint(0, num_codes, (NUM_POSITIONS, depth), generator=generator)
            for name, (num_codes, depth) in SPEC.items()}


def _mixed_samples(tokenizer, layout) -> list:
    """Text, caption, text-to-image and conversation samples, interleaved."""
    factory = SampleFactory(tokenizer, layout, SampleConfig(uncond_prob=0.0, chat_format="plain"))
    samples = []
    for i, text in enumerate(TEXTS):
        samples.append(factory.text(f"text{i}", text))
        caption = CAPTIONS[i % len(CAPTIONS)]
        if i % 2 == 0:
            samples.append(factory.caption(f"cap{i}", caption, ImageSlot(codes=_codes(i), image_key=f"img{i}")))
        else:
            samples.append(factory.t2i(f"t2i{i}", caption, _codes(i)))
        record = normalise_llava_record({"id": f"conv{i}", "conversations": [
            {"from": "human", "value": "<image>\nwhat is it?"}, {"from": "gpt", "value": caption}]}, i, "f")
        samples.append(factory.conversation(record, [ImageSlot(codes=_codes(10 + i), image_key=f"img{i}")]))
    return samples


def _loss_and_grads(model, batch):
    model.zero_grad()
    inputs = {k: v for k, v in batch.items() if k != "sample_ids"}
    loss = model(**inputs).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family", ["qwen2.5-0.5b", "llama-2-7b"])
def test_packed_batches_equal_padded_ones_on_a_trained_model(tmp_path, family):
    """A model that has learnt the samples gives the same loss and gradients packed as padded: no label is taught
    across samples (without a BOS, a text sample's first token is a target, and in a packed row the previous
    sample's last token would be trained to predict it) and attention stays inside each sample."""
    torch.set_num_threads(1)
    model, tokenizer, layout = _family_stack(tmp_path, family)
    samples = _mixed_samples(tokenizer, layout)
    if family.startswith("qwen"):
        text = next(s for s in samples if s.sample_id == "text0")
        assert text.labels[0] != -100  # no BOS: the first token of a text sample is supervised
    padded = UniMMCollator(pad_token_id=tokenizer.pad_token_id)(samples)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    first = None
    for _ in range(40):  # memorise the samples: a trained model makes a leaked label cost visible
        loss, _ = _loss_and_grads(model, padded)
        first = float(loss) if first is None else first
        optimizer.step()
    assert float(loss) < 0.3 * first

    longest = max(len(s) for s in samples)
    packed = UniMMCollator(pad_token_id=tokenizer.pad_token_id, packing=True, max_length=3 * longest)(samples)
    assert packed["input_ids"].shape[0] < len(samples) // 2  # several samples per row
    padded_loss, padded_grads = _loss_and_grads(model, padded)
    packed_loss, packed_grads = _loss_and_grads(model, packed)
    torch.testing.assert_close(packed_loss, padded_loss, rtol=1e-4, atol=1e-5)
    assert padded_grads.keys() == packed_grads.keys()
    for name, grad in padded_grads.items():
        torch.testing.assert_close(packed_grads[name], grad, rtol=1e-3, atol=1e-5, msg=name)


@pytest.mark.parametrize("family", ["qwen2.5-0.5b", "llama-2-7b"])
def test_lora_trains_only_the_added_rows_of_tied_and_untied_heads(tmp_path, family):
    """LoRA keeps every original vocabulary row of the embedding and the head bit-identical, moves the added rows,
    and a tied head (Qwen2.5-0.5B) stays the embedding: the training path's loss equals the merged model's."""
    from transformers import Trainer, TrainingArguments

    from unimm.train.args import LoraArguments, ModelArguments
    from unimm.train.llm.build import apply_trainable_parts
    from unimm.train.llm.lora import token_delta_names, wrap_lora
    from unimm.train.llm.trainer import UniMMTrainer

    torch.set_num_threads(1)
    model, tokenizer, layout = _family_stack(tmp_path, family)
    model_args = ModelArguments(model_path=str(tmp_path))
    apply_trainable_parts(model, model_args, layout)
    rows = layout.original_vocab_size
    embed0 = model.get_input_embeddings().weight.detach().clone()
    head0 = model.get_output_embeddings().weight.detach().clone()
    peft_model = wrap_lora(model, LoraArguments(use_lora=True, lora_r=4, lora_dropout=0.0), model_args)

    deltas = token_delta_names(peft_model)
    assert len(deltas) == (1 if model.config.tie_word_embeddings else 2)
    # the trainer's decay exclusions name peft's parameters, so the new rows do not decay
    trainer = UniMMTrainer(model=peft_model, args=TrainingArguments(str(tmp_path / "run"), use_cpu=True,
                                                                   report_to="none"),
                           no_decay_param_names=deltas)
    decayed = set(trainer.get_decay_parameter_names(peft_model))
    assert deltas and not deltas & decayed
    assert isinstance(trainer, Trainer)

    batch = UniMMCollator(pad_token_id=tokenizer.pad_token_id)(_mixed_samples(tokenizer, layout))
    batch.pop("sample_ids")
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2,
                                  weight_decay=0.1)
    for _ in range(3):
        peft_model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    peft_model.eval()
    with torch.no_grad():
        trained_loss = peft_model(**batch).loss
    merged = peft_model.merge_and_unload()
    with torch.no_grad():
        served_loss = merged(**batch).loss
    torch.testing.assert_close(served_loss, trained_loss, rtol=1e-5, atol=1e-6)
    embed, head = merged.get_input_embeddings().weight, merged.get_output_embeddings().weight
    assert (embed.data_ptr() == head.data_ptr()) == model.config.tie_word_embeddings
    assert torch.equal(embed[:rows], embed0[:rows]) and torch.equal(head[:rows], head0[:rows])
    assert (embed[rows:] - embed0[rows:]).abs().max() > 1e-4
    assert (head[rows:] - head0[rows:]).abs().max() > 1e-4


def test_bf16_without_deepspeed_keeps_float32_master_weights(tmp_path, capsys):
    """--bf16 true without DeepSpeed: updates far below a bfloat16 step (2^-8 of a weight) still move the weights,
    because the weights stay float32 and only the compute runs in bf16; an explicit bf16 load is refused."""
    from transformers import AutoModelForCausalLM

    from unimm.cli import pretrain
    from unimm.tokenizer import build_tokenizer

    path, tokenizer = build_family_llm(tmp_path / "llm", "qwen2.5-0.5b", hidden_size=32, num_layers=1,
                                       num_heads=2, num_kv_heads=1)
    build_tokenizer("dualtoken-tiny", image_size=16, patch_size=4, encoder_hidden_size=32, pixel_num_codes=16,
                    semantic_num_codes=16).save_pretrained(tmp_path / "visual")
    text = tmp_path / "text.jsonl"
    text.write_text("".join(f'{{"id": "t{i}", "text": "{t}"}}\n' for i, t in enumerate(TEXTS)))
    args = ["--llm_path", str(path), "--visual_tokenizer_path", str(tmp_path / "visual"), "--text_data", str(text), "--text_weight", "1", "--caption_weight", "0",
            "--t2i_weight", "0", "--max_length", "32", "--bf16", "true", "--max_steps", "2",
            "--per_device_train_batch_size", "2", "--learning_rate", "1e-6", "--warmup_steps", "0",
            "--lr_scheduler_type", "constant", "--report_to", "none", "--save_strategy", "no", "--use_cpu", "true"]
    pretrain.main([*args, "--output_dir", str(tmp_path / "run")])
    trained = UniMMForCausalLM.from_pretrained(tmp_path / "run")
    original = AutoModelForCausalLM.from_pretrained(path)
    before = original.model.layers[0].mlp.up_proj.weight
    after = trained.language_model.model.layers[0].mlp.up_proj.weight
    assert after.dtype == torch.float32
    step = (after - before).abs()
    assert step.max() > 0  # moved
    # every move is far smaller than what bfloat16 could represent next to the weight: it would have rounded away
    moved = step > 0
    assert (step[moved] / before.abs()[moved].clamp_min(1e-3)).median() < 2**-9

    with pytest.raises(SystemExit) as stopped:
        pretrain.main([*args, "--dtype", "bfloat16", "--output_dir", str(tmp_path / "refused")])
    assert stopped.value.code == 2
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert "dtype=bfloat16 without DeepSpeed" in message and "no float32 master copy" in message


def _resume_worker(rank: int, world: int, port: int, dirs: list[str], result_dir: str) -> None:
    import json
    import os
    from pathlib import Path

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from unimm.train.llm.trainer import find_resume_checkpoint

    try:
        chosen = find_resume_checkpoint(None, dirs[rank], auto_resume=True)
        outcome = {"chosen": chosen}
    except Exception as err:  # noqa: BLE001 - the test reads what each rank saw
        outcome = {"error": f"{type(err).__name__}: {err}"}
    Path(result_dir, f"rank{rank}.json").write_text(json.dumps(outcome))
    dist.destroy_process_group()


def test_every_rank_resumes_the_step_rank_0_chose(tmp_path):
    """Two ranks that see different output folders (two nodes, local disks): rank 1's newest complete checkpoint
    is newer than rank 0's, yet both resume rank 0's step, each from its own copy; a node without that copy stops
    with one line naming it."""
    import json

    import torch.multiprocessing as mp

    from unimm.testing import free_port
    from unimm.train.checkpoint import mark_complete

    def node(name: str, steps: list[int]) -> str:
        for step in steps:
            folder = tmp_path / name / f"checkpoint-{step}"
            folder.mkdir(parents=True)
            mark_complete(folder, step)
        return str(tmp_path / name)

    results = tmp_path / "results"
    results.mkdir()
    dirs = [node("node0", [10, 20]), node("node1", [10, 20, 30])]
    mp.spawn(_resume_worker, args=(2, free_port(), dirs, str(results)), nprocs=2)
    outcome = [json.loads((results / f"rank{r}.json").read_text()) for r in range(2)]
    assert outcome[0]["chosen"].endswith("node0/checkpoint-20")
    assert outcome[1]["chosen"].endswith("node1/checkpoint-20")  # today rank 1 would take its own checkpoint-30

    dirs = [node("node2", [10, 40]), node("node3", [10])]
    mp.spawn(_resume_worker, args=(2, free_port(), dirs, str(results)), nprocs=2)
    outcome = [json.loads((results / f"rank{r}.json").read_text()) for r in range(2)]
    assert outcome[0]["chosen"].endswith("node2/checkpoint-40")
    assert "UserError" in outcome[1]["error"] and "checkpoint-40" in outcome[1]["error"]
    assert "node3/checkpoint-40 is missing" in outcome[1]["error"]
