"""False negatives as a training option (``false_negatives=keep|mask|positive``, probloss/false_negatives.py).

Every built-in loss is compared, forward and backward in float64, with a plain dense reference written here from
the formulas in the loss docstrings (not from the losses' code), on seeded inputs with deliberate duplicate
caption and scene groups, dense and tiled, with and without extra texts. Registry-parametrised contract tests
(``keep`` ignores groups bit for bit, all-distinct groups change nothing, a duplicated caption is as if absent)
cover every registered loss, new ones included.
"""

import inspect
import math

import pytest
import torch
import torch.nn.functional as F

import probloss
from probloss.false_negatives import caption_groups, false_negative_pairs, group_keys, key_match, scene_groups
from probloss.testing import loss_and_grads, loss_class

MODES = ("keep", "mask", "positive")
N, D, EXTRA = 6, 5, 3


# --- the references ------------------------------------------------------------------------------------------


def fn_matrix(text_groups, image_groups, n):
    """(N, M) bool: pair (image i, text j) is a false negative (the loss contract), written out in loops."""
    m = text_groups.shape[0]
    out = torch.zeros(n, m, dtype=torch.bool)
    for i in range(n):
        for j in range(m):
            same_caption = text_groups[j] == text_groups[i]
            same_scene = image_groups is not None and j < n and image_groups[j] == image_groups[i]
            out[i, j] = j != i and bool(same_caption or same_scene)
    return out


def softmax_ce(logits, fn, mode):
    """Per-row CE of (R, C) logits, positive on the diagonal, false negatives ``fn`` (R, C), in loops."""
    terms = []
    for i in range(logits.shape[0]):
        row, others = logits[i], fn[i]
        if mode == "mask":
            keep = ~others
            terms.append(torch.logsumexp(row[keep], 0) - row[i])
        elif mode == "positive":
            positives = others.clone()
            positives[i] = True
            terms.append(torch.logsumexp(row, 0) - row[positives].mean())
        else:
            terms.append(torch.logsumexp(row, 0) - row[i])
    return torch.stack(terms).mean()


def pair_labels(fn, n, mode):
    """(N, M) labels z (1 positive, 0 negative) and the pairs that count, for pairwise losses."""
    z = torch.zeros(fn.shape, dtype=torch.float64)
    z[range(n), range(n)] = 1.0
    counts = torch.ones(fn.shape, dtype=torch.bool)
    if mode == "positive":
        z[fn] = 1.0
    elif mode == "mask":
        counts = ~fn
    return z, counts


def bce(logits, z):
    return F.softplus(logits) - z * logits


def ref_infonce(loss, x, y, lx, ly, fn, mode):
    n = x.shape[0]
    logits = loss.logit_scale_in_use().exp() * F.normalize(x, dim=-1) @ F.normalize(y, dim=-1).T
    return (softmax_ce(logits, fn, mode) + softmax_ce(logits[:, :n].T, fn[:, :n].T, mode)) / 2


def ref_gaussian_var(loss, x, y, lx, ly, fn, mode):
    """The proposal's logits with per-sample or diagonal log-stds (losses/gaussian_var.py docstring)."""
    n = x.shape[0]
    diff = x[:, None, :] - y[None, :, :]  # (N, M, D)
    if ly.dim() == 1:
        i2t = -ly[None, :] - diff.pow(2).sum(-1) * torch.exp(-2 * ly)[None, :]
        t2i = -lx[:, None] - diff[:, :n].pow(2).sum(-1) * torch.exp(-2 * lx)[:, None]
    else:
        i2t = -ly.mean(-1)[None, :] - (diff.pow(2) * torch.exp(-2 * ly)[None]).sum(-1)
        t2i = -lx.mean(-1)[:, None] - (diff[:, :n].pow(2) * torch.exp(-2 * lx)[:, None]).sum(-1)
    return (softmax_ce(i2t, fn, mode) + softmax_ce(t2i.T, fn[:, :n].T, mode)) / 2


def ref_pairwise(logits, fn, n, mode):
    z, counts = pair_labels(fn, n, mode)
    return (bce(logits, z) * counts).sum() / n


def ref_sigmoid(loss, x, y, lx, ly, fn, mode):
    logits = loss.logit_scale.exp() * F.normalize(x, dim=-1) @ F.normalize(y, dim=-1).T + loss.logit_bias
    return ref_pairwise(logits, fn, x.shape[0], mode)


def ref_sigmoid_var(loss, x, y, lx, ly, fn, mode):
    xs, ys = F.normalize(x, dim=-1), F.normalize(y, dim=-1)
    d = (xs[:, None, :] - ys[None, :, :]).pow(2).sum(-1)
    v = torch.exp(2 * lx)[:, None] + torch.exp(2 * ly)[None, :]
    logits = loss.logit_scale.exp() * (-0.5 * torch.log(v) - d / v) + loss.logit_bias
    return ref_pairwise(logits, fn, x.shape[0], mode)


def sigma_sq(log_std, dims):
    return dims * torch.exp(2 * log_std) if log_std.dim() == 1 else torch.exp(2 * log_std).sum(-1)


def ref_prolip(loss, x, y, lx, ly, fn, mode):
    """PPCL only (the test builds prolip with vib_beta = inclusion_alpha = 0)."""
    xs, ys, t = F.normalize(x, dim=-1), F.normalize(y, dim=-1), loss.logit_scale.exp()
    logits = t * (xs @ ys.T - (sigma_sq(lx, D)[:, None] + sigma_sq(ly, D)[None, :]) / 2) + loss.logit_bias
    return ref_pairwise(logits, fn, x.shape[0], mode)


def ref_pcmepp(loss, x, y, lx, ly, fn, mode):
    """Matching + pseudo-positive BCEs over N x M pairs divided by N x N (vib_beta = 0 in the test)."""
    n, m, alpha = x.shape[0], y.shape[0], loss.smoothness_alpha
    xs, ys = F.normalize(x, dim=-1), F.normalize(y, dim=-1)
    csd = (xs[:, None, :] - ys[None, :, :]).pow(2).sum(-1) + sigma_sq(lx, D)[:, None] + sigma_sq(ly, D)[None, :]
    logits = -loss.negative_scale * csd + loss.shift
    z, counts = pair_labels(fn, n, mode)
    with torch.no_grad():
        diag = logits.diagonal()
        threshold = diag - math.sqrt(torch.finfo(torch.float64).eps) * (1 + diag.abs())
        row_pp = ((logits >= threshold[:, None]) | (z > 0)).double()
        col_threshold = torch.cat([threshold, torch.full((m - n,), float("inf"), dtype=torch.float64)])
        col_pp = ((logits >= col_threshold[None, :]) | (z > 0)).double()
    terms = 2 * bce(logits, z) + alpha * (bce(logits, row_pp) + bce(logits, col_pp))
    return (terms * counts).sum() / (n * n)


REFERENCES = {"infonce": ref_infonce, "gaussian_var": ref_gaussian_var, "sigmoid": ref_sigmoid,
              "sigmoid_var": ref_sigmoid_var, "prolip": ref_prolip, "pcmepp": ref_pcmepp}
# Terms that do not involve pairs are switched off so the reference can stay about pairs.
PAIR_ONLY = {"prolip": {"vib_beta": 0.0, "inclusion_alpha": 0.0}, "pcmepp": {"vib_beta": 0.0}}


def inputs(extra, log_std, seed=0):
    """Seeded float64 inputs with duplicate captions (in-batch, and an extra text repeating image 0's caption)
    and one repeated scene; texts near their images so positives score high."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D, generator=gen, dtype=torch.float64)
    y = torch.cat([x + 0.5 * torch.randn(N, D, generator=gen, dtype=torch.float64),
                   torch.randn(extra, D, generator=gen, dtype=torch.float64)])
    shape = {None: None, "sample": (), "diagonal": (D,)}[log_std]
    lx = ly = None
    if shape is not None:
        lx = 0.3 * torch.randn(N, *shape, generator=gen, dtype=torch.float64)
        ly = 0.3 * torch.randn(N + extra, *shape, generator=gen, dtype=torch.float64)
    text_groups = torch.tensor([7, 3, 7, 9, 3, 4] + [7, 11, 9][:extra])
    image_groups = torch.tensor([20, 21, 22, 23, 24, 20])  # images 0 and 5: one scene, different captions
    return (x, y, lx, ly), text_groups, image_groups


def small_sigma(name, lx, ly):
    """prolip's and pcmepp's log-stds 3 lower: their sigma starts small (init_log_std -5); at sigma ~ 1 every
    logit is ~ -50 and negatives weigh nothing, so a test about negatives would test nothing."""
    if lx is None or name not in ("prolip", "pcmepp"):
        return lx, ly
    return lx - 3, ly - 3


def shapes_of(name):
    cls = loss_class(name)
    return [None] if not cls.needs_log_std else ["sample", "diagonal"] if cls.supports_diagonal_log_std else ["sample"]


CASES = [(name, log_std) for name in REFERENCES for log_std in shapes_of(name)]


@pytest.mark.parametrize("scenes", [False, True], ids=["captions", "captions+scenes"])
@pytest.mark.parametrize("extra", [0, EXTRA], ids=["paired", "extras"])
@pytest.mark.parametrize("impl", ["dense", "tiled"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name,log_std", CASES)
def test_matches_the_dense_reference_forward_and_backward(name, log_std, mode, impl, extra, scenes):
    torch.manual_seed(0)
    loss = probloss.build_loss(name, impl=impl, block_size=2, false_negatives=mode, **PAIR_ONLY.get(name, {}))
    loss = loss.double()
    (x, y, lx, ly), text_groups, image_groups = inputs(extra, log_std)
    lx, ly = small_sigma(name, lx, ly)
    image_groups = image_groups if scenes else None
    value, grads, params = loss_and_grads(loss, x, y, lx, ly, groups=(text_groups, image_groups))

    leaves = [t.clone().requires_grad_(True) if t is not None else None for t in (x, y, lx, ly)]
    fn = fn_matrix(text_groups, image_groups, N) if mode != "keep" else torch.zeros(N, N + extra, dtype=torch.bool)
    want = REFERENCES[name](loss, *leaves, fn, mode)
    want.backward()
    torch.testing.assert_close(value, want.detach(), rtol=1e-10, atol=1e-12)
    for key, leaf in zip(("image_emb", "text_emb", "image_log_std", "text_log_std"), leaves):
        if leaf is not None:
            torch.testing.assert_close(grads[key], leaf.grad, rtol=1e-9, atol=1e-11, msg=f"grad {key}")
    for key, grad in params.items():
        torch.testing.assert_close(grad, dict(loss.named_parameters())[key].grad, rtol=1e-9, atol=1e-11,
                                   msg=f"grad {key}")


def test_the_inputs_hold_false_negatives_that_change_every_loss():
    """The reference test is only worth something if mask and positive differ from keep on its inputs."""
    (x, y, lx, ly), text_groups, image_groups = inputs(EXTRA, None)
    assert fn_matrix(text_groups, image_groups, N).sum() >= 6
    for name in REFERENCES:
        log_std = shapes_of(name)[0]
        (x, y, lx, ly), _, _ = inputs(EXTRA, log_std)
        lx, ly = small_sigma(name, lx, ly)
        values = {}
        for mode in MODES:
            torch.manual_seed(0)
            loss = probloss.build_loss(name, false_negatives=mode).double()
            values[mode] = loss(x, y, lx, ly, text_groups=text_groups, image_groups=image_groups).item()
        assert len({round(v, 9) for v in values.values()}) == 3, (name, values)


# --- registry-parametrised contract ---------------------------------------------------------------------------


def build(name, mode, **overrides):
    torch.manual_seed(0)
    params = inspect.signature(loss_class(name)).parameters
    kwargs = {k: v for k, v in {"false_negatives": mode, **overrides}.items() if k in params}
    return probloss.build_loss(name, **kwargs).double()


def supports(name):
    return "false_negatives" in inspect.signature(loss_class(name)).parameters


ALL = probloss.list_losses()


@pytest.mark.parametrize("name", ALL)
def test_every_built_in_loss_has_the_option_and_rejects_bad_values(name):
    if not supports(name):
        pytest.skip(f"{name} has no false_negatives option")
    with pytest.raises(ValueError, match=r"false_negatives='drop' is not one of keep, mask, positive"):
        probloss.build_loss(name, false_negatives="drop")


@pytest.mark.parametrize("impl", ["dense", "tiled"])
@pytest.mark.parametrize("name", ALL)
def test_keep_with_groups_is_bit_identical_to_no_groups(name, impl):
    (x, y, lx, ly), text_groups, image_groups = inputs(EXTRA, shapes_of(name)[0])
    loss = build(name, "keep", impl=impl, block_size=2)
    plain = loss_and_grads(loss, x, y, lx, ly)
    grouped = loss_and_grads(loss, x, y, lx, ly, groups=(text_groups, image_groups))
    assert torch.equal(plain[0], grouped[0])
    for a, b in zip((plain[1], plain[2]), (grouped[1], grouped[2])):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("mode", ["mask", "positive"])
@pytest.mark.parametrize("impl", ["dense", "tiled"])
@pytest.mark.parametrize("name", ALL)
def test_all_distinct_groups_equal_keep(name, impl, mode):
    if not supports(name):
        pytest.skip(f"{name} has no false_negatives option")
    (x, y, lx, ly), _, _ = inputs(EXTRA, shapes_of(name)[0])
    distinct = torch.arange(N + EXTRA) * 7 - 20  # negative ids too: any int64 is an id
    keep = loss_and_grads(build(name, "keep", impl=impl, block_size=2), x, y, lx, ly)
    other = loss_and_grads(build(name, mode, impl=impl, block_size=2), x, y, lx, ly,
                           groups=(distinct, torch.arange(N) + 5))
    torch.testing.assert_close(other[0], keep[0], rtol=1e-12, atol=1e-14)
    for a, b in zip((keep[1], keep[2]), (other[1], other[2])):
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=1e-10, atol=1e-13, msg=k)


@pytest.mark.parametrize("impl", ["dense", "tiled"])
@pytest.mark.parametrize("name", ALL)
def test_mask_makes_a_duplicated_caption_as_if_absent(name, impl):
    """Two pairs with one caption (identical text embedding and group), different images: with ``mask`` each
    image's term is its term in a batch of its own pair alone, so the loss is the mean of the one-pair losses
    (sum of them over N x N = 4 for pcmepp, which divides by the squared batch). ``keep`` differs."""
    if not supports(name):
        pytest.skip(f"{name} has no false_negatives option")
    zero = {"vib_beta": 0.0, "inclusion_alpha": 0.0, "kl_weight": 0.0}
    (x, y, lx, ly), _, _ = inputs(0, shapes_of(name)[0])
    x, y = x[:2], torch.stack([y[0], y[0]])
    lx, ly = (None, None) if lx is None else small_sigma(name, lx[:2], torch.stack([ly[0], ly[0]]))
    groups = torch.tensor([5, 5])
    loss = build(name, "mask", impl=impl, block_size=1, **zero)

    def alone(i):
        return loss(x[i:i + 1], y[i:i + 1], *(None if t is None else t[i:i + 1] for t in (lx, ly)))

    together = loss(x, y, lx, ly, text_groups=groups)
    divisor = 4 if name == "pcmepp" else 2
    torch.testing.assert_close(together, (alone(0) + alone(1)) / divisor, rtol=1e-10, atol=1e-12)
    kept = build(name, "keep", impl=impl, block_size=1, **zero)(x, y, lx, ly, text_groups=groups)
    assert not torch.isclose(kept, together, rtol=1e-6)


@pytest.mark.parametrize("name", ALL)
def test_a_batch_of_one_caption_is_finite_in_every_mode(name):
    """Every pair a false negative (all captions identical): every row of the tiled kernel fully masked."""
    if not supports(name):
        pytest.skip(f"{name} has no false_negatives option")
    (x, y, lx, ly), _, _ = inputs(0, shapes_of(name)[0])
    for mode in ("mask", "positive"):
        for impl in ("dense", "tiled"):
            value, grads, _ = loss_and_grads(build(name, mode, impl=impl, block_size=2), x, y, lx, ly,
                                             groups=(torch.zeros(N, dtype=torch.long), None))
            assert torch.isfinite(value) and all(torch.isfinite(g).all() for g in grads.values()), (mode, impl)


def test_bad_groups_name_the_tensor():
    (x, y, _, _), text_groups, image_groups = inputs(0, None)
    loss = probloss.build_loss("infonce", false_negatives="mask").double()
    with pytest.raises(ValueError, match=r"text_groups must be a \(6,\) integer tensor"):
        loss(x, y, text_groups=text_groups[:4])
    with pytest.raises(ValueError, match=r"text_groups must be a \(6,\) integer tensor"):
        loss(x, y, text_groups=text_groups.double())
    with pytest.raises(ValueError, match=r"image_groups needs text_groups"):
        loss(x, y, image_groups=image_groups)


# --- helpers --------------------------------------------------------------------------------------------------


def test_false_negative_pairs_match_the_loop_definition_in_blocks():
    text_groups = torch.tensor([1, 2, 1, 3, 2, 1, 9, 1])
    image_groups = torch.tensor([5, 6, 7, 5, 8])
    image_keys, text_keys = group_keys(text_groups, image_groups, 5)
    want = fn_matrix(text_groups, image_groups, 5)
    r, c = false_negative_pairs(image_keys, text_keys, torch.arange(5))
    got = torch.zeros_like(want)
    got[r, c] = True
    assert torch.equal(got, want) and r.numel() == int(want.sum())  # each pair once
    match = key_match(image_keys, text_keys)
    match[range(5), range(5)] = False
    assert torch.equal(match, want)
    assert torch.equal(key_match(text_keys, image_keys), key_match(image_keys, text_keys).T)
    big = torch.randint(-5, 5, (300,))  # no positive columns: every matching pair, as the dense match says
    r, c = false_negative_pairs(big[:200, None], big[:, None])
    got = torch.zeros(200, 300, dtype=torch.bool)
    got[r, c] = True
    assert torch.equal(got, key_match(big[:200, None], big[:, None])) and r.numel() == int(got.sum())


def test_caption_groups_equal_rows_equal_ids_and_distinct_rows_distinct_ids():
    tokens = torch.tensor([[5, 9, 2, 0], [5, 9, 2, 0], [5, 9, 3, 0], [9, 5, 2, 0], [0, 0, 0, 0]])
    ids = caption_groups(tokens)
    assert ids.dtype == torch.int64 and ids[0] == ids[1]
    assert len(set(ids[1:].tolist())) == 4  # order matters, one token matters
    assert torch.equal(caption_groups(tokens), ids)  # deterministic (every rank, every run)
    many = torch.randint(1, 2000, (4096, 12), generator=torch.Generator().manual_seed(0))
    assert len(set(caption_groups(many).tolist())) == len({tuple(r) for r in many.tolist()})


def test_scene_groups_from_the_shapes_json_or_none():
    metas = [{"seed": 0, "index": 3}, {"seed": 0, "index": 4}, {"seed": 0, "index": 3}, {"seed": 1, "index": 3}]
    ids = scene_groups(metas)
    assert ids[0] == ids[2] and len(set(ids.tolist())) == 3
    assert scene_groups([{"seed": 0, "index": 1}, {}]) is None and scene_groups(None) is None


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("neg_mask", ["hard", "easy", "random"])
def test_sigmoid_negative_masking_keeping_every_negative_equals_the_plain_loss(neg_mask, mode):
    """sigmoid's neg_mask path (its own dense code) with neg_keep_ratio = 1 keeps every negative: with false
    negatives left out (mask) or made positives, it must equal the chunked loss with the same option."""
    (x, y, _, _), text_groups, image_groups = inputs(EXTRA, None)
    groups = (text_groups, image_groups)
    plain = loss_and_grads(build("sigmoid", mode), x, y, None, None, groups=groups)
    masked = loss_and_grads(build("sigmoid", mode, neg_mask=neg_mask, neg_keep_ratio=1.0), x, y, None, None,
                            groups=groups)
    torch.testing.assert_close(masked[0], plain[0], rtol=1e-12, atol=1e-14)
    for a, b in zip((plain[1], plain[2]), (masked[1], masked[2])):
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=1e-10, atol=1e-13, msg=k)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("impl", ["dense", "tiled"])
@pytest.mark.parametrize("mode", ["mask", "positive"])
@pytest.mark.parametrize("name", list(REFERENCES))
def test_cuda_matches_cpu(name, mode, impl):
    """The same float64 values and gradients on a GPU (group ids on the device, hashing and sort joins there)."""
    (x, y, lx, ly), text_groups, image_groups = inputs(EXTRA, shapes_of(name)[0])
    lx, ly = small_sigma(name, lx, ly)
    groups = (text_groups, image_groups)
    want = loss_and_grads(build(name, mode, impl=impl, block_size=2), x, y, lx, ly, groups=groups)
    cuda = [None if t is None else t.cuda() for t in (x, y, lx, ly)]
    got = loss_and_grads(build(name, mode, impl=impl, block_size=2).cuda(), *cuda,
                         groups=tuple(g.cuda() for g in groups))
    torch.testing.assert_close(got[0].cpu(), want[0], rtol=1e-10, atol=1e-12)
    for a, b in zip((want[1], want[2]), (got[1], got[2])):
        for k in a:
            torch.testing.assert_close(b[k].cpu(), a[k], rtol=1e-9, atol=1e-11, msg=k)
    tokens = torch.randint(1, 50, (64, 9), generator=torch.Generator().manual_seed(0))
    assert torch.equal(caption_groups(tokens.cuda()).cpu(), caption_groups(tokens))


@pytest.mark.parametrize("extra", [0, EXTRA], ids=["paired", "extras"])
@pytest.mark.parametrize("impl", ["dense", "tiled"])
@pytest.mark.parametrize("mode", ["mask", "positive"])
def test_infonce_global_matrix_path_equals_the_reference_checked_one(mode, impl, extra):
    """``local_loss=False`` (one (W N, W M) matrix, its own code) gives what ``local_loss=True`` gives in one
    process, which the reference test checks; the distributed check then compares each path with itself."""
    (x, y, _, _), text_groups, image_groups = inputs(extra, None)
    groups = (text_groups, image_groups)
    local = loss_and_grads(build("infonce", mode, impl=impl, block_size=2), x, y, None, None, groups=groups)
    whole = loss_and_grads(build("infonce", mode, impl=impl, block_size=2, local_loss=False), x, y, None, None,
                           groups=groups)
    torch.testing.assert_close(whole[0], local[0], rtol=1e-12, atol=1e-14)
    for a, b in zip((local[1], local[2]), (whole[1], whole[2])):
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=1e-10, atol=1e-13, msg=k)
