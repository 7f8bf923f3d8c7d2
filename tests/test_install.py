"""probloss as an installed package: the wheel carries the configs and the `probloss` command, and trains from a
directory outside the repository (the import then comes from the wheel, never from this checkout)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import time
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _build_wheel(out: Path) -> Path:
    """``pip wheel`` of a copy of the checkout (building in place would leave build/ files in it)."""
    source = out / "source"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(".venv", ".git", "runs", "build", "dist", "*.egg-info",
                                                                "__pycache__", ".pytest_cache", ".cache"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
                    str(source), "-w", str(out / "wheel")], check=True, timeout=300)
    return next((out / "wheel").glob("probloss-*.whl"))


@pytest.mark.slow
def test_wheel_installs_and_trains_outside_the_repo(tmp_path):
    started = time.perf_counter()
    wheel = _build_wheel(tmp_path)
    names = zipfile.ZipFile(wheel).namelist()
    configs = sorted(str(p.relative_to(REPO)) for p in (REPO / "configs").rglob("*.yaml"))
    assert {"probloss/" + name for name in configs} <= set(names), "every config is package data"
    assert any(n.endswith("entry_points.txt") for n in names)

    # A fresh environment with the wheel alone; its dependencies are this environment's (a .pth line), so the
    # test needs no network and reuses the installed torch. No editable finder is loaded from that path.
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    Path(site, "outer_env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index",
                    "-q", str(wheel)], check=True, timeout=300)

    work = tmp_path / "elsewhere"  # no configs/, losses/ or probloss/ here
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "LT_CLI_USED", "PROBLOSS_CONFIG_DIR")}
    env.update(OMP_NUM_THREADS="1", PATH=f"{venv / 'bin'}:{env.get('PATH', '')}")
    where = subprocess.run([str(python), "-c", "import probloss, probloss.training.config as c; print(probloss.__file__); "
                            "print(c.config_dir()); print(probloss.list_losses())"],
                           cwd=work, env=env, capture_output=True, text=True, check=True).stdout.splitlines()
    assert where[0].startswith(site) and where[1].startswith(site), where
    assert "gaussian_var" in where[2] and "pcmepp" in where[2]

    out = subprocess.run(
        [str(venv / "bin" / "probloss"), "train", "loss=gaussian_var", f"out_dir={work / 'runs'}",
         f"data.cache_dir={work / 'cache'}", "data.train_size=128", "data.val_size=32", "data.test_size=32",
         "trainer.batch_size=16", "trainer.max_steps=3", "trainer.eval_every=0", "trainer.progress=false",
         "eval.projector_samples=0"],
        cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads(next((work / "runs").rglob("summary.json")).read_text())
    assert summary["steps"] == 3 and summary["status"] == "finished"
    bad = subprocess.run([str(venv / "bin" / "probloss"), "train", "trainer.max_step=3"], cwd=work, env=env,
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "Did you mean 'max_steps'" in bad.stderr
    print(f"wheel built, installed and trained 3 steps in {time.perf_counter() - started:.1f} s")


def test_console_command_lists_and_checks_its_commands(capsys):
    from probloss.cli import COMMANDS, main

    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    listing = capsys.readouterr().out
    assert exit_.value.code == 0 and all(f"  {name} " in listing for name in COMMANDS)
    with pytest.raises(SystemExit) as exit_:
        main(["tran"])
    assert exit_.value.code == 2 and "Did you mean 'train'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        main(["recipe", "--help"])
    assert exit_.value.code == 0 and "recipe=" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_:  # the old name of `recipe`, refused with the new spelling
        main(["experiment", "recipe=proposal"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip() == "probloss: the command 'experiment' is now 'recipe': probloss recipe recipe=proposal"
