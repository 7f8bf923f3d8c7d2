"""timm image towers and Hugging Face text towers (probloss/models/towers.py), built without a network: random
weights from configs, weights saved to and reloaded from local files, a local tokenizer folder; and locking (LiT).
The towers extra is part of the dev install (README), so these tests run, never skip, in CI.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from probloss.errors import ConfigError
from probloss.models.towers import PAD, import_timm, import_transformers
from probloss.training.builders import make_optimizer, make_tokenizer, make_trainee
from probloss.training.config import compose_config
from probloss.training.loop import main, train_step
from probloss.training.settings import RunSettings

# A locked timm tower with the tiny text tower, on 32 px shapes: test_resnet is timm's own test-sized ResNet.
LIT_SHAPES = ["model=lit_shapes", "model.image_tower=timm:test_resnet", "model.image_input_size=32"]


def make_hf_folder(folder: Path, layers: int = 2) -> Path:
    """A local Hugging Face text model: a word-level tokenizer over the shapes words ([CLS] ... [SEP]) and a
    tiny random BERT, both saved with save_pretrained, as a downloaded model folder looks."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    from probloss.data.shapes import caption_words

    transformers = import_transformers()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
    vocab = {w: i for i, w in enumerate(specials + caption_words())}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2),
                                                                                                 ("[SEP]", 3)])
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                                         sep_token="[SEP]", model_max_length=24).save_pretrained(folder)
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=layers,
                                     num_attention_heads=2, intermediate_size=64, max_position_embeddings=32)
    transformers.BertModel(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    return make_hf_folder(tmp_path_factory.mktemp("hf") / "bert-shapes")


@pytest.fixture(scope="module")
def timm_weights(tmp_path_factory):
    """A state dict of timm's test_resnet (seeded random weights) saved as .safetensors: local pretrained weights."""
    from safetensors.torch import save_file

    torch.manual_seed(1)
    model = import_timm().create_model("test_resnet", num_classes=0)
    path = tmp_path_factory.mktemp("timm") / "test_resnet.safetensors"
    save_file(model.state_dict(), str(path))
    return path


def build(overrides):
    run = RunSettings.from_config(compose_config(overrides))
    tokenizer = make_tokenizer(run)
    return run, tokenizer, make_trainee(run, tokenizer)


# --- building and preprocessing ------------------------------------------------------------------------------


def test_timm_tower_from_config_takes_its_preprocessing_from_the_pretrained_config():
    timm = import_timm()
    cfg = compose_config(["model=lit_shapes", "model.image_tower=timm:test_vit", "model.image_pretrained=null",
                          "model.image_input_size=null"])
    expected = timm.get_pretrained_cfg("test_vit").to_dict()
    assert cfg.model.image_input_size == expected["input_size"][-1] == 160
    assert list(cfg.model.image_mean) == list(expected["mean"])
    assert list(cfg.model.image_std) == list(expected["std"])
    assert cfg.model.image_interpolation == expected["interpolation"]

    run = RunSettings.from_config(cfg)
    trainee = make_trainee(run, make_tokenizer(run))
    tower = trainee.model.image_tower
    assert tower.width == tower.model.num_features
    assert tower(torch.rand(2, 3, 32, 32) * 2 - 1).shape == (2, tower.width)  # 32 px resized to 160


def test_timm_tower_resizes_and_normalises_as_the_model_was_trained():
    """The loader's [-1, 1] images become the model's input: resized with its interpolation, then (x - mean) / std."""
    from probloss.models.towers import TimmImageTower

    tower = TimmImageTower("test_resnet", input_size=48, mean=(0.1, 0.2, 0.3), std=(0.5, 0.6, 0.7),
                           interpolation="bilinear").eval()
    seen = []
    tower.model.register_forward_pre_hook(lambda _, args: seen.append(args[0]))
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    tower(images)
    pixels = torch.nn.functional.interpolate(images * 0.5 + 0.5, size=(48, 48), mode="bilinear", align_corners=False)
    mean, std = torch.tensor([0.1, 0.2, 0.3]).view(1, 3, 1, 1), torch.tensor([0.5, 0.6, 0.7]).view(1, 3, 1, 1)
    torch.testing.assert_close(seen[0], (pixels - mean) / std)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_timm_weights_saved_to_a_local_file_load_back(suffix, tmp_path, timm_weights):
    from safetensors.torch import load_file

    state = load_file(str(timm_weights))
    path = timm_weights if suffix == ".safetensors" else tmp_path / "weights.pth"
    if suffix == ".pth":
        torch.save({"state_dict": state}, path)  # the wrapped form training scripts write
    _, _, trainee = build([*LIT_SHAPES, f"model.image_pretrained={path}"])
    loaded = trainee.model.image_tower.model.state_dict()
    for name, value in state.items():
        torch.testing.assert_close(loaded[name], value, rtol=0, atol=0, msg=name)


def test_unknown_timm_name_and_missing_weights_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="timm has no model 'resnet1800'.*resnet18"):
        compose_config(["model=lit_shapes", "model.image_tower=timm:resnet1800", "model.image_pretrained=null"])
    with pytest.raises(ConfigError, match="no such file"):
        build([*LIT_SHAPES, f"model.image_pretrained={tmp_path / 'absent.safetensors'}"])


def test_vit_weights_load_at_another_input_size_through_timms_own_conversion(tmp_path):
    """test_vit saved at its pretrained 160 px loads at 32 px: timm's checkpoint filter resamples the positions."""
    from safetensors.torch import save_file

    torch.manual_seed(2)
    source = import_timm().create_model("test_vit", num_classes=0)
    save_file(source.state_dict(), str(tmp_path / "vit.safetensors"))
    _, _, trainee = build([*LIT_SHAPES, "model.image_tower=timm:test_vit",
                           f"model.image_pretrained={tmp_path / 'vit.safetensors'}"])
    loaded = trainee.model.image_tower.model.state_dict()
    assert loaded["pos_embed"].shape != source.state_dict()["pos_embed"].shape
    for name, value in source.state_dict().items():
        if name != "pos_embed":
            torch.testing.assert_close(loaded[name], value, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("damage", ["cut", "junk"])
def test_an_unreadable_weights_file_is_a_config_error(damage, tmp_path, timm_weights):
    path = tmp_path / ("weights.safetensors" if damage == "cut" else "weights.pth")
    path.write_bytes(timm_weights.read_bytes()[:5000] if damage == "cut" else b"not a checkpoint\n")
    with pytest.raises(ConfigError, match=f"cannot read {path} as a state dict of timm:test_resnet"):
        build([*LIT_SHAPES, f"model.image_pretrained={path}"])


def test_weights_of_another_architecture_are_refused(timm_weights):
    """timm alone would load them non-strictly (the class head is dropped) and only log that nothing fit."""
    with pytest.raises(ConfigError, match="does not fit timm:test_vit"):
        build([*LIT_SHAPES, "model.image_tower=timm:test_vit", f"model.image_pretrained={timm_weights}"])


def test_nothing_is_downloaded_unless_allowed(tmp_path, monkeypatch, timm_weights):
    """A name whose weights are not in the local cache is an error that names both ways out; no network call.
    Weights that are in the cache load from it."""
    import huggingface_hub
    from safetensors.torch import load_file

    asked = []

    def cache(repo_id, filename, **kwargs):  # a cache holding timm's test_resnet weights only
        asked.append((repo_id, filename))
        return str(timm_weights) if repo_id == "timm/test_resnet.r160_in1k" else None

    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", cache)
    _, _, trainee = build([*LIT_SHAPES, "model.image_pretrained=true"])
    torch.testing.assert_close(trainee.model.image_tower.model.state_dict()["conv1.0.weight"],
                               load_file(str(timm_weights))["conv1.0.weight"], rtol=0, atol=0)
    with pytest.raises(ConfigError, match="not in the local Hugging Face cache.*allow_download=true"):
        build([*LIT_SHAPES, "model.image_tower=timm:test_vit", "model.image_pretrained=true"])
    assert ("timm/test_vit.r160_in1k", "model.safetensors") in asked
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # belt and braces: a request would fail loudly, not hang
    with pytest.raises(ConfigError, match="hf:probloss-test/no-such-model.*allow_download=true"):
        compose_config(["model=lit", "model.image_pretrained=null", "model.text_tower=hf:probloss-test/no-such-model"])


def test_a_missing_extra_is_a_one_line_error_naming_the_pip_command(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "timm", None)  # `import timm` raises ImportError
    with pytest.raises(ConfigError, match=r'needs timm, which is not installed: pip install .*probloss\[towers\]'):
        compose_config(["model=lit_shapes", "model.image_pretrained=null"])


def test_hf_tower_and_its_tokenizer_from_a_local_folder(hf_folder):
    transformers = import_transformers()
    overrides = ["model=lit", "model.image_tower=timm:test_resnet", "model.image_pretrained=null",
                 f"model.text_tower=hf:{hf_folder}", "model.embed_dim=16"]
    cfg = compose_config([*overrides, "data.max_len=null"])
    assert cfg.data.tokenizer == f"hf:{hf_folder}" and cfg.data.max_len == 24  # the tokenizer's own maximum
    assert compose_config(overrides).data.max_len == 16  # the data's own, shorter
    with pytest.raises(ConfigError, match="data.max_len=30 is longer than the 24 tokens"):
        compose_config([*overrides, "data.max_len=30"])

    run, tokenizer, trainee = build([*overrides, "data.max_len=null"])
    tokens = tokenizer(["a red circle left of a blue square", "a circle"])
    assert tokens.shape == (2, 24) and tokens[1, 4:].eq(PAD).all() and tokens[1, 0] == 2 and tokens[1, 3] == 3

    tower = trainee.model.text_tower
    assert tower.pool == "cls" and tower.width == 32
    reference = transformers.AutoModel.from_pretrained(hf_folder).eval()
    loaded = tower.model.state_dict()
    assert {n for n in reference.state_dict() if n not in loaded} == {"pooler.dense.weight", "pooler.dense.bias"}
    for name, value in loaded.items():  # text_pretrained=true: the folder's weights
        torch.testing.assert_close(value, reference.state_dict()[name], rtol=0, atol=0, msg=name)
    tower.eval()
    mask = tokens != PAD
    expected = reference(input_ids=tokens.clamp_min(0), attention_mask=mask.long()).last_hidden_state[:, 0]
    torch.testing.assert_close(tower(tokens), expected)

    random = build([*overrides, "model.text_pretrained=false"])[2].model.text_tower
    assert not torch.equal(random.model.embeddings.word_embeddings.weight,
                           reference.embeddings.word_embeddings.weight)


@pytest.mark.parametrize("tower", ["timm:test_vit", "hf"])
def test_gradients_reach_every_parameter_of_a_tower_by_name(tower, hf_folder):
    from probloss.models.tokenizer import HFTokenizer
    from probloss.models.towers import HFTextTower, TimmImageTower

    torch.manual_seed(0)
    if tower == "hf":
        tokenizer = HFTokenizer(str(hf_folder))
        module = HFTextTower(str(hf_folder), tokenizer.vocab_size, tokenizer.max_len, pretrained=True)
        inputs = tokenizer(["a red circle", "a big blue square left of a small green triangle"])
        assert module.model.pooler is None  # pooled at [CLS]: the pooler is dropped, not left without gradients
    else:
        module, inputs = TimmImageTower("test_vit", input_size=32), torch.rand(2, 3, 32, 32) * 2 - 1
    out = module(inputs)
    (out * torch.randn_like(out)).sum().backward()
    for name, p in module.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_a_damaged_hf_folder_is_a_config_error(tmp_path, hf_folder):
    import shutil

    damaged = tmp_path / "damaged"
    shutil.copytree(hf_folder, damaged)
    (damaged / "model.safetensors").write_bytes((hf_folder / "model.safetensors").read_bytes()[:3000])
    with pytest.raises(ConfigError, match=f"cannot load the weights of hf:{damaged} from that folder"):
        build(["model=lit", "model.image_tower=timm:test_resnet", "model.image_pretrained=null",
               f"model.text_tower=hf:{damaged}"])


def test_an_hf_tokenizer_without_its_tower_is_a_config_error(hf_folder):
    with pytest.raises(ConfigError, match="goes with its own text tower"):
        compose_config([f"data.tokenizer=hf:{hf_folder}"])


# --- locking (LiT) -------------------------------------------------------------------------------------------


def _steps(trainee, run, n=3, accum_steps=1, seed=0):
    from lightning_fabric import Fabric

    fabric = Fabric(accelerator="cpu", devices=1, precision="32-true")
    optimizer = make_optimizer(trainee, run.trainer)
    trainee, optimizer = fabric.setup(trainee, optimizer)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(n):
        trainee.train()
        batch = {"image": torch.rand(8, 3, 32, 32, generator=gen) * 2 - 1,
                 "tokens": torch.randint(3, 30, (8, 16), generator=gen)}
        assert train_step(fabric, trainee, optimizer, batch, grad_clip=1.0, accum_steps=accum_steps).finite
    return trainee, optimizer


def test_a_locked_tower_does_not_change_and_the_optimiser_holds_none_of_it(timm_weights):
    run, _, trainee = build([*LIT_SHAPES, f"model.image_pretrained={timm_weights}", "trainer.lr=0.01"])
    tower = trainee.model.image_tower
    before = copy.deepcopy(trainee.state_dict())
    optimizer_params = {id(p) for group in make_optimizer(trainee, run.trainer).param_groups for p in group["params"]}
    assert not any(id(p) in optimizer_params for p in tower.parameters())
    assert all(not p.requires_grad for p in tower.parameters())

    trained, _ = _steps(trainee, run)
    assert not tower.training and trained.training  # eval mode inside a model in train mode
    after = trainee.state_dict()
    for name, value in before.items():
        unchanged = torch.equal(after[name], value)
        assert unchanged == name.startswith("model.image_tower."), name  # the rest trains
    assert any(k.endswith("running_mean") for k in before if k.startswith("model.image_tower."))  # BN stats kept


@pytest.mark.parametrize("modality", ["image", "text"])
def test_partly_unlocked_towers_train_only_their_last_groups(modality, hf_folder):
    key = "model.lock_image_unlocked_groups=1" if modality == "image" else "model.lock_text_unlocked_layers=1"
    run, _, trainee = build(["model=lit", "model.image_tower=timm:test_vit", "model.image_pretrained=null",
                             "model.image_input_size=32", f"model.text_tower=hf:{hf_folder}", "model.lock_text=true",
                             "model.embed_dim=16", key])
    tower = getattr(trainee.model, f"{modality}_tower")
    groups = tower.param_groups()
    trainable = {n for n, p in tower.named_parameters() if p.requires_grad}
    assert trainable == set(groups[-1])
    if modality == "text":  # the last layer (BERT pooled at [CLS] keeps no pooler)
        assert trainable and all(".layer.1." in n for n in trainable)
    else:  # timm's last coarse group of a ViT: its last block and the final norm after it
        last = max(int(n.split(".")[2]) for n, _ in tower.named_parameters() if n.startswith("model.blocks."))
        assert {n.split(".")[1] for n in trainable} == {"blocks", "norm"}
        assert all(n.startswith(f"model.blocks.{last}.") for n in trainable if ".blocks." in n)
    before = {n: p.detach().clone() for n, p in tower.named_parameters()}
    _steps(trainee, run, n=2)
    changed = {n for n, p in tower.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= trainable


def test_unlocking_needs_a_lock_and_a_sensible_count():
    with pytest.raises(ConfigError, match="set lock_image=true"):
        build([*LIT_SHAPES, "model.image_pretrained=null", "model.lock_image=false", "model.lock_image_unlocked_groups=1"])
    with pytest.raises(ConfigError, match="unlock between 1 and"):
        build([*LIT_SHAPES, "model.image_pretrained=null", "model.lock_image_unlocked_groups=99"])


def test_grad_cache_runs_a_locked_tower_once_per_micro_batch_with_the_same_update(timm_weights):
    """GradCache encodes each micro-batch twice; the locked tower's features come from the cache the second time,
    and the update equals the uncached one (the cache off: nothing kept, every lookup missed)."""
    overrides = [*LIT_SHAPES, f"model.image_pretrained={timm_weights}", "trainer.accum_steps=2"]
    results = []
    for cache in (True, False):
        torch.manual_seed(0)
        run, _, trainee = build(overrides)
        calls = []
        trainee.model.image_tower.register_forward_hook(lambda *_: calls.append(1))
        if not cache:
            trainee.model._feature_caches["image"].put = lambda inputs, value: value
        _steps(trainee, run, n=2, accum_steps=2)
        results.append((len(calls), {n: p.detach().clone() for n, p in trainee.named_parameters()}))
    (cached_calls, cached), (plain_calls, plain) = results
    assert (cached_calls, plain_calls) == (4, 8)  # 2 steps x 2 micro-batches, against twice that
    for name in plain:
        torch.testing.assert_close(cached[name], plain[name], rtol=0, atol=0, msg=name)


# --- end to end ----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_short_lit_run_on_shapes_with_a_locked_timm_tower(tmp_path, cache_dir, timm_weights):
    """A few steps; the locked tower ends as the file's weights; its config records the preprocessing; the
    checkpoint evaluates and resumes without the weights file."""
    import shutil

    import yaml
    from safetensors.torch import load_file

    from probloss.training.checkpoint import newest_checkpoint, read_checkpoint
    from probloss.training.evaluation import evaluate_checkpoint

    weights = tmp_path / "weights.safetensors"
    shutil.copy(timm_weights, weights)
    overrides = [*LIT_SHAPES, f"model.image_pretrained={weights}", "loss=sigmoid", f"out_dir={tmp_path}",
                 f"data.cache_dir={cache_dir}", "data.train_size=512", "data.val_size=64", "data.test_size=64",
                 "trainer.batch_size=32", "trainer.eval_every=0", "trainer.progress=false", "eval.projector_samples=0",
                 "run_name=lit"]
    summary = main([*overrides, "trainer.max_steps=6"])
    assert summary["status"] == "finished" and summary["steps"] == 6
    run_dir = Path(summary["run_dir"])
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["model"]["image_input_size"] == 32 and config["model"]["image_interpolation"] == "bilinear"
    assert len(config["model"]["image_mean"]) == 3  # resolved from timm's pretrained config, recorded
    saved = read_checkpoint(newest_checkpoint(run_dir))["model"]
    for name, value in load_file(str(weights)).items():  # the locked tower is the file's, after training
        torch.testing.assert_close(saved[f"model.image_tower.model.{name}"], value, rtol=0, atol=0, msg=name)
    weights.unlink()  # the checkpoint holds the tower: evaluating it needs no weights file
    metrics = evaluate_checkpoint(newest_checkpoint(run_dir))
    assert metrics["val/i2t_r@1"] == pytest.approx(summary["val/i2t_r@1"], abs=1e-9)
    assert main([*overrides, "trainer.max_steps=8", "resume=auto"])["steps"] == 8


@pytest.mark.slow
def test_short_run_with_an_hf_text_tower_records_its_tokenizer(tmp_path, cache_dir, hf_folder):
    summary = main(["model=lit", "model.image_tower=timm:test_resnet", "model.image_pretrained=null",
                    "model.image_input_size=32", f"model.text_tower=hf:{hf_folder}", "model.embed_dim=16",
                    "data.max_len=null", "loss=gaussian_var", f"out_dir={tmp_path}", f"data.cache_dir={cache_dir}",
                    "data.train_size=512", "data.val_size=64", "data.test_size=64", "trainer.batch_size=32",
                    "trainer.max_steps=4", "trainer.eval_every=0", "trainer.progress=false",
                    "eval.projector_samples=0", "data.num_workers=1"])
    assert summary["status"] == "finished"
    import yaml

    config = yaml.safe_load((Path(summary["run_dir"]) / "config.yaml").read_text())
    assert config["data"]["tokenizer"] == f"hf:{hf_folder}" and config["data"]["max_len"] == 24


@pytest.mark.slow
def test_two_ranks_train_a_locked_timm_tower_and_a_partly_unlocked_hf_tower(tmp_path, cache_dir, hf_folder,
                                                                          timm_weights):
    """Real DDP (gloo, 2 processes) with GradCache: DDP must see a gradient for every trained parameter (an
    unused BERT pooler would stop it), and the locked tower's cached features must serve both passes."""
    import os
    import subprocess
    import sys

    from probloss.training.checkpoint import newest_checkpoint, read_checkpoint
    from probloss.testing import free_port

    args = ["model=lit", "model.image_tower=timm:test_resnet", "model.image_input_size=32",
            f"model.image_pretrained={timm_weights}", f"model.text_tower=hf:{hf_folder}",
            "model.lock_text=true", "model.lock_text_unlocked_layers=1", "model.embed_dim=16", "loss=sigmoid",
            "trainer.accum_steps=2", f"out_dir={tmp_path}", f"data.cache_dir={cache_dir}", "data.train_size=512",
            "data.val_size=64", "data.test_size=64", "trainer.batch_size=32", "trainer.max_steps=3",
            "trainer.eval_every=0", "trainer.progress=false", "eval.projector_samples=0"]
    env = {k: v for k, v in os.environ.items() if k != "LT_CLI_USED"}
    out = subprocess.run([str(Path(sys.executable).parent / "fabric"), "run", "--accelerator=cpu", "--devices=2",
                          f"--main-port={free_port()}", str(Path(__file__).parents[2] / "scripts" / "train.py"), *args],
                         env={**env, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=400)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    run_dir = next((tmp_path / "default" / "sigmoid").iterdir())
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 3
    reference = import_transformers().AutoModel.from_pretrained(hf_folder).state_dict()
    saved = read_checkpoint(newest_checkpoint(run_dir))["model"]
    text = {k[len("model.text_tower.model."):]: v for k, v in saved.items() if k.startswith("model.text_tower.model.")}
    for name, value in text.items():  # the locked layers kept the folder's weights, the unlocked one trained
        assert torch.equal(value, reference[name]) == (".layer.1." not in name), name
