"""The training step, on the worker's Trainer directly (no Ray): gradient clipping at the
configured norm, and a non-finite loss stopping training before any update. (The lr schedule
has its own tests in test_recipe_schedule.py.)"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from compresszoo.config import smoke
from compresszoo.train import Trainer


def photos() -> torch.Tensor:
    from skimage import data

    crops = [data.astronaut()[:64, :64], data.coffee()[100:164, 200:264]]
    return torch.stack([torch.from_numpy(np.ascontiguousarray(c)).permute(2, 0, 1).float() / 255 for c in crops])


def trainer(**overrides) -> Trainer:
    # data is never read: validation batches are given directly, training batches passed in
    cfg = smoke(architecture="bmshj2018-hyperprior", data="unused", **overrides).resolved()
    return Trainer(cfg, rank=0, world=1, device=torch.device("cpu"), run_id=None)


def test_gradients_are_clipped_to_the_configured_norm():
    x = photos()

    def grad_norm(t: Trainer) -> float:
        grads = [p.grad for p in t.model.main_parameters() if p.grad is not None]
        return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).item()

    free = trainer(clip_max_norm=1e9)
    free.train_step(free.model, x)
    unclipped = grad_norm(free)
    assert unclipped > 1.0  # so that a clip at 0.05 (or at the default 1.0) acts
    for norm in (0.05, 0.5):
        t = trainer(clip_max_norm=norm)
        t.train_step(t.model, x)
        assert grad_norm(t) == pytest.approx(norm, rel=1e-4), norm  # clip_grad_norm_ adds 1e-6 to the norm
    # the clipped gradient is the unclipped one, scaled: the step direction does not change
    t = trainer(clip_max_norm=0.05)
    t.train_step(t.model, x)
    a = torch.cat([p.grad.flatten() for p in free.model.main_parameters()])
    b = torch.cat([p.grad.flatten() for p in t.model.main_parameters()])
    assert torch.allclose(b, a * (0.05 / unclipped), rtol=1e-3, atol=1e-9)


def test_a_non_finite_loss_stops_training_before_any_update():
    t = trainer()
    before = {k: v.clone() for k, v in t.model.state_dict().items()}
    x = photos()
    x[0, 0, 0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match=rf"^{t.cfg.run_name()}: the loss became nan at step 1; "
                                                 r"lower lr \(now 0\.002\) or check the data"):
        t.train_step(t.model, x)
    after = t.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "the optimizer stepped on a nan loss"
