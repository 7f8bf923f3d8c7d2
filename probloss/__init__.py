"""probloss: a research sandbox for variance-aware contrastive losses on image-text dual encoders.

The loss API (docs/design.md)::

    import probloss
    probloss.list_losses()                       # ["gaussian_var", "infonce", "sigmoid", ...]
    loss = probloss.build_loss("sigmoid")        # an nn.Module
    value = loss(image_emb, text_emb)            # scalar
    scores = loss.score(image_emb, text_emb)     # (N_img, N_txt), higher = better match
"""

from probloss.loss import ContrastiveLoss
from probloss.registry import ENCODERS, LOSSES, Registry, RegistryError

__version__ = "0.1.0"


def register_loss(name=None):
    """Class decorator registering a loss plugin under ``name`` (default: the class name in lower case)."""
    return LOSSES.register(name)


def list_losses(pattern: str = "*") -> list[str]:
    """Sorted names of the registered losses matching an fnmatch pattern."""
    return LOSSES.list(pattern)


def build_loss(name: str, **kwargs) -> ContrastiveLoss:
    """Build a registered loss by name; an unknown name raises an error listing the choices."""
    return LOSSES.build(name, **kwargs)


__all__ = [
    "ContrastiveLoss", "ENCODERS", "LOSSES", "Registry", "RegistryError",
    "build_loss", "list_losses", "register_loss",
]
