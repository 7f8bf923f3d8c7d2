"""The dual encoder: an image tower and a text tower, a linear projection of each to the joint space, and
optional log-std heads (one log standard deviation per sample, or per dimension) for variance-aware losses.

A tower is a class registered in ``probloss.ENCODERS`` that declares, as class attributes:

- ``modality``: ``"image"`` or ``"text"``;
- ``config_keys``: the constructor keywords a model config may set, spelled ``<modality>_<key>`` there
  (``image_patch_size``, ``text_depth``).

It is built as ``cls(**DATA_KWARGS[modality], **options)``: the keywords of :data:`DATA_KWARGS` come from the
data and the tokenizer, never from the config. An instance has ``width``, the size of its pooled feature, and
maps images ``(B, 3, H, W)`` or tokens ``(B, L)`` to ``(B, width)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from collections.abc import Sequence
from typing import Any, Mapping

import torch
from torch import nn

from probloss.models.linear import Linear
from probloss.models.settings import ModelSettings
from probloss.registry import ENCODERS

Tensor = torch.Tensor


EMBEDDING_FIELDS = ("image_emb", "text_emb", "image_log_std", "text_log_std")


@dataclass
class Embeddings:
    """What the dual encoder hands the loss: raw projections and log-stds ((B,), (B, D) or None) per modality.

    Images and texts are encoded independently, so there may be more texts than images: text rows after the
    first N_img are extra texts (hard negatives; the loss contract, probloss/loss.py).
    """

    image_emb: Tensor
    text_emb: Tensor
    image_log_std: Tensor | None = None
    text_log_std: Tensor | None = None

    def loss_args(self) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
        """``loss(*emb.loss_args())``: (image_emb, text_emb, image_log_std, text_log_std)."""
        return self.image_emb, self.text_emb, self.image_log_std, self.text_log_std

    def present_fields(self) -> list[str]:
        """The names of the tensors present (log-stds are None without log-std heads)."""
        return [f for f in EMBEDDING_FIELDS if getattr(self, f, None) is not None]

    def detach(self, texts: int | None = None) -> Embeddings:
        """A copy with every tensor detached; ``texts``: keep only the first ``texts`` text rows (the positives,
        dropping extra texts)."""
        def rows(field, t):
            return t if texts is None or not field.startswith("text") else t[:texts]

        return type(self)(**{f: rows(f, getattr(self, f).detach()) for f in self.present_fields()})


def with_negatives(tokens: Tensor, negative_tokens: Tensor | None) -> Tensor:
    """The texts to encode: ``tokens`` (B, L), then ``negative_tokens`` (B, k, L) as (B k, L), sample by sample.

    So the text embeddings are [B positives, B k extras], the loss contract's order (probloss/loss.py).
    """
    if negative_tokens is None:
        return tokens
    if negative_tokens.dim() != 3 or negative_tokens.shape[0] != tokens.shape[0] or \
            negative_tokens.shape[2] != tokens.shape[1]:
        raise ValueError(f"negative_tokens must be (B, k, L) = ({tokens.shape[0]}, k, {tokens.shape[1]}) to go with "
                         f"tokens {tuple(tokens.shape)}, got {tuple(negative_tokens.shape)}")
    return torch.cat([tokens, negative_tokens.flatten(0, 1)])


class LogStdHead(nn.Module):
    """pooled (B, W) -> log-std (B,) or (B, D). Linear, or a one-hidden-layer MLP when ``hidden > 0``.

    The last layer's weights start small and its bias at ``init_log_std``, so every sample starts with
    log-std ~ init_log_std and the loss, not the initialisation, decides which samples are uncertain.
    """

    def __init__(self, width: int, out_dim: int | None, init_log_std: float = 0.0, hidden: int = 0):
        super().__init__()
        self.per_dim = out_dim is not None
        layers: list[nn.Module] = []
        if hidden > 0:
            layers += [Linear(width, hidden), nn.GELU()]
        last = Linear(hidden if hidden > 0 else width, out_dim or 1)
        nn.init.normal_(last.weight, std=1e-3)
        nn.init.constant_(last.bias, float(init_log_std))
        self.net = nn.Sequential(*layers, last)

    def forward(self, pooled: Tensor) -> Tensor:
        out = self.net(pooled)
        return out if self.per_dim else out.squeeze(-1)


class FeatureCache:
    """The outputs of a locked (fixed) tower for its last ``size`` inputs, found by equal input (an exact,
    element-wise comparison, far cheaper than a forward pass). Inputs are copied: a loader may reuse buffers."""

    def __init__(self, size: int):
        self.size, self.entries = int(size), []

    def get(self, inputs: Tensor) -> Tensor | None:
        for key, value in self.entries:
            if key.shape == inputs.shape and key.dtype == inputs.dtype and key.device == inputs.device \
                    and torch.equal(key, inputs):
                return value
        return None

    def put(self, inputs: Tensor, value: Tensor) -> None:
        self.entries = [*self.entries, (inputs.detach().clone(), value)][-self.size:]

    def clear(self) -> None:
        self.entries = []


class DualEncoder(nn.Module):
    """Image and text towers with projections to ``embed_dim`` and optional log-std heads.

    Args:
        image_tower, text_tower: modules with attribute ``width`` returning pooled features (B, width).
        embed_dim: joint embedding size D.
        log_std: grow log-std heads (set it from ``loss.needs_log_std``).
        log_std_per_dim: heads give (B, D) instead of (B,).
        init_log_std: initial log-std of every sample.
        log_std_hidden: hidden width of the heads' MLP (0: a linear head).
    """

    def __init__(self, image_tower: nn.Module, text_tower: nn.Module, embed_dim: int = 64, *, log_std: bool = False,
                 log_std_per_dim: bool = False, init_log_std: float = 0.0, log_std_hidden: int = 0):
        super().__init__()
        self.image_tower, self.text_tower = image_tower, text_tower
        self.embed_dim = embed_dim
        self.image_proj = Linear(image_tower.width, embed_dim, bias=False)
        self.text_proj = Linear(text_tower.width, embed_dim, bias=False)
        for proj in (self.image_proj, self.text_proj):
            nn.init.normal_(proj.weight, std=proj.in_features**-0.5)
        self.image_log_std = self.text_log_std = None
        if log_std:
            out = embed_dim if log_std_per_dim else None
            self.image_log_std = LogStdHead(image_tower.width, out, init_log_std, log_std_hidden)
            self.text_log_std = LogStdHead(text_tower.width, out, init_log_std, log_std_hidden)
        self._locked_modules: list[nn.Module] = []  # modules whose every parameter is locked: always in eval mode
        self._locked_towers: set[str] = set()  # fully locked towers ("image", "text"): run under no_grad
        self._feature_caches: dict[str, FeatureCache] = {}  # their features under GradCache, by modality

    def lock(self, modality: str, unlocked_groups: int = 0, cache_size: int = 1) -> None:
        """Lock a tower (LiT, Zhai et al. 2022): no gradients, eval mode, so the optimiser and weight decay never
        see its parameters; or all but its last ``unlocked_groups`` parameter groups (``tower.param_groups()``).

        A fully locked tower runs under no_grad. With ``cache_size`` > 1 (GradCache's micro-batches per step) its
        features of the last ``cache_size`` batches are kept in training: GradCache encodes every micro-batch
        twice, and the second time the locked tower is not run again. (With one batch per step nothing could hit.)
        """
        tower = getattr(self, f"{modality}_tower")
        frozen = {name for name, _ in tower.named_parameters()}
        if unlocked_groups:
            if not hasattr(tower, "param_groups"):
                raise ValueError(f"{type(tower).__name__} has no param_groups(), so it can only be locked whole "
                                 f"(lock_{modality}_unlocked_* = 0)")
            groups = tower.param_groups()
            if not 0 < unlocked_groups < len(groups):
                raise ValueError(f"the {modality} tower has {len(groups)} parameter groups; unlock between 1 and "
                                 f"{len(groups) - 1} of them (got {unlocked_groups})")
            frozen -= {name for group in groups[-unlocked_groups:] for name in group}
        for name, param in tower.named_parameters():
            if name in frozen:
                param.requires_grad_(False)
        self._locked_modules += [m for m in tower.modules()
                                 if any(True for _ in m.parameters()) and not any(p.requires_grad for p in m.parameters())]
        if not unlocked_groups:
            self._locked_towers.add(modality)
            if cache_size > 1:
                self._feature_caches[modality] = FeatureCache(cache_size)
                tower.register_load_state_dict_post_hook(lambda *_: self._feature_caches[modality].clear())
        self.train(self.training)

    def train(self, mode: bool = True) -> "DualEncoder":
        super().train(mode)
        for module in self._locked_modules:  # no dropout, no BatchNorm statistics in what does not learn
            module.eval()
        return self

    def _pooled(self, modality: str, inputs: Tensor) -> Tensor:
        tower = getattr(self, f"{modality}_tower")
        if modality not in self._locked_towers:
            return tower(inputs)
        cache = self._feature_caches.get(modality) if self.training else None
        found = None if cache is None else cache.get(inputs)
        if found is None:
            with torch.no_grad():
                found = tower(inputs)
            if cache is not None:
                cache.put(inputs, found)
        return found

    def encode_image(self, images: Tensor) -> tuple[Tensor, Tensor | None]:
        """images (B, 3, H, W) -> (embedding (B, D), log-std (B,) / (B, D) / None)."""
        pooled = self._pooled("image", images)
        return self.image_proj(pooled), None if self.image_log_std is None else self.image_log_std(pooled)

    def encode_text(self, tokens: Tensor) -> tuple[Tensor, Tensor | None]:
        """tokens (B, L) long, padded as the tokenizer pads -> (embedding (B, D), log-std (B,) / (B, D) / None)."""
        pooled = self._pooled("text", tokens)
        return self.text_proj(pooled), None if self.text_log_std is None else self.text_log_std(pooled)

    def forward(self, images: Tensor, tokens: Tensor) -> Embeddings:
        """images (N, 3, H, W), tokens (M, L) -> Embeddings; the towers are independent, so M may differ from N."""
        image_emb, image_log_std = self.encode_image(images)
        text_emb, text_log_std = self.encode_text(tokens)
        return Embeddings(image_emb, text_emb, image_log_std, text_log_std)


# The constructor keywords every tower of a modality takes from the data and the tokenizer.
DATA_KWARGS = {"image": ("image_size",), "text": ("vocab_size", "max_len")}


def _tower_class(spec: str, modality: str) -> tuple[Any, str | None]:
    """(the registered tower class, the name after ``<tower>:`` or None) of ``spec``, e.g. ``vit`` or
    ``timm:resnet18``; the class is checked to declare the tower contract (module docstring) for ``modality``."""
    name, _, arg = str(spec).partition(":")
    cls = ENCODERS.get(name)
    # A third-party encoder may not know the contract: say what is missing rather than fail on it later.
    if getattr(cls, "modality", None) not in DATA_KWARGS or not isinstance(getattr(cls, "config_keys", None), tuple):
        raise TypeError(f"encoder {name!r} ({cls!r}) must be a class declaring `modality` ('image' or 'text') and "
                        "`config_keys` (a tuple of the constructor keywords a model config may set)")
    if cls.modality != modality:
        raise ValueError(f"{cls.__name__} is a {cls.modality} tower and cannot be the {modality} tower")
    takes_name = getattr(cls, "takes_name", False)
    if takes_name and not arg:
        raise ValueError(f"say which model the {name} tower is: {modality}_tower={name}:<name>")
    if arg and not takes_name:
        raise ValueError(f"the {name} tower takes no name ({spec!r}); write {modality}_tower={name}")
    return cls, arg or None


def _tower_kwargs(cls: Any, towers: Mapping[str, Any], data: Mapping[str, Any]) -> dict[str, Any]:
    """The tower's :data:`DATA_KWARGS` taken from ``data`` plus its ``<modality>_<key>`` options from ``towers``
    (the tower arguments of the model config, :attr:`ModelSettings.towers`)."""
    prefix = f"{cls.modality}_"
    kwargs = {key: data[key] for key in DATA_KWARGS[cls.modality]}
    for key, value in towers.items():
        if key.startswith(prefix):
            arg = key[len(prefix):]
            if arg not in cls.config_keys:
                source = f"; {arg} comes from the data, not the config" if arg in kwargs else ""
                accepted = sorted(prefix + k for k in cls.config_keys)
                raise ValueError(f"unknown model key {key!r} for {cls.modality} tower {cls.__name__}{source}; "
                                 f"it accepts {accepted}")
            # Hydra hands lists over as ListConfig; towers get plain tuples.
            kwargs[arg] = tuple(value) if isinstance(value, Sequence) and not isinstance(value, str) else value
    return kwargs


def build_dual_encoder(model_cfg: ModelSettings | Mapping[str, Any], *, vocab_size: int, max_len: int,
                       image_size: int, log_std: bool, cache_size: int = 1) -> DualEncoder:
    """Build the dual encoder of a model config: its settings, or a flat config (configs/model/<name>.yaml).

    Keys: those of :class:`probloss.models.settings.ModelSettings` (the towers chosen: registered encoder names,
    ``timm:<name>``, ``hf:<name or folder>``: probloss/models/towers.py; ``embed_dim``; the log-std heads;
    locking, LiT: :meth:`DualEncoder.lock`; ``allow_download``, towers by name; ``name``, ignored), and tower
    arguments ``image_<arg>`` / ``text_<arg>`` (e.g. ``image_patch_size``, ``text_depth``), checked against the
    tower's ``config_keys``. ``image_size``, ``vocab_size`` and ``max_len`` come from the data and tokenizer. An
    unknown key is an error naming what is accepted.

    Args:
        log_std: grow log-std heads (``loss.needs_log_std``).
        cache_size: batches of features a fully locked tower keeps (GradCache: its micro-batches per step).
    """
    cfg = model_cfg if isinstance(model_cfg, ModelSettings) else ModelSettings.of(model_cfg)
    data = {"image_size": image_size, "vocab_size": vocab_size, "max_len": max_len}
    towers = []
    for modality, spec in (("image", cfg.image_tower), ("text", cfg.text_tower)):
        cls, name = _tower_class(spec, modality)
        kwargs = _tower_kwargs(cls, cfg.towers, data)
        if name is not None:
            kwargs.update(name=name, allow_download=bool(cfg.allow_download))
        towers.append(cls(**kwargs))
    model = DualEncoder(*towers, int(cfg.embed_dim), log_std=log_std, log_std_per_dim=bool(cfg.log_std_per_dim),
                        init_log_std=float(cfg.init_log_std or 0.0),  # null: 0 (training uses the loss's)
                        log_std_hidden=int(cfg.log_std_hidden))
    locks = (("image", cfg.lock_image, "lock_image_unlocked_groups", cfg.lock_image_unlocked_groups),
             ("text", cfg.lock_text, "lock_text_unlocked_layers", cfg.lock_text_unlocked_layers))
    for modality, lock, key, unlocked in locks:
        if lock:
            model.lock(modality, int(unlocked or 0), cache_size)
        elif unlocked:
            raise ValueError(f"{key}={unlocked} unlocks part of a locked tower: set lock_{modality}=true")
    return model
