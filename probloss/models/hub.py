"""timm and transformers on demand (the towers extra): imported with an error naming the install command when
missing, loaded from local files only unless ``model.allow_download=true``."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

INSTALL = 'pip install -c constraints.txt "probloss[towers]"'


def missing_extra(tower: str, package: str) -> ValueError:
    return ValueError(f"{tower} needs {package}, which is not installed: {INSTALL}")


def _import_torchvision() -> None:
    """Import torchvision (timm needs its Python parts; transformers imports it) beside torch's CPU build.

    PyPI's torchvision wheel for Linux is built against torch's CUDA build, so beside the CPU build its C++ ops
    (nms, roi_align, ...) cannot load. torchvision then still imports, except that 0.28 registers fake kernels
    for two of those ops (nms, qnms) without checking that they loaded, and fails. timm never calls them; so
    the two schemas are declared and the import is retried. ``torchvision.ops.nms`` still raises torchvision's
    own "Couldn't load custom C++ ops" error.
    """
    try:
        import torchvision  # noqa: F401
        return
    except RuntimeError as err:
        if "torchvision::" not in str(err):
            raise
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]  # the half-imported package
    for op in ("nms", "qnms"):
        try:
            getattr(torch.ops.torchvision, op)
        except (AttributeError, RuntimeError):
            torch.library.define(f"torchvision::{op}", "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    import torchvision  # noqa: F401,F811


def import_timm(tower: str = "a timm tower"):
    try:
        _import_torchvision()
        import timm
    except ImportError:
        raise missing_extra(tower, "timm") from None
    return timm


def import_transformers(tower: str = "an hf tower"):
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the tokenizer also runs in forked loader workers
    try:
        _import_torchvision()  # transformers imports it where it is installed
    except ImportError:
        pass  # transformers works without it
    try:
        import transformers
    except ImportError:
        raise missing_extra(tower, "transformers") from None
    transformers.logging.set_verbosity_error()  # "weights not used/initialised" lists: the pooler, the LM head
    transformers.logging.disable_progress_bar()
    return transformers


def from_pretrained(factory, source: str, allow_download: bool, what: str):
    try:
        return factory.from_pretrained(source, local_files_only=not allow_download)
    except Exception as err:  # not found (OSError, ValueError), or a damaged file (SafetensorError, ...)
        reason = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else 'no message'}"
        if Path(source).expanduser().exists():
            raise ValueError(f"cannot load the {what} of hf:{source} from that folder ({reason})") from None
        raise ValueError(f"cannot load the {what} of hf:{source} (no such folder and not in the local Hugging Face "
                         f"cache: {reason}); give a local folder, or allow the download "
                         "(model.allow_download=true)") from None


def hf_max_len(name: str, allow_download: bool = False, tokenizer=None) -> int:
    """The most tokens the named text model takes: its tokenizer's ``model_max_length``, capped by the model's
    position table (tokenizers without a limit say 1e30)."""
    transformers = import_transformers(f"hf:{name}")
    tokenizer = tokenizer or from_pretrained(transformers.AutoTokenizer, name, allow_download, "tokenizer")
    config = text_config(from_pretrained(transformers.AutoConfig, name, allow_download, "config"))
    limits = [int(tokenizer.model_max_length)] if tokenizer.model_max_length < 1e6 else []
    limits += [int(config.max_position_embeddings)] if getattr(config, "max_position_embeddings", None) else []
    return min(limits) if limits else 512


def text_config(config):
    return getattr(config, "text_config", None) or config  # CLIP/SigLIP: the text half
