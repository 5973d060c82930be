"""`--group_by_modality_length`: the LLM trainer draws its batches from `GroupedBatchSampler`, so every device batch
holds samples of one task, and every sample of the epoch is drawn."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def built(tiny_unimm, toy):
    from unimm.train.args import ModelArguments
    from unimm.train.llm.build import build_model

    return build_model(ModelArguments(model_path=str(tiny_unimm), visual_tokenizer_path=str(toy["tokenizer"])))


def _trainer(built, toy, tmp_path, group: bool):
    from unimm.cli import pretrain
    from unimm.train.llm.build import build_train_dataset
    from unimm.train.llm.trainer import UniMMTrainer
    from unimm.utils.runtime import prepare_training_arguments

    _, _, data_args, training_args = pretrain.parse_args([
        "--model_path", "unused", "--code_cache", str(toy["cache"]), "--caption_weight", "1", "--t2i_weight", "1",
        "--num_samples", "24", "--max_length", "64", "--per_device_train_batch_size", "4", "--seed", "3",
        "--group_by_modality_length", str(group).lower(), "--output_dir", str(tmp_path), "--report_to", "none",
        "--use_cpu", "true", "--dataloader_num_workers", "0"])
    prepare_training_arguments(training_args)
    dataset = build_train_dataset(data_args, built, seed=training_args.seed)
    return UniMMTrainer(model=built.model, args=training_args, train_dataset=dataset,
                        data_collator=lambda samples: samples)


def test_grouped_batches_hold_one_task_each(built, toy, tmp_path):
    trainer = _trainer(built, toy, tmp_path, group=True)
    loader = trainer.get_train_dataloader()
    batches = list(loader)
    assert all(len({sample.task for sample in batch}) == 1 for batch in batches)
    assert {sample.task for batch in batches for sample in batch} == {"caption", "t2i"}
    drawn = sorted(sample.sample_id + sample.task for batch in batches for sample in batch)
    everything = sorted(s.sample_id + s.task for s in (trainer.train_dataset[i] for i in range(24)))
    assert set(everything) <= set(drawn)  # every sample of the epoch (the last batch of a task is topped up)


def test_without_the_option_the_stock_sampler_mixes_tasks(built, toy, tmp_path):
    trainer = _trainer(built, toy, tmp_path, group=False)
    batches = list(trainer.get_train_dataloader())
    assert any(len({sample.task for sample in batch}) > 1 for batch in batches)
    assert torch.is_tensor(batches[0][0].input_ids)
