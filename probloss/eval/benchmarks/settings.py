"""The keys of ``probloss evaluate`` (configs/evaluate.yaml) and of each benchmark (configs/benchmark/<name>.yaml):
typed, frozen, every default here (the comment above a field says what it means). The config files keep their run
commands and per-benchmark values; probloss/training/config.py registers these classes as the nodes they compose
(``_evaluate_settings``, ``benchmark/_<name>``).

A section that lacks a key (a plain dict handed to a reader, e.g. by a test or a script) takes the field's
``absent`` value: the value the readers used before the keys were typed (``max_captions``: every sentence,
``n_folds``: no 1K protocol), not the config default.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping

from probloss.schema import REQUIRED, build, setting


@dataclass(frozen=True)
class BenchmarkRunSettings:
    """``benchmark.*`` keys shared by every selected benchmark: how they are encoded and scored."""

    # lower-case captions and prompts before tokenising: auto = yes for the built-in towers (their tokenizers were
    # trained on lower-case captions), no for hf: towers (the Hugging Face tokenizer does its own normalisation);
    # true | false to force
    lowercase: Any = setting("auto", absent="auto")
    # images / captions encoded at a time
    batch_size: int = setting(256, absent=256)
    # queries scored and ranked at a time (memory: block x gallery scores)
    block: int = setting(256, absent=256)
    # tqdm bars while encoding and scoring
    progress: bool = setting(True, absent=True)

    @classmethod
    def of(cls, section: Mapping[str, Any]) -> BenchmarkRunSettings:
        """From the ``benchmark`` section, whose other keys are the selected benchmarks' own sections."""
        names = {f.name for f in dataclasses.fields(cls)}
        return build(cls, {k: v for k, v in section.items() if k in names}, "benchmark")


@dataclass(frozen=True)
class EvaluateOutputSettings:
    """``eval.*`` of ``probloss evaluate`` with benchmarks."""

    # the results JSON; null: <checkpoint folder>/<checkpoint name>.benchmarks.json
    output: str | None = None
    # also write <output without .json>.<benchmark>.npz: image_emb, text_emb, image_ids, caption_ids (zero-shot:
    # labels), image_log_std / text_log_std where the loss has them
    save_embeddings: bool = setting(False, absent=False)


@dataclass(frozen=True)
class EvaluateSettings:
    """configs/evaluate.yaml's own keys (every other key=value changes the config saved in the checkpoint)."""

    # path of a .ckpt file (required)
    checkpoint: str = REQUIRED
    benchmark: BenchmarkRunSettings = field(default_factory=BenchmarkRunSettings)
    eval: EvaluateOutputSettings = field(default_factory=EvaluateOutputSettings)

    @classmethod
    def of(cls, cfg: Mapping[str, Any]) -> EvaluateSettings:
        """From the composed configs/evaluate.yaml (the selected benchmarks' own sections are read by
        :func:`benchmark_settings`)."""
        return cls(checkpoint=str(cfg["checkpoint"]), benchmark=BenchmarkRunSettings.of(cfg["benchmark"]),
                   eval=build(EvaluateOutputSettings, cfg["eval"], "eval"))


@dataclass(frozen=True)
class KarpathySettings:
    """``benchmark.karpathy``: COCO or Flickr30k retrieval from a Karpathy split file."""

    # the Karpathy split file (required): dataset_coco.json / dataset_flickr30k.json
    annotations: str | None = REQUIRED
    # the folder that each image's filepath/filename is relative to (required)
    images: str | None = REQUIRED
    # the first k sentences of each image: 5 = the 25,000-caption COCO 5K of VSE++, PCME++ and ECCV Caption (a few
    # COCO images have 6 or 7); null: every sentence
    max_captions: int | None = 5
    # which images of the file (test | val | train | restval)
    split: str = setting("test", absent="test")
    # the 1K protocol: folds of fold_size consecutive images (skipped when the split is smaller than n_folds x
    # fold_size, e.g. Flickr30k's 1000 test images); null or 0: skipped
    n_folds: int | None = 5
    # images per fold of the 1K protocol
    fold_size: int | None = 1000
    # not a key of this benchmark (ECCV Caption's and CxC's: below)
    coco_captions: str | None = setting(None, node=False)


@dataclass(frozen=True)
class AssociationSettings(KarpathySettings):
    """``benchmark.eccv_caption`` and ``benchmark.cxc``: the COCO 5K test split of a Karpathy split file with a
    dataset's extra image-caption positives."""

    # the Karpathy split the association files were made on
    split: str = setting("test", absent="test")
    # no 1K protocol: the association files are made on the whole 5K split
    n_folds: int | None = setting(None, node=False)
    fold_size: int | None = setting(None, node=False)
    # a folder with image_to_caption.json and caption_to_image.json ({id: [ids]}; the released
    # eccv_image_to_caption.json / cxc_image_to_caption.json names work too) (required)
    extra_positives: str | None = REQUIRED
    # COCO's captions_val2014.json (annotations with id, image_id, caption): how a caption of the Karpathy file
    # gets its COCO caption id when its sentences have no "id" (the released dataset_coco.json has only sentid);
    # matched by (image id, exact caption text)
    coco_captions: str | None = None


@dataclass(frozen=True)
class WdsSettings:
    """``benchmark.wds``: a CLIP_benchmark webdataset folder."""

    # brace / glob pattern of the tar shards (required)
    shards: str | None = REQUIRED
    # class names, one per line; null: classnames.txt beside the shards or one folder up
    classnames: str | None = None
    # prompt templates with {}, one per line; null: zeroshot_classification_templates.txt found like
    # classnames.txt, else CLIP's 80 ImageNet prompts
    templates: str | None = None


@dataclass(frozen=True)
class FolderSettings:
    """``benchmark.folder``: ImageNet-style zero-shot classification from class folders."""

    # the class-folder tree (required)
    root: str | None = REQUIRED
    # one name per line in sorted dir order, or a JSON {dir: name} (or list); null: the dir names with _ as spaces
    # (ImageNet's dirs are WordNet ids: give the names)
    classnames: str | None = None
    # prompt templates with {}, one per line; null: CLIP's 80 ImageNet prompts (package data)
    templates: str | None = None


BENCHMARK_SETTINGS = {"karpathy": KarpathySettings, "eccv_caption": AssociationSettings, "cxc": AssociationSettings,
                      "wds": WdsSettings, "folder": FolderSettings}
# the benchmarks of a Karpathy split with extra positives (association files)
ASSOCIATION_NAMES = tuple(name for name, cls in BENCHMARK_SETTINGS.items() if cls is AssociationSettings)


def benchmark_settings(cls, section: Any, name: str):
    """``cls`` of benchmark ``name`` from its section (a mapping; settings pass through)."""
    return section if isinstance(section, cls) else build(cls, section, f"benchmark.{name}")
