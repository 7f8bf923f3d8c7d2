"""Benchmark readers end to end on small files written here in each format (a tiny gaussian_var checkpoint's
shapes test split, 48 images): the command and its JSON / npz / plot, the agreement with the built-in evaluator,
COCO's 1K fold protocol, ECCV Caption id matching (the coco_captions path too), lower-casing and templates, and
the one-line errors (probloss/eval/benchmarks/)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from probloss.errors import ConfigError, DataError
from probloss.eval.benchmarks import readers
from probloss.eval.benchmarks.run import evaluate_benchmarks, lowercase_for, prepare
from probloss.eval.dual_encoder import fill_template
from probloss.eval.retrieval import positive_pairs, rank_retrieval
from probloss.studies import benchmark_check
from probloss.training import checkpoint as ckpt
from probloss.training.evaluation import evaluate_command

REPO = Path(__file__).resolve().parents[1]
N_TEST = 48


@pytest.fixture(scope="module")
def trained(tmp_path_factory, cache_dir):
    """A 3-step gaussian_var run (log-stds: the uncertainty keys and plot) and its test split exported."""
    from probloss.training.loop import main

    out = tmp_path_factory.mktemp("bench_run")
    main([f"out_dir={out}", f"data.cache_dir={cache_dir}", "data.train_size=256", "data.val_size=32",
          f"data.test_size={N_TEST}", "trainer.batch_size=32", "trainer.max_steps=3", "trainer.warmup_steps=1",
          "trainer.eval_every=0", "trainer.progress=false", "fabric.accelerator=cpu", "fabric.devices=1",
          "eval.projector_samples=0", "loss=gaussian_var"])
    run_dir = next((out / "default" / "gaussian_var").iterdir())
    path = ckpt.newest_checkpoint(run_dir)
    exported = tmp_path_factory.mktemp("bench_files")
    result = benchmark_check.check(path, exported)
    return {"ckpt": path, "files": exported, "check": result}


@pytest.fixture(scope="module")
def loaded(trained):
    """(model, loss, tokenizer, run) rebuilt from the checkpoint, as the command does."""
    from probloss.training.builders import make_tokenizer, make_trainee
    from probloss.training.config import apply_overrides
    from probloss.training.settings import RunSettings

    raw = ckpt.read_checkpoint(trained["ckpt"])
    run = RunSettings.from_config(apply_overrides(raw["config"], [], what="test"))
    tokenizer = make_tokenizer(run)
    trainee = make_trainee(run, tokenizer, from_checkpoint=True)
    trainee.load_state_dict(raw["model"])
    return trainee.model.eval(), trainee.loss, tokenizer, run


def _args(files: Path, *names: str) -> list[str]:
    k = files / "karpathy"
    given = {"karpathy": [f"benchmark.karpathy.annotations={k / 'dataset_shapes.json'}",
                          f"benchmark.karpathy.images={k / 'images'}"],
             "wds": [f"benchmark.wds.shards={files / 'wds' / 'test' / '0.tar'}"],
             "folder": [f"benchmark.folder.root={files / 'folder'}",
                        f"benchmark.folder.classnames={files / 'folder' / 'classnames.txt'}",
                        f"benchmark.folder.templates={files / 'folder' / 'templates.txt'}"]}
    for b in ("eccv_caption", "cxc"):
        given[b] = [f"benchmark.{b}.annotations={k / 'dataset_shapes.json'}", f"benchmark.{b}.images={k / 'images'}",
                    f"benchmark.{b}.extra_positives={files / 'eccv'}"]
    return [f"benchmark=[{','.join(names)}]"] + [a for n in names for a in given[n]]


def _run(loaded, benches, lowercase=True):
    from probloss.models.linear import cpu_matmul

    model, loss, tokenizer, run = loaded
    with cpu_matmul(run.trainer.cpu_matmul or "blas"):  # as the command and the check
        return evaluate_benchmarks(model, loss, tokenizer, benches, image_size=run.data.image_size,
                                   lowercase=lowercase)


# --- agreement with the built-in evaluator (the "Measure") ------------------------------------------------


def test_every_reader_agrees_with_the_builtin_evaluator_on_the_exported_split(trained):
    rows = trained["check"]["rows"]
    compared = {r["benchmark"].split("/")[0] for r in rows if r["same_measure"]}
    assert compared == {"karpathy", "eccv_caption", "cxc", "wds", "folder"}
    assert trained["check"]["n_test"] == N_TEST
    for r in rows:
        if r["same_measure"]:
            assert r["agree"] and r["value"] == pytest.approx(r["builtin_value"], abs=1e-12), r
    # the table says which rows differ by design, and why
    by_design = [r for r in rows if not r["same_measure"]]
    assert by_design and all("by design" in r["why"] for r in by_design)
    assert "n/a: by design" in benchmark_check.format_table(rows)


# --- the command ----------------------------------------------------------------------------------------------


def test_command_writes_every_benchmark_json_npz_and_plot(trained, tmp_path, capsys):
    out = tmp_path / "bench.json"
    results = evaluate_command([f"checkpoint={trained['ckpt']}",
                                *_args(trained["files"], "karpathy", "eccv_caption", "cxc", "wds", "folder"),
                                "benchmark.karpathy.fold_size=8", "benchmark.progress=false", f"eval.output={out}",
                                "eval.save_embeddings=true"])
    saved = json.loads(out.read_text())
    assert saved["steps"] == 3 and set(results) == set(saved)
    for key in ("karpathy/t2i_r@1", "karpathy/i2t_r@5", "karpathy/rsum", "karpathy/1k/t2i_r@1",
                "eccv_caption/i2t_map@r", "eccv_caption/t2i_rprecision", "eccv_caption/i2t_r@1", "cxc/t2i_r@1",
                "wds/i2t_r@1", "wds/zeroshot_top1", "folder/zeroshot_top1", "folder/zeroshot_top5",
                "karpathy/unc/i2t_bin_0_r@1", "eccv_caption/unc/t2i_aurc"):
        assert key in saved, key
    assert "cxc/i2t_map@r" not in saved  # CxC reports R@K only
    check = trained["check"]["benchmarks"]  # the same numbers as the agreement check's run
    for key in ("karpathy/t2i_r@1", "eccv_caption/i2t_map@r", "folder/zeroshot_top5", "wds/t2i_r@5"):
        assert saved[key] == check[key]
    rsum = 100 * sum(saved[f"karpathy/{d}_r@{k}"] for d in ("i2t", "t2i") for k in (1, 5, 10))
    assert saved["karpathy/rsum"] == pytest.approx(rsum)
    npz = np.load(tmp_path / "bench.karpathy.npz")
    assert npz["image_emb"].shape[0] == N_TEST and npz["text_emb"].shape[0] == N_TEST
    assert list(npz["image_ids"]) == list(range(1, N_TEST + 1))  # cocoid
    assert list(npz["caption_ids"]) == [benchmark_check.CAPTION_ID_BASE + i for i in range(N_TEST)]
    assert npz["image_log_std"].shape[0] == N_TEST and npz["text_log_std"].shape[0] == N_TEST
    assert (tmp_path / "bench.karpathy.uncertainty.png").stat().st_size > 0
    assert not (tmp_path / "bench.folder.uncertainty.png").exists()  # zero-shot only: no retrieval bins
    table = capsys.readouterr().out
    assert "karpathy     | i2t_r@1 " in table and "folder       | zeroshot_top1 " in table


def test_1k_protocol_is_the_mean_over_folds_of_consecutive_images(trained, loaded, tmp_path):
    files = trained["files"]
    data = json.loads((files / "karpathy" / "dataset_shapes.json").read_text())
    section = {"annotations": str(files / "karpathy" / "dataset_shapes.json"),
               "images": str(files / "karpathy" / "images"), "split": "test", "n_folds": 5, "fold_size": 8}
    whole, _ = _run(loaded, [readers.read_karpathy(section, "karpathy")])
    per_fold = []
    for f in range(5):  # each fold evaluated on its own as a separate Karpathy file
        path = tmp_path / f"fold{f}.json"
        path.write_text(json.dumps({"images": data["images"][8 * f: 8 * f + 8]}))
        fold, _ = _run(loaded, [readers.read_karpathy({**section, "annotations": str(path), "n_folds": 0},
                                                      "karpathy")])
        per_fold.append(fold)
        assert "karpathy/1k/i2t_r@1" not in fold
    for key in ("i2t_r@1", "t2i_r@1", "i2t_r@5", "t2i_r@10", "rsum"):
        assert whole[f"karpathy/1k/{key}"] == pytest.approx(np.mean([p[f"karpathy/{key}"] for p in per_fold]))


def test_every_kept_caption_of_an_image_is_a_positive(trained, loaded, tmp_path):
    files = trained["files"]
    data = json.loads((files / "karpathy" / "dataset_shapes.json").read_text())
    images = data["images"][:10]
    for im in images:  # three different sentences per image
        im["sentences"] = [dict(im["sentences"][0], raw=im["sentences"][0]["raw"] + suffix)
                           for suffix in ("", " here", " there")]
    path = tmp_path / "three.json"
    path.write_text(json.dumps({"images": images}))
    section = {"annotations": str(path), "images": str(files / "karpathy" / "images"), "split": "test"}
    for keep, n in ((2, 20), (None, 30)):
        out, encoded = _run(loaded, [readers.read_karpathy({**section, "max_captions": keep}, "karpathy")])
        assert encoded["karpathy"].caption_image.tolist() == [i // (n // 10) for i in range(n)]
        assert out["karpathy/t2i_n_queries"] == n and out["karpathy/i2t_n_queries"] == 10
        enc = encoded["karpathy"]
        per_query = rank_retrieval(loaded[1], enc.image_emb, enc.text_emb, enc.image_log_std, enc.text_log_std,
                                   positive_pairs(enc.caption_image))
        assert per_query["i2t"]["n_positive"].tolist() == [n // 10] * 10  # each image: all its kept captions


# --- ECCV Caption ids -------------------------------------------------------------------------------------------


def _eccv_section(files: Path, **changes) -> dict:
    return {"annotations": str(files / "karpathy" / "dataset_shapes.json"), "images": str(files / "karpathy" / "images"),
            "split": "test", "extra_positives": str(files / "eccv"), "coco_captions": None, **changes}


def test_coco_captions_give_the_caption_ids_the_karpathy_file_lacks(trained, loaded, tmp_path):
    files = trained["files"]
    data = json.loads((files / "karpathy" / "dataset_shapes.json").read_text())
    anns = []
    for im in data["images"]:
        for s in im["sentences"]:
            anns.append({"id": s.pop("id"), "image_id": im["cocoid"], "caption": "  " + s["raw"].replace(" ", "  ")})
    no_ids = tmp_path / "dataset_no_ids.json"
    no_ids.write_text(json.dumps(data))
    coco = tmp_path / "captions_val2014.json"
    coco.write_text(json.dumps({"images": [], "annotations": anns[::-1]}))
    # the released file's layout without the COCO annotations: a one-line error naming the key to add
    with pytest.raises(ConfigError, match=r"pass benchmark.eccv_caption.coco_captions=<COCO"):
        readers.read_karpathy(_eccv_section(files, annotations=str(no_ids)), "eccv_caption", need_caption_ids=True)
    benches = prepare({"eccv_caption": _eccv_section(files, annotations=str(no_ids), coco_captions=str(coco))},
                      ["eccv_caption"])
    matched, _ = _run(loaded, benches)
    assert {k: v for k, v in matched.items()} == {k: v for k, v in trained["check"]["benchmarks"].items()
                                                   if k.startswith("eccv_caption/")}


def test_benchmarks_on_one_gallery_encode_it_once_with_their_own_ids(trained, loaded, tmp_path, monkeypatch):
    """karpathy, eccv_caption and cxc on one COCO split: the images are encoded once, each benchmark keeps its
    own caption ids, and every value equals the one of the benchmark run alone."""
    files = trained["files"]
    data = json.loads((files / "karpathy" / "dataset_shapes.json").read_text())
    n_images = sum(im["split"] == "test" for im in data["images"])
    sections = {b: _eccv_section(files) for b in ("eccv_caption", "cxc")}
    sections["karpathy"] = {k: v for k, v in _eccv_section(files).items() if k in ("annotations", "images", "split")}
    model = loaded[0]
    encoded_images = []
    original = model.encode_image
    monkeypatch.setattr(model, "encode_image", lambda x: encoded_images.append(len(x)) or original(x))
    benches = prepare(sections, ["karpathy", "eccv_caption", "cxc"])
    together, by_name = _run(loaded, benches)
    assert sum(encoded_images) == n_images
    assert by_name["karpathy"].image_emb is by_name["cxc"].image_emb
    for bench in benches:  # each benchmark's own ids (the Karpathy file's, or COCO caption ids)
        assert by_name[bench.name].caption_ids == [c for s in bench.samples() for c in s.caption_ids]
    for name in ("karpathy", "cxc"):
        alone, _ = _run(loaded, prepare(sections, [name]))
        assert alone == {k: v for k, v in together.items() if k.startswith(f"{name}/")}


def _write_assoc(folder: Path, i2t: dict, t2i: dict, prefix: str = "") -> None:
    folder.mkdir()
    (folder / f"{prefix}image_to_caption.json").write_text(json.dumps(i2t))
    (folder / f"{prefix}caption_to_image.json").write_text(json.dumps(t2i))


def test_association_ids_that_match_nothing(trained, loaded, tmp_path, capsys):
    files = trained["files"]
    i2t = json.loads((files / "eccv" / "image_to_caption.json").read_text())
    t2i = json.loads((files / "eccv" / "caption_to_image.json").read_text())
    # many unknown ids (another split's): an error naming how many and one of them
    _write_assoc(tmp_path / "bad", {**i2t, **{str(900000 + i): [1] for i in range(40)}}, t2i)
    benches = prepare({"eccv_caption": _eccv_section(files, extra_positives=str(tmp_path / "bad"))}, ["eccv_caption"])
    with pytest.raises(DataError, match=r"eccv_caption: 40 of \d+ ids .* match no image or caption .*image id 900000"):
        _run(loaded, benches)
    # a few (one id; the released names, eccv_*.json): a warning with the count, the rest evaluated
    _write_assoc(tmp_path / "few", {**i2t, "1": i2t["1"] + [123]}, t2i, prefix="eccv_")
    benches = prepare({"eccv_caption": _eccv_section(files, extra_positives=str(tmp_path / "few"))}, ["eccv_caption"])
    few, _ = _run(loaded, benches)
    assert "warning: benchmark.eccv_caption: 1 of" in capsys.readouterr().err
    assert few["eccv_caption/t2i_map@r"] == trained["check"]["benchmarks"]["eccv_caption/t2i_map@r"]
    assert few["eccv_caption/i2t_n_queries"] == N_TEST


def test_eccv_queries_are_the_keys_of_the_association_files(trained, loaded, tmp_path):
    files = trained["files"]
    i2t = json.loads((files / "eccv" / "image_to_caption.json").read_text())
    t2i = json.loads((files / "eccv" / "caption_to_image.json").read_text())
    _write_assoc(tmp_path / "sub", dict(list(i2t.items())[:10]), dict(list(t2i.items())[:7]))
    benches = prepare({"cxc": _eccv_section(files, extra_positives=str(tmp_path / "sub"))}, ["cxc"])
    out, encoded = _run(loaded, benches)
    assert out["cxc/i2t_n_queries"] == 10 and out["cxc/t2i_n_queries"] == 7
    assert encoded["cxc"].image_emb.shape[0] == N_TEST  # the gallery is the whole split


# --- text normalisation and templates ---------------------------------------------------------------------------


class Spy:
    """The run's tokenizer, recording every string it is given."""

    def __init__(self, tokenizer):
        self.tokenizer, self.seen = tokenizer, []
        self.max_len, self.vocab_size = tokenizer.max_len, tokenizer.vocab_size

    def __call__(self, texts):
        self.seen += list(texts)
        return self.tokenizer(texts)


def test_lowercasing_and_templates_reach_the_tokenizer(trained, loaded, tmp_path):
    model, loss, tokenizer, run = loaded
    files = trained["files"]
    data = json.loads((files / "karpathy" / "dataset_shapes.json").read_text())
    for im in data["images"]:
        im["sentences"][0]["raw"] = im["sentences"][0]["raw"].upper()
    upper = tmp_path / "upper.json"
    upper.write_text(json.dumps(data))
    section = {"annotations": str(upper), "images": str(files / "karpathy" / "images"), "split": "test"}
    (tmp_path / "t.txt").write_text("a photo of a {}.\nthe {} object\n")
    folder = {"root": str(files / "folder"), "classnames": str(files / "folder" / "classnames.txt"),
              "templates": str(tmp_path / "t.txt")}
    benches = [readers.read_karpathy(section, "karpathy"), readers.read_folder(folder)]
    for lower in (True, False):
        spy = Spy(tokenizer)
        evaluate_benchmarks(model, loss, spy, benches, image_size=run.data.image_size, lowercase=lower)
        captions = [im["sentences"][0]["raw"] for im in data["images"]]
        assert spy.seen[:N_TEST] == ([c.lower() for c in captions] if lower else captions)
        names = (files / "folder" / "classnames.txt").read_text().split("\n")[:-1]
        prompts = [fill_template(t, n) for t in ("a photo of a {}.", "the {} object") for n in names]
        assert spy.seen[N_TEST:] == prompts  # every class with every template, nothing else
    assert lowercase_for("auto", "word") and lowercase_for("auto", "byte") and not lowercase_for("auto", "hf:x")
    assert not lowercase_for(False, "word")
    with pytest.raises(ConfigError, match="benchmark.lowercase='yes'"):
        lowercase_for("yes", "word")
    # the default prompt ensemble: CLIP's 80 ImageNet templates, shipped as package data
    default = readers.read_folder({**folder, "templates": None})
    assert len(default.templates) == 80 and default.templates[0] == "a bad photo of a {}."


# --- webdataset and class folders -----------------------------------------------------------------------------


def test_wds_with_several_captions_per_image_and_folder_json_names(trained, loaded, tmp_path):
    import webdataset as wds

    samples = benchmark_check.read_split(str(trained["files"] / "wds" / "test" / "0.tar"))
    (tmp_path / "multi").mkdir()
    with wds.TarWriter(str(tmp_path / "multi" / "0.tar")) as sink:
        for s in samples[:12]:
            sink.write({"__key__": s["key"], "png": s["image"], "txt": f"{s['caption']}\n{s['caption'].upper()}\n"})
    bench = readers.read_wds({"shards": str(tmp_path / "multi" / "{0..0}.tar")})
    out, encoded = _run(loaded, [bench])
    assert encoded["wds"].text_emb.shape[0] == 24 and out["wds/t2i_n_queries"] == 24
    assert encoded["wds"].caption_image.tolist() == [i // 2 for i in range(24)]
    assert "wds/zeroshot_top1" not in out  # no .cls, no classnames: retrieval only
    # lower-cased, the two captions of an image are one string: both are positives, so i2t R@1 ties them free
    assert torch.equal(encoded["wds"].text_emb[0::2], encoded["wds"].text_emb[1::2])
    # class folders named by a JSON {dir: name}
    root = trained["files"] / "folder"
    names = {d.name: d.name.split("_", 1)[1].replace("_", " ") for d in root.iterdir() if d.is_dir()}
    (tmp_path / "names.json").write_text(json.dumps(names))
    by_json = readers.read_folder({"root": str(root), "classnames": str(tmp_path / "names.json"),
                                   "templates": str(root / "templates.txt")})
    by_txt = readers.read_folder({"root": str(root), "classnames": str(root / "classnames.txt"),
                                  "templates": str(root / "templates.txt")})
    assert by_json.classnames == by_txt.classnames


# --- one-line errors ----------------------------------------------------------------------------------------------


def test_config_errors_name_the_key_and_the_fix(trained, tmp_path):
    base = [f"checkpoint={trained['ckpt']}", f"eval.output={tmp_path / 'x.json'}"]
    cases = [
        (["benchmark=[karpathy]"], r"missing \(\?\?\?\): benchmark.karpathy.annotations, benchmark.karpathy.images"),
        (["benchmark=[karpathy]", "benchmark.folder.root=/x"],
         r"benchmark.folder.root is set but benchmark 'folder' is not selected; add it: benchmark=\[karpathy,folder\]"),
        (["benchmark=[karpathy]", "benchmark.karpathy.annotation=x"], r"Did you mean 'annotations'"),
        (["benchmark=[imagenet]"], r"unknown benchmark choice 'imagenet'.*cxc, eccv_caption, folder, karpathy, wds"),
        (_args(trained["files"], "karpathy")[:1] + ["benchmark.karpathy.annotations=/nope/d.json",
                                                    f"benchmark.karpathy.images={tmp_path}"],
         r"benchmark.karpathy.annotations=/nope/d.json: no such file"),
        (_args(trained["files"], "karpathy") + ["benchmark.karpathy.split=val"],
         r"benchmark.karpathy.split=val: no image .* its splits: test"),
        (_args(trained["files"], "karpathy")[:2] + [f"benchmark.karpathy.images={tmp_path}"],
         r"48 of 48 images of split test are missing"),
    ]
    for extra, message in cases:
        with pytest.raises((ConfigError, FileNotFoundError), match=message):
            evaluate_command(base + extra)
    assert not (tmp_path / "x.json").exists()
    with pytest.raises(ConfigError, match="eval.output and eval.save_embeddings are for benchmarks"):
        evaluate_command(base)


def test_the_command_fails_in_one_line_with_exit_2_and_writes_nothing(trained, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, str(REPO / "scripts" / "evaluate.py"), f"checkpoint={trained['ckpt']}",
                          *[a for a in _args(trained["files"], "eccv_caption") if "extra_positives" not in a],
                          f"benchmark.eccv_caption.extra_positives={tmp_path}"],
                         capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 2, out.stderr[-2000:]
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in out.stderr
    assert lines[0].startswith(f"config error: benchmark.eccv_caption.extra_positives={tmp_path}: no "
                               "image_to_caption.json (nor eccv_image_to_caption.json) there")
    assert not export_default_output(trained["ckpt"]).exists()


def export_default_output(path: Path) -> Path:
    from probloss.eval.benchmarks.run import default_output

    return default_output(path)
