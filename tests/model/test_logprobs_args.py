"""``mstfx.chunked_logprobs`` refuses a temperature, logit scale or soft-cap that is not a finite positive
number (a NaN scale would make every log-probability NaN; ``True`` is not a temperature)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import mstfx

BAD = [math.nan, math.inf, -math.inf, 0, 0.0, -1.5, True, False, "2", None]


def _inputs():
    torch.manual_seed(0)
    return torch.randn(2, 5, 8), torch.nn.Linear(8, 11), torch.randint(0, 11, (2, 5))


@pytest.mark.parametrize("name", ["temperature", "logit_scale", "softcap"])
@pytest.mark.parametrize("bad", [b for b in BAD if b is not None], ids=repr)
def test_bad_transform_values_are_refused(name, bad):
    h, lin, labels = _inputs()
    with pytest.raises(ValueError, match=rf"chunked_logprobs: {name} must be a finite positive number.*{bad!r}"):
        mstfx.chunked_logprobs(h, lin, labels, **{name: bad})


@pytest.mark.parametrize("name", ["temperature", "logit_scale", "softcap"])
@pytest.mark.parametrize("good", [2, 0.5, np.float32(1.5)], ids=repr)
def test_good_transform_values_give_finite_log_probs(name, good):
    h, lin, labels = _inputs()
    out = mstfx.chunked_logprobs(h, lin, labels, **{name: good})
    assert out.shape == labels.shape and torch.isfinite(out).all() and (out <= 0).all()
