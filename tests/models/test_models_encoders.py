"""Encoders: every registered tower, the dual encoder and its log-std heads, the model configs."""

import inspect
from pathlib import Path

import pytest
import torch
import yaml

import probloss
from probloss import ENCODERS
from probloss.data.shapes import caption_words
from probloss.models import DualEncoder, Embeddings, build_dual_encoder, build_tokenizer
from probloss.models.settings import ModelSettings
from probloss.schema import defaults
from probloss.models.dual import DATA_KWARGS

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "model"
B, S, L, V = 4, 32, 16, 40


def _input(tower: torch.nn.Module) -> torch.Tensor:
    if tower.modality == "image":
        return torch.randn(B, 3, S, S)
    tokens = torch.randint(3, V, (B, L))
    for i, n in enumerate([L, 5, 2, 9]):  # varied lengths, EOS last, then padding
        tokens[i, n - 1], tokens[i, n:] = 1, 0
    return tokens


def _kwargs(cls) -> dict:
    return {"image_size": S} if cls.modality == "image" else {"vocab_size": V, "max_len": L}


# Towers by name (timm:<name>, hf:<name>) are built from a named model: tests/models/test_towers.py.
BUILT_IN = [n for n in ENCODERS.list() if not getattr(ENCODERS.get(n), "takes_name", False)]


@pytest.mark.parametrize("name", BUILT_IN)
def test_tower_shapes_and_gradients_reach_every_parameter(name):
    torch.manual_seed(0)
    cls = ENCODERS.get(name)
    assert cls.modality in ("image", "text")
    tower = cls(**_kwargs(cls))
    out = tower(_input(tower))
    assert out.shape == (B, tower.width) and torch.isfinite(out).all()
    # A random projection: sum(out ** 2) would have zero gradient through a final LayerNorm.
    (out * torch.randn_like(out)).sum().backward()
    for pname, p in tower.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"{name}: no gradient reaches {pname}"


@pytest.mark.parametrize("name", ENCODERS.list())
def test_tower_declares_exactly_its_constructor_keywords(name):
    """The tower contract of probloss/models/dual.py: data keywords plus config_keys are the constructor's keywords."""
    cls = ENCODERS.get(name)
    keywords = list(inspect.signature(cls).parameters)
    by_name = ("name", "allow_download") if getattr(cls, "takes_name", False) else ()
    assert sorted(keywords) == sorted(DATA_KWARGS[cls.modality] + cls.config_keys + by_name), (keywords, cls.config_keys)


def test_an_encoder_without_the_contract_is_a_clear_error():
    @ENCODERS.register("no_contract")  # tests/conftest.py removes it after this test
    class NoContract(torch.nn.Module):
        modality = "image"

    with pytest.raises(TypeError, match="'no_contract' .* must be a class declaring `modality`.* and `config_keys`"):
        build_dual_encoder({"image_tower": "no_contract"}, vocab_size=V, max_len=L, image_size=S, log_std=False)


@pytest.mark.parametrize("name", [n for n in BUILT_IN if ENCODERS.get(n).modality == "text"])
def test_text_towers_ignore_padding(name):
    cls = ENCODERS.get(name)
    torch.manual_seed(0)
    tower = cls(**_kwargs(cls)).eval()
    short = torch.tensor([[5, 6, 7, 1] + [0] * (L - 4)])
    longer = torch.tensor([[5, 6, 7, 1, 8, 9, 1] + [0] * (L - 7)])
    a = tower(torch.cat([short, longer]))
    torch.testing.assert_close(a[:1], tower(short[:, :6]))  # trailing padding changes nothing
    assert not torch.allclose(a[0], a[1])


@pytest.mark.parametrize("name,kwargs", [("vit", {"pool": "mean", "patch_size": 4}), ("transformer", {"pool": "mean"}),
                                         ("resnet", {"blocks": (2, 1), "stem_stride": 2})])
def test_tower_options(name, kwargs):
    cls = ENCODERS.get(name)
    tower = cls(**_kwargs(cls), **kwargs)
    assert tower(_input(tower)).shape == (B, tower.width)


def _cfg(name: str) -> dict:
    """configs/model/<name>.yaml as Hydra composes it: the node of ModelSettings' defaults, then the file's keys
    (without its defaults list)."""
    own = {k: v for k, v in yaml.safe_load((CONFIGS / f"{name}.yaml").read_text()).items() if k != "defaults"}
    return {**defaults(ModelSettings), **own}


@pytest.mark.parametrize("config", ["tiny", "cnn_cbow"])
@pytest.mark.parametrize("per_dim", [False, True])
def test_dual_encoder_log_std_heads(config, per_dim):
    torch.manual_seed(0)
    cfg = dict(_cfg(config), log_std_per_dim=per_dim, init_log_std=-1.5)
    tok = build_tokenizer("word", vocab=caption_words(), max_len=L)
    model = build_dual_encoder(cfg, vocab_size=tok.vocab_size, max_len=L, image_size=S, log_std=True)
    emb = model(torch.randn(B, 3, S, S), tok(["a red circle", "two objects", "a blue square left of a red circle",
                                               "an object"]))
    d = cfg["embed_dim"]
    assert isinstance(emb, Embeddings)
    assert emb.image_emb.shape == emb.text_emb.shape == (B, d)
    want = (B, d) if per_dim else (B,)
    assert emb.image_log_std.shape == emb.text_log_std.shape == want
    for ls in (emb.image_log_std, emb.text_log_std):  # small head weights: every sample starts at init_log_std
        assert (ls + 1.5).abs().max() < 0.05
    assert model.encode_image(torch.randn(2, 3, S, S))[1].shape == ((2, d) if per_dim else (2,))
    sum(((t * torch.randn_like(t)).sum() for t in emb.loss_args())).backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, pname


def test_dual_encoder_without_log_std():
    tok = build_tokenizer("byte", max_len=24)
    model = build_dual_encoder(_cfg("tiny"), vocab_size=tok.vocab_size, max_len=24, image_size=S, log_std=False)
    emb = model(torch.randn(3, 3, S, S), tok(["any text", "ünïcode ✓", ""]))
    assert emb.image_log_std is None and emb.text_log_std is None
    assert model.encode_text(tok(["x"]))[1] is None
    assert emb.loss_args() == (emb.image_emb, emb.text_emb, None, None)


@pytest.mark.parametrize("loss_name", probloss.list_losses())
def test_one_training_step_with_every_registered_loss(loss_name):
    torch.manual_seed(0)
    loss = probloss.build_loss(loss_name)
    tok = build_tokenizer("word", vocab=caption_words(), max_len=L)
    model = build_dual_encoder(_cfg("tiny"), vocab_size=tok.vocab_size, max_len=L, image_size=S,
                               log_std=loss.needs_log_std)
    value = loss(*model(torch.randn(8, 3, S, S), tok(["a red circle"] * 4 + ["a blue square"] * 4)).loss_args())
    assert value.ndim == 0 and torch.isfinite(value)
    value.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_base_config_builds():
    with torch.device("meta"):  # shapes only: no memory, no time
        model = build_dual_encoder(_cfg("base"), vocab_size=259, max_len=64, image_size=224, log_std=True)
    assert 80e6 < sum(p.numel() for p in model.parameters()) < 200e6


def test_config_files_start_with_a_run_command():
    for path in CONFIGS.glob("*.yaml"):
        assert path.read_text().startswith("# python scripts/train.py"), path


def test_bad_configs_fail_loudly():
    kw = dict(vocab_size=V, max_len=L, image_size=S, log_std=False)
    with pytest.raises(ValueError, match="image_widht"):
        build_dual_encoder(dict(_cfg("tiny"), image_widht=32), **kw)
    with pytest.raises(ValueError, match="unknown model keys"):
        build_dual_encoder(dict(_cfg("tiny"), dropout=0.1), **kw)
    with pytest.raises(KeyError, match="Registered"):
        build_dual_encoder(dict(_cfg("tiny"), image_tower="vitt"), **kw)
    with pytest.raises(ValueError, match="cannot be the image tower"):
        build_dual_encoder(dict(_cfg("tiny"), image_tower="cbow"), **kw)
    with pytest.raises(ValueError, match="image_size comes from the data"):
        build_dual_encoder(dict(_cfg("tiny"), image_image_size=64), **kw)
    assert isinstance(build_dual_encoder({"image_tower": "resnet", "text_tower": "cbow"}, **kw), DualEncoder)
