"""Schedules against their closed forms, and config errors naming the field."""
import math

import numpy as np
import pytest

from configs.base import get_base_config
from optim import build_optimizer, make_schedule


def test_constant_with_warmup():
    s = make_schedule("constant", lr=1e-3, warmup_steps=10)
    np.testing.assert_allclose([s(0), s(5), s(10), s(1000)], [0.0, 5e-4, 1e-3, 1e-3], rtol=1e-6)


def test_cosine():
    lr, w, t, r = 2e-3, 10, 110, 0.1
    s = make_schedule("cosine", lr=lr, total_steps=t, warmup_steps=w, min_lr_ratio=r)
    for step in (0, 3, 10, 37, 60, 109, 110, 200):
        if step < w:
            want = lr * step / w
        else:
            frac = min(step - w, t - w) / (t - w)
            want = lr * (r + (1 - r) * 0.5 * (1 + math.cos(math.pi * frac)))
        np.testing.assert_allclose(s(step), want, rtol=1e-5, err_msg=f"{step=}")


def test_warmup_stable_decay():
    lr, w, t, f, r = 1e-3, 10, 100, 0.2, 0.0
    s = make_schedule("wsd", lr=lr, total_steps=t, warmup_steps=w, decay_fraction=f, min_lr_ratio=r)
    for step in (0, 5, 10, 50, 80, 90, 99, 100, 150):
        if step < w:
            want = lr * step / w
        elif step < 80:
            want = lr
        else:
            want = lr * max(0.0, 1 - (step - 80) / 20)
        np.testing.assert_allclose(s(step), want, atol=1e-9, err_msg=f"{step=}")


def _cfg(**kw):
    c = get_base_config().optim
    c.update(kw)
    return c


@pytest.mark.parametrize("kw,field", [
    (dict(name="sgd"), "optim.name"),
    (dict(schedule="linear"), "optim.schedule"),
    (dict(lr=-1e-3), "optim.lr"),
    (dict(weight_decay=-0.1), "optim.weight_decay"),
    (dict(b2=1.0), "optim.b2"),
    (dict(muon_momentum=1.5), "optim.muon_momentum"),
    (dict(grad_clip=-1.0), "optim.grad_clip"),
    (dict(warmup_steps=-1), "optim.warmup_steps"),
    (dict(min_lr_ratio=2.0), "optim.min_lr_ratio"),
    (dict(schedule="wsd", decay_fraction=0.0), "optim.decay_fraction"),
    (dict(qk_clip_tau=0.0), "optim.qk_clip_tau"),
])
def test_bad_config_names_the_field(kw, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        build_optimizer(_cfg(**kw), total_steps=100)


def test_schedule_needs_total_steps():
    with pytest.raises(ValueError, match="total_steps"):
        build_optimizer(_cfg(schedule="cosine"))
    with pytest.raises(ValueError, match="total_steps"):
        build_optimizer(_cfg(schedule="wsd", warmup_steps=50), total_steps=40)
