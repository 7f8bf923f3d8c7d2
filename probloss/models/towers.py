"""Towers from the libraries researchers already use: any timm image model and any Hugging Face transformers
text encoder with its own tokenizer. ``pip install -c constraints.txt "probloss[towers]"``; timm and transformers
are imported only when a model config names such a tower.

::

    model=lit model.image_tower=timm:vit_small_patch16_224 model.image_pretrained=/weights/vit_small.safetensors \\
        model.text_tower=hf:/models/bert-mini model.text_pretrained=true

- ``image_tower=timm:<name>``: ``timm.create_model(name, num_classes=0)``, i.e. the model's own pooled features
  (B, num_features), which the dual encoder projects to the joint space. ``image_pretrained``: null (random
  weights), a local weights file (.safetensors, .pth, .bin: read by timm's reader with ``weights_only``; every
  tensor must fit), or true (the name's own pretrained weights from the local Hugging Face cache).
- ``text_tower=hf:<name or local folder>``: ``AutoModel`` (the encoder of an encoder-decoder, the text model of
  CLIP/SigLIP) and ``AutoTokenizer`` of that name. ``text_pretrained``: false (random weights from its config),
  true (its weights) or a local folder of weights for the same architecture. ``text_pool``: null pools as the
  family does (as open_clip does): the first token for BERT/ELECTRA, CLIP's/SigLIP's own pooler (the end
  token), the mean over real tokens for everything else (RoBERTa, XLM-R, DistilBERT, MPNet, T5, ...).
- Nothing is downloaded unless ``model.allow_download=true``: a name that is not in the local cache is an
  error naming the two ways out.
- Preprocessing matches the tower and is written into the run's config.yaml (:func:`resolve_tower_config`):
  ``image_input_size``, ``image_mean``, ``image_std``, ``image_interpolation`` from the timm model's pretrained
  config where they are null, and for an ``hf:`` text tower its own tokenizer (``data.tokenizer=hf:<name>``) and
  its length (``data.max_len``; null: the tokenizer's own maximum, an explicit value may not exceed it).
"""

from __future__ import annotations

import difflib
import os
import sys
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from probloss.models._blocks import MEAN, STD
from probloss.models.hub import from_pretrained, hf_max_len, import_timm, import_transformers
from probloss.models.settings import ModelSettings
from probloss.models.text import masked_mean
from probloss.models.tokenizer import PAD
from probloss.registry import ENCODERS

# --- timm image towers ---------------------------------------------------------------------------------------


def _pretrained_cfg(timm, name: str) -> dict[str, Any]:
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"timm has no model {name!r}.{hint} (timm.list_models() lists them)")
    cfg = timm.get_pretrained_cfg(name)
    return cfg.to_dict() if cfg is not None else {}


def timm_preprocessing(name: str) -> dict[str, Any]:
    """``{input_size, mean, std, interpolation}`` of the timm model's default pretrained config."""
    cfg = _pretrained_cfg(import_timm(f"timm:{name}"), name)
    return {"input_size": int(cfg.get("input_size", (3, 224, 224))[-1]), "mean": list(cfg.get("mean", (0.5,) * 3)),
            "std": list(cfg.get("std", (0.5,) * 3)), "interpolation": str(cfg.get("interpolation") or "bilinear")}


def _cached_weights(timm, name: str) -> str:
    """The local file of the name's own pretrained weights (the Hugging Face cache), or a clear error."""
    from huggingface_hub import try_to_load_from_cache

    cfg = _pretrained_cfg(timm, name)
    hub_id = cfg.get("hf_hub_id")
    for filename in filter(None, (cfg.get("hf_hub_filename"), "model.safetensors", "pytorch_model.bin")):
        path = try_to_load_from_cache(hub_id, filename) if hub_id else None
        if isinstance(path, str):
            return path
    raise ValueError(f"the pretrained weights of timm:{name} ({hub_id}) are not in the local Hugging Face cache: "
                     "give a local file (model.image_pretrained=/path/weights.safetensors) or allow the download "
                     "(model.allow_download=true)")


def _load_weights(timm, model: nn.Module, name: str, path: str) -> None:
    """Load a local state dict into the timm model, and refuse one that does not fit it.

    timm's own loader loads non-strictly whenever the classifier is dropped (num_classes=0), so weights of
    another architecture would load nothing and only be logged; here every parameter must be matched.
    """
    try:  # safetensors, or torch.load(weights_only=True); unwraps "model", "state_dict" etc.
        state = timm.models.load_state_dict(path)
    except Exception as err:  # a cut download, another file: the reader's own error says little
        raise ValueError(f"cannot read {path} as a state dict of timm:{name} ({type(err).__name__}: "
                         f"{str(err).splitlines()[0] if str(err) else 'no message'}); give a .safetensors, .pth or "
                         ".bin file of its weights") from None
    filter_fn = getattr(sys.modules[type(model).__module__], "checkpoint_filter_fn", None)
    if filter_fn is not None:  # the model's own conversion: original formats, a ViT's resampled position table
        state = filter_fn(state, model)
    classifier = _pretrained_cfg(timm, name).get("classifier") or ()
    for head in [classifier] if isinstance(classifier, str) else classifier:  # the class head: num_classes=0
        state = {k: v for k, v in state.items() if not k.startswith(head + ".")}
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(f"{path} does not fit timm:{name}: {len(result.missing_keys)} of the model's tensors are "
                         f"not in it (e.g. {result.missing_keys[:3]}), {len(result.unexpected_keys)} of its tensors "
                         f"are not in the model (e.g. {result.unexpected_keys[:3]})")


@ENCODERS.register("timm")
class TimmImageTower(nn.Module):
    """A timm model's pooled features, after resizing and normalising the images as the model was trained.

    The loader hands images normalised to [-1, 1] at ``data.image_size``; the tower maps them back to pixels,
    resizes the whole image to ``input_size`` (no crop: a caption may describe what is at the border) and
    normalises with the model's ``mean``/``std``. Input (B, 3, H, W), output (B, width).
    """

    modality = "image"
    config_keys = ("pretrained", "input_size", "mean", "std", "interpolation")
    takes_name = True  # image_tower=timm:<name>

    def __init__(self, name: str, image_size: int = 32, pretrained: Any = None, input_size: int | None = None,
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                 interpolation: str | None = None, allow_download: bool = False):
        super().__init__()
        timm = import_timm(f"timm:{name}")
        default = timm_preprocessing(name)
        self.input_size = int(input_size or default["input_size"])
        self.interpolation = interpolation or default["interpolation"]
        if self.interpolation not in ("bilinear", "bicubic", "nearest"):
            raise ValueError(f"image_interpolation must be bilinear, bicubic or nearest, got {self.interpolation!r}")
        kwargs: dict[str, Any] = {"num_classes": 0}
        if self.input_size != default["input_size"] and _pretrained_cfg(timm, name).get("fixed_input_size"):
            kwargs["img_size"] = self.input_size  # a ViT's position table (resampled from pretrained weights)
        path = None
        if pretrained is True and not allow_download:
            path = _cached_weights(timm, name)
        elif pretrained not in (None, False, True):
            path = os.path.expanduser(str(pretrained))
            if not Path(path).is_file():
                raise ValueError(f"model.image_pretrained={pretrained}: no such file (a .safetensors, .pth or .bin "
                                 f"state dict of timm:{name})")
        # pretrained=True here only with allow_download: timm fetches the name's weights from the hub
        self.model = timm.create_model(name, pretrained=pretrained is True and path is None, **kwargs)
        if path is not None:
            _load_weights(timm, self.model, name, path)
        self.width = int(getattr(self.model, "head_hidden_size", None) or self.model.num_features)
        self.register_buffer("mean", torch.tensor(list(mean or default["mean"])).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(list(std or default["std"])).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images * STD + MEAN  # pixels in [0, 1]
        if x.shape[-2:] != (self.input_size, self.input_size):
            smooth = self.interpolation != "nearest"
            x = F.interpolate(x, size=(self.input_size,) * 2, mode=self.interpolation,
                              align_corners=False if smooth else None,
                              antialias=smooth and x.shape[-1] > self.input_size)
        return self.model((x - self.mean) / self.std)

    def param_groups(self) -> list[list[str]]:
        """Parameter names in timm's coarse groups, input side first (stem, each block or stage, final norm), as
        open_clip's ``lock_image_unlocked_groups`` counts them (the final norm goes with the last block)."""
        from timm.models import group_parameters

        groups = group_parameters(self.model, self.model.group_matcher(coarse=True))
        return [[f"model.{n}" for n in names] for _, names in sorted(groups.items())]


# --- Hugging Face text towers --------------------------------------------------------------------------------


def _text_encoder(model: nn.Module) -> nn.Module:
    if getattr(model.config, "is_encoder_decoder", False):
        return model.get_encoder()  # T5 and friends: the encoder
    return getattr(model, "text_model", None) or model  # CLIP/SigLIP: the text model


def _family_pool(model_type: str) -> str:
    if model_type in ("bert", "electra"):
        return "cls"
    if model_type in ("clip_text_model", "siglip_text_model", "clip", "siglip"):
        return "pooler"
    return "mean"


@ENCODERS.register("hf")
class HFTextTower(nn.Module):
    """A transformers text encoder, pooled to (B, width). Input: the ids of :class:`probloss.models.tokenizer.HFTokenizer` (padding -1).

    Args:
        name: a Hugging Face model name (in the local cache) or a local folder (config, tokenizer, weights).
        vocab_size, max_len: from the tokenizer; checked against the model's tables.
        pretrained: false (random weights from the config), true (the weights of ``name``) or a local folder.
        pool: "cls" | "mean" | "pooler" | null (the family's own, module docstring).
    """

    modality = "text"
    config_keys = ("pretrained", "pool")
    takes_name = True  # text_tower=hf:<name or folder>

    def __init__(self, name: str, vocab_size: int, max_len: int, pretrained: Any = False, pool: str | None = None,
                 allow_download: bool = False):
        super().__init__()
        transformers = import_transformers(f"hf:{name}")
        if pretrained in (None, False):
            config = from_pretrained(transformers.AutoConfig, name, allow_download, "config")
            model = transformers.AutoModel.from_config(config)
        else:
            source = name if pretrained is True else os.path.expanduser(str(pretrained))
            model = from_pretrained(transformers.AutoModel, source, allow_download, "weights")
        self.model = _text_encoder(model)
        config = self.model.config
        self.pool = pool or _family_pool(config.model_type)
        if self.pool not in ("cls", "mean", "pooler"):
            raise ValueError(f"text_pool must be cls, mean or pooler (or null), got {self.pool!r}")
        if self.pool != "pooler" and isinstance(getattr(self.model, "pooler", None), nn.Module):
            # BERT/RoBERTa's pooler (dense + tanh) would be parameters without gradients: dead weight for the
            # optimiser, and an error for DDP, which expects a gradient for every trained parameter.
            self.model.pooler = None
        self.pad_id = int(getattr(config, "pad_token_id", None) or 0)
        self.width = int(getattr(config, "hidden_size", None) or config.d_model)
        table = self.model.get_input_embeddings().num_embeddings
        if vocab_size > table:
            raise ValueError(f"the tokenizer of hf:{name} has {vocab_size} tokens, the model's table {table}")
        positions = getattr(config, "max_position_embeddings", None)
        if positions and max_len > positions:
            raise ValueError(f"data.max_len={max_len} is longer than hf:{name}'s {positions} positions")

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        mask = tokens != PAD
        out = self.model(input_ids=torch.where(mask, tokens, self.pad_id), attention_mask=mask.long())
        if self.pool == "pooler":
            return out.pooler_output
        hidden = out.last_hidden_state  # (B, L, width)
        return hidden[:, 0] if self.pool == "cls" else masked_mean(hidden, mask)

    def param_groups(self) -> list[list[str]]:
        """Parameter names: everything before the first layer (embeddings), then one group per layer, with what
        follows the last layer (a final norm, a pooler) in its group, as open_clip's ``lock_text_unlocked_layers``."""
        lists = [(n, m) for n, m in self.named_modules() if isinstance(m, nn.ModuleList) and len(m)]
        layer_path, layers = max(lists, key=lambda item: len(item[1]))  # the layer stack: the longest list
        groups: list[list[str]] = [[]]
        for name, _ in self.named_parameters():
            if name.startswith(layer_path + "."):
                index = int(name[len(layer_path) + 1:].split(".")[0])
                while len(groups) <= index + 1:
                    groups.append([])
                groups[index + 1].append(name)
            else:
                groups[-1 if len(groups) > 1 else 0].append(name)
        return groups


# --- the run config ------------------------------------------------------------------------------------------


def resolve_tower_config(model: dict, data: dict) -> tuple[dict, dict]:
    """The model and data sections with the tower's preprocessing filled in (module docstring); unchanged for
    the built-in towers. Raises ValueError on a mismatch (an ``hf:`` tokenizer without an ``hf:`` tower)."""
    model, data = dict(model), dict(data)
    image, text = (str(ModelSettings.value(model, key)) for key in ("image_tower", "text_tower"))
    if image.startswith("timm:"):
        default = timm_preprocessing(image[len("timm:"):])
        for key, value in default.items():
            if model.get(f"image_{key}") is None:
                model[f"image_{key}"] = value
    tokenizer = str(data.get("tokenizer", ""))
    if tokenizer.startswith("hf:") and not text.startswith("hf:"):
        raise ValueError(f"data.tokenizer={tokenizer} goes with its own text tower: model.text_tower={tokenizer}")
    if text.startswith("hf:"):
        data["tokenizer"] = text  # the tower's own tokenizer
        name = text[len("hf:"):]
        own = hf_max_len(name, bool(ModelSettings.value(model, "allow_download")))
        if data.get("max_len") is None:
            data["max_len"] = own
        elif int(data["max_len"]) > own:
            raise ValueError(f"data.max_len={data['max_len']} is longer than the {own} tokens of hf:{name} "
                             "(data.max_len=null: its own maximum)")
    return model, data
