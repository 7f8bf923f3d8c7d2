"""The walls of docs/design.md, checked on the source: imports run one way through the layers (errors, loss
library -> losses -> models -> data -> eval -> training -> studies -> command line), no import circle, no probloss
import inside a function, and only probloss/dist.py talks to torch.distributed."""

import importlib.util
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _import_graph():
    spec = importlib.util.spec_from_file_location("import_graph", REPO / "scripts" / "import_graph.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


GRAPH = _import_graph()


@pytest.fixture(scope="module")
def measured():
    return GRAPH.measure()


def test_no_lower_layer_imports_a_higher_one(measured):
    assert measured["upward_imports"] == [], "\n".join(
        f"{u['where']}: {u['from']} (layer {GRAPH.layer_of(u['from'])}) imports {u['to']} "
        f"(layer {GRAPH.layer_of(u['to'])})" for u in measured["upward_imports"])


def test_no_import_circle(measured):
    assert measured["circles"] == []


def test_no_probloss_import_inside_a_function(measured):
    inside = [i["where"] for i in measured["inside_functions"] if i["internal"]]
    assert inside == [], "move these imports to the top of their module:\n" + "\n".join(inside)


def test_every_module_has_a_layer(measured):
    for module in measured["graph"]:
        GRAPH.layer_of(module)  # raises for a module outside every layer (a new top-level folder)


def test_the_checker_sees_an_upward_import_and_a_circle(tmp_path, monkeypatch):
    """The measurement on a hand-made package: data importing training is upward, a <-> b is a circle, and an
    import in a def is counted."""
    for folder in ("probloss/data", "probloss/training", "losses"):
        (tmp_path / folder).mkdir(parents=True)
    (tmp_path / "probloss/__init__.py").write_text("")
    (tmp_path / "probloss/a.py").write_text("from probloss import b\n")
    (tmp_path / "probloss/b.py").write_text("import probloss.a\n")
    (tmp_path / "probloss/data/__init__.py").write_text("")
    (tmp_path / "probloss/data/reader.py").write_text("def f():\n    from probloss.training.loop import g\n")
    (tmp_path / "probloss/training/__init__.py").write_text("")
    (tmp_path / "probloss/training/loop.py").write_text("from probloss.data import reader\n")
    monkeypatch.setattr(GRAPH, "REPO", tmp_path)
    result = GRAPH.measure()
    assert result["circles"] == [["probloss.a", "probloss.b"], ["probloss.data.reader", "probloss.training.loop"]]
    assert [(u["from"], u["to"]) for u in result["upward_imports"]] == [("probloss.data.reader",
                                                                          "probloss.training.loop")]
    assert [i["where"] for i in result["inside_functions"]] == [str(Path("probloss/data/reader.py")) + ":2"]


def test_only_dist_talks_to_torch_distributed():
    """Every torch.distributed call and Fabric collective goes through probloss/dist.py."""
    offenders = []
    for folder in ("probloss", "losses", "scripts"):
        for path in (REPO / folder).rglob("*.py"):
            if path.name == "dist.py" and path.parent.name == "probloss":
                continue
            for number, line in enumerate(path.read_text().splitlines(), 1):
                code = line.split("#")[0]
                if re.search(r"import torch\.distributed|torch\.distributed\.|from torch import distributed"
                             r"|fabric\.(all_reduce|all_gather|broadcast|barrier)\(", code):
                    offenders.append(f"{path.relative_to(REPO)}:{number}: {line.strip()}")
    assert not offenders, "\n".join(offenders)
