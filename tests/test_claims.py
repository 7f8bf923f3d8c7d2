"""The README's claims about results are the committed comparisons' verdicts, and docs/findings.md is generated
from the committed results (docs/results/) byte for byte."""

import json
from pathlib import Path

import yaml

from probloss.studies.findings import findings, read_claims
from probloss.studies.render import claims_lines

REPO = Path(__file__).resolve().parents[1]


def test_every_readme_claim_names_a_comparison_and_copies_its_verdict():
    claims = read_claims(REPO / "docs" / "results")
    assert claims, "docs/results/claims.yaml lists no claim"
    readme = (REPO / "README.md").read_text()
    for claim in claims:
        assert claim["row"] is not None, f"no comparison {claim} in docs/results/{claim['recipe']}/comparisons.json"
        assert claim["claim"] in readme, f"not in the README verbatim: {claim['claim']}"
        assert f"**{claim['row']['verdict']}**" in claim["claim"], (claim["claim"], claim["row"]["verdict"])


def test_the_findings_page_is_generated_from_the_committed_results(monkeypatch):
    monkeypatch.chdir(REPO)  # the page prints its sources' paths as given: docs/results/...
    assert (REPO / "docs" / "findings.md").read_text() == findings("docs/results") + "\n", (
        "regenerate it: python scripts/report.py --findings docs/results > docs/findings.md")


def test_a_claim_without_its_comparison_is_shown_as_such(tmp_path):
    (tmp_path / "r").mkdir()
    row = {"arm": "a", "baseline": "b", "metric": "m", "mean_diff": 0.1, "ci_low": 0.05, "ci_high": 0.15, "n": 4,
           "verdict": "better", "primary": True}
    (tmp_path / "r" / "comparisons.json").write_text(json.dumps([row]))
    (tmp_path / "claims.yaml").write_text(yaml.safe_dump([
        {"claim": "a beats b (**better**)", "recipe": "r", "arm": "a", "baseline": "b", "metric": "m"},
        {"claim": "a beats c", "recipe": "r", "arm": "a", "baseline": "c", "metric": "m"}]))
    claims = read_claims(tmp_path)
    assert claims[0]["row"] == row and claims[1]["row"] is None
    lines = claims_lines(claims)
    assert "| a beats b (**better**) | r: a − b, m (primary) | +0.100 [+0.050, +0.150] | 4 | better |" in lines
    assert "| a beats c | r: a − c, m | no such comparison | - | - |" in lines
