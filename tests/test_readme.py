"""README stays true: the two commands, every setting in the configuration tables, and every
command-line option in the command table."""
import argparse
import re
from dataclasses import fields
from pathlib import Path

import pytest

from backend.settings import settings_table
from training.train import TrainConfig

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()


def test_the_two_commands():
    assert "docker compose up" in README
    assert "scripts/test" in README
    assert (REPO / ".ci" / "run").read_text().strip().endswith("exec scripts/test")


def test_the_command_table_covers_every_option():
    """Each `toothseg` command has a row in README's command table naming each of its options."""
    from training.ops.cli import build_parser

    section = README.split("### Command line", 1)[1].split("\n### ", 1)[0]
    rows = {line.split("`")[1].split()[1]: line for line in section.splitlines() if line.startswith("| `toothseg ")}
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    missing = [name for name in commands if name not in rows]
    for name, command in commands.items():
        for action in command._actions:
            options = [o for o in action.option_strings if o.startswith("--") and o != "--help"]
            if options and name in rows and not any(re.search(rf"{o}\b(?!-)", rows[name]) for o in options):
                missing.append(f"{name} {options[0]}")
    missing += [o for a in parser._actions for o in a.option_strings[:1] if o != "-h" and f"`toothseg {o}" not in section]
    assert not missing, f"not in README's command table: {missing}"


def test_every_setting_is_documented_with_its_default():
    for env, default, doc in settings_table():
        row = next((line for line in README.splitlines() if line.startswith(f"| `{env}` |")), None)
        assert row is not None, f"{env} missing from README's configuration table"
        assert (f"`{default}`" if default else "(empty)") in row, f"{env}: README default differs from {default!r}"
        assert doc in row, f"{env}: README description differs from backend/settings.py"
    for f in fields(TrainConfig):
        assert f"`TRAIN_{f.name.upper()}`" in README, f"TRAIN_{f.name.upper()} missing from README"


def scenario_tests() -> list[tuple[str, str, str]]:
    """(tried, happened, file) of every test marked `scenario`, from the test sources."""
    import ast

    rows = []
    for path in sorted((REPO / "tests").glob("test_*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "scenario":
                tried, happened = (ast.literal_eval(a) for a in node.args)
                rows.append((tried, happened, path.name))
    return rows


def test_readme_lists_every_scenario_test():
    rows = scenario_tests()
    assert len(rows) >= 17
    for tried, happened, name in rows:
        assert f"| {tried} | {happened} | `tests/{name}` |" in README, f"README lacks: {tried}"


@pytest.mark.last
def test_every_scenario_passed_in_this_session(request):
    """README's "What we tried" table is true of this run: each of its tests passed in this very
    session (runs last; in a session that did not run them all, there is nothing to check)."""
    import conftest

    ran = request.config._scenario_items
    rows = conftest.scenario_rows(ran)
    expected = {(tried, happened) for tried, happened, _ in scenario_tests()}
    if not expected <= set(rows):
        pytest.skip("this session did not run every scenario test")
    failed = [tried for (tried, happened), result in rows.items() if result != "yes"]
    assert not failed, f"scenario tests that did not pass in this session: {failed}"
