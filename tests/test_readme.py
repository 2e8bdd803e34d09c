"""README stays true: the two commands, and every setting in the configuration tables."""
from dataclasses import fields
from pathlib import Path

from backend.settings import settings_table
from training.train import TrainConfig

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()


def test_the_two_commands():
    assert "docker compose up" in README
    assert "scripts/test" in README
    assert (REPO / ".ci" / "run").read_text().strip().endswith("exec scripts/test")


def test_every_setting_is_documented_with_its_default():
    for env, default, doc in settings_table():
        row = next((line for line in README.splitlines() if line.startswith(f"| `{env}` |")), None)
        assert row is not None, f"{env} missing from README's configuration table"
        assert (f"`{default}`" if default else "(empty)") in row, f"{env}: README default differs from {default!r}"
        assert doc in row, f"{env}: README description differs from backend/settings.py"
    for f in fields(TrainConfig):
        assert f"`TRAIN_{f.name.upper()}`" in README, f"TRAIN_{f.name.upper()} missing from README"


def test_hardening_table_matches_the_scenario_tests_and_their_last_results():
    """README's "What we tried" table lists every `scenario` test, and the last whole test session
    (bench/results/hardening.md) passed each of them."""
    import ast

    rows = []
    for path in sorted((REPO / "tests").glob("test_*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "scenario":
                tried, happened = (ast.literal_eval(a) for a in node.args)
                rows.append((tried, happened))
                assert f"| {tried} | {happened} | `tests/{path.name}` |" in README, f"README lacks: {tried}"
    assert len(rows) >= 17
    table = (REPO / "bench" / "results" / "hardening.md").read_text()
    for tried, happened in rows:
        assert f"| {tried} | {happened} | yes |" in table, f"hardening.md: not passed in the last session: {tried}"
