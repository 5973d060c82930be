"""Fixtures of the evaluation-harness tests: a tiny DualToken visual tokenizer on 32 px shapes images and two
untrained UniMM models on the tiny Qwen2 of the root conftest, one reading the images as codes and one as features
(a feature projector), saved to disk as lmms-eval loads them."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def visual_tokenizer_path(tmp_path_factory) -> Path:
    from unimm.tokenizer import build_tokenizer

    path = tmp_path_factory.mktemp("eval_visual_tokenizer")
    build_tokenizer("dualtoken-tiny", image_size=32, patch_size=8, encoder_hidden_size=32, pixel_num_codes=64,
                    semantic_num_codes=64).save_pretrained(path)
    return path


def _save_unimm(path: Path, llm: Path, visual_tokenizer: Path, use_image_features: bool) -> Path:
    from unimm.train.args import ModelArguments, VisualModulesConfig
    from unimm.train.llm.build import build_model

    built = build_model(ModelArguments(llm_path=str(llm), visual_tokenizer_path=str(visual_tokenizer)),
                        VisualModulesConfig(depth_head_layers=1), use_image_features=use_image_features)
    built.model.save_pretrained(path)
    built.text_tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def unimm_codes_path(tmp_path_factory, tiny_qwen2_path, visual_tokenizer_path) -> Path:
    return _save_unimm(tmp_path_factory.mktemp("eval_unimm_codes"), tiny_qwen2_path, visual_tokenizer_path, False)


@pytest.fixture(scope="session")
def unimm_features_path(tmp_path_factory, tiny_qwen2_path, visual_tokenizer_path) -> Path:
    return _save_unimm(tmp_path_factory.mktemp("eval_unimm_features"), tiny_qwen2_path, visual_tokenizer_path, True)
