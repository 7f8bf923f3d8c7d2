"""The variance-aware sigmoid loss: its tiled kernel, what sigma does to a score, and its bias init.

Its formula (dense and tiled, both ``normalize`` settings) is checked against a reference in test_parity.py.
"""

import torch
import torch.nn.functional as F

import probloss
from probloss.losses.sigmoid_var import pair_logits, var_softplus_pair_sum


def test_tiled_kernel_gradcheck_with_rectangular_blocks(loss_inputs):
    x, y, lx, ly = loss_inputs(5, 3, "sample", pairs="independent", requires_grad=True)
    t = torch.tensor(1.7, dtype=torch.float64, requires_grad=True)
    b = torch.tensor(-0.4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: var_softplus_pair_sum(*a, block=2), (x, y[:3], lx, ly[:3], t, b))


def test_larger_sigma_flattens_the_pair_score(loss_inputs):
    x, y, lx, ly = loss_inputs(7, 4, "sample", pairs="independent")
    loss = probloss.build_loss("sigmoid_var").double()
    sharp = loss.score(x, y, torch.full_like(lx, -1.0), torch.full_like(ly, -1.0))
    flat = loss.score(x, y, torch.full_like(lx, 1.0), torch.full_like(ly, 1.0))
    assert flat.std() < sharp.std()


def test_default_bias_starts_at_siglips_logits_for_unit_sigma():
    """With sigma = 1 and t = 10, the default b makes every first logit SigLIP's 10 * cos - 10."""
    loss = probloss.build_loss("sigmoid_var").double()
    gen = torch.Generator().manual_seed(0)
    x = F.normalize(torch.randn(5, 8, generator=gen, dtype=torch.float64), dim=-1)
    y = F.normalize(torch.randn(7, 8, generator=gen, dtype=torch.float64), dim=-1)
    logits = pair_logits(x, y, torch.zeros(5, dtype=torch.float64), torch.zeros(7, dtype=torch.float64),
                         loss.logit_scale.exp(), loss.logit_bias)
    torch.testing.assert_close(logits, 10.0 * x @ y.T - 10.0, rtol=0, atol=1e-6)  # bias stored in float32
