"""``model.*`` of a run: the dual encoder's own keys with their defaults (configs/model/<name>.yaml composes them
as the node ``model/_settings`` and sets what differs for its model), typed and frozen.

A model config is flat: besides these keys it holds the towers' constructor arguments, spelled ``image_<arg>`` /
``text_<arg>`` (``image_patch_size``, ``text_depth``). Those are not fields here: they differ per registered
encoder, so the tower's class checks them when it is built (``config_keys``, probloss/models/dual.py), as a
loss's constructor checks its keywords. :meth:`ModelSettings.of` keeps them apart in ``towers``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping

from probloss.schema import ABSENT, NODE, REQUIRED, setting

TOWER_PREFIXES = ("image_", "text_")


@dataclass(frozen=True)
class ModelSettings:
    """``model.*``: the towers chosen, the joint space, the log-std heads, locking (LiT) and downloads. A key a
    model config lacks takes the value below (``absent``), the builder's default since before the key was
    typed; the locking and download keys (``node=False``) are in the configs of the models that lock towers
    (configs/model/lit.yaml, lit_shapes.yaml) only."""

    # the model's name, set by its config file (a label in titles and messages; the builder ignores it)
    name: str | None = REQUIRED
    # image tower: a registered encoder name (probloss.ENCODERS.list(): vit, resnet) | timm:<name>
    # (probloss/models/towers.py)
    image_tower: str = setting("vit", absent="vit")
    # text tower: a registered encoder name (transformer, cbow) | hf:<local folder or cached name>
    text_tower: str = setting("transformer", absent="transformer")
    # joint embedding size D
    embed_dim: int = setting(64, absent=64)
    # log-std heads (only when loss.needs_log_std): (B,) per sample, or (B, D) per dimension
    log_std_per_dim: bool = setting(False, absent=False)
    # initial log-std of every sample (null: the loss's init_log_std, 0 unless its paper says)
    init_log_std: float | None = None
    # 0: linear head on the pooled feature; >0: MLP with this hidden width
    log_std_hidden: int = setting(0, absent=0)
    # no gradients for the image tower, eval mode, not in the optimiser; features under no_grad
    lock_image: bool = setting(False, absent=False, node=False)
    # >0: train the last N of timm's coarse parameter groups of a locked image tower (blocks or stages; the
    # final norm goes with the last)
    lock_image_unlocked_groups: int = setting(0, absent=0, node=False)
    # the same for the text tower
    lock_text: bool = setting(False, absent=False, node=False)
    # with lock_text=true, >0: train the last N layers (and the pooler/final norm)
    lock_text_unlocked_layers: int = setting(0, absent=0, node=False)
    # true: towers and tokenizers by name may be fetched from the Hugging Face hub
    allow_download: bool = setting(False, absent=False, node=False)
    # the tower arguments (image_<arg>, text_<arg>) of the config, checked by the towers' constructors
    towers: Mapping[str, Any] = field(default_factory=dict, metadata={NODE: False})

    @classmethod
    def keys(cls) -> list[str]:
        """The model-config keys that are fields (not tower arguments)."""
        return [f.name for f in dataclasses.fields(cls) if f.name != "towers"]

    @classmethod
    def value(cls, section: Mapping[str, Any], key: str) -> Any:
        """``section[key]``, or the field's ``absent`` value where the section lacks it (a plain config section,
        before its settings are built: probloss/models/towers.py resolves a tower's preprocessing there)."""
        found = {f.name: f for f in dataclasses.fields(cls)}[key]
        return section[key] if key in section else found.metadata.get(ABSENT)

    @classmethod
    def of(cls, section: Mapping[str, Any]) -> ModelSettings:
        """The settings of a flat model config; a key that is neither a field nor ``image_<arg>``/``text_<arg>``
        is a ValueError naming what is accepted."""
        own = cls.keys()
        unknown = [k for k in section if k not in own and not str(k).startswith(TOWER_PREFIXES)]
        if unknown:
            raise ValueError(f"unknown model keys {unknown}; accepted: {sorted(own)} and image_<arg>/text_<arg>")
        towers = {k: v for k, v in section.items() if k not in own}
        return cls(**{k: cls.value(section, k) for k in own}, towers=towers)

    @property
    def label(self) -> str:
        """The name for titles and messages (``?`` for a config without one)."""
        return "?" if self.name is None else str(self.name)
