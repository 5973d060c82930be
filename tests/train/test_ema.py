"""The weights' EMA: averaging, and lending the averages to the model itself without a copy."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from unimm.train.ema import EMA


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3), nn.Linear(3, 2))


def test_applied_lends_the_averages_without_copying_and_gives_the_weights_back():
    model = _model()
    ema = EMA(model, decay=0.5)
    start = {name: p.detach().clone() for name, p in model.named_parameters()}
    with torch.no_grad():
        for param in model.parameters():
            param.add_(1.0)
    ema.update(model)
    trained = {name: p.detach().clone() for name, p in model.named_parameters()}
    x = torch.randn(5, 4)
    with ema.applied(model) as inside:
        assert inside is model
        for name, param in model.named_parameters():
            torch.testing.assert_close(param, (start[name] + trained[name]) / 2)  # decay 0.5: halfway
            assert param.data_ptr() == ema.shadow[name].data_ptr()  # swapped in, not copied
        averaged_out = model(x)
    for name, param in model.named_parameters():
        assert torch.equal(param, trained[name]) and param.data_ptr() != ema.shadow[name].data_ptr()
    reference = _model()
    ema.copy_to(reference)
    torch.testing.assert_close(averaged_out, reference(x))


def test_applied_gives_the_weights_back_when_the_block_raises_and_casts_other_dtypes():
    model = _model().to(torch.bfloat16)
    ema = EMA(model, decay=0.9)  # shadow in float32
    own = {name: p.detach().clone() for name, p in model.named_parameters()}
    with pytest.raises(RuntimeError, match="boom"), ema.applied(model):
        assert all(p.dtype == torch.bfloat16 for p in model.parameters())
        raise RuntimeError("boom")
    assert all(torch.equal(p, own[name]) for name, p in model.named_parameters())
