"""recipes/*.ipynb: valid nbformat-4 JSON, and every `minioprd ...` command in a code cell parses (plan and
`distill --dry-run` commands are run, on builtin models where the recipe names hub models)."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import click
import pytest
import typer
from typer.testing import CliRunner

from minioprd.cli import app

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "recipes").glob("*.ipynb"))
runner = CliRunner()


def _load(path: Path) -> dict:
    return json.loads(path.read_text())


def _source(cell: dict) -> str:
    src = cell["source"]
    return src if isinstance(src, str) else "".join(src)


def commands(nb: dict) -> list[list[str]]:
    """`minioprd` shell commands of the code cells (`!minioprd ...`, also commented-out ones), as argv lists."""
    out = []
    for cell in nb["cells"]:
        if cell["cell_type"] != "code":
            continue
        text = _source(cell).replace("\\\n", " ")
        for line in text.splitlines():
            line = line.strip().removeprefix("#").strip()
            if line.startswith("!minioprd "):
                out.append(shlex.split(line[1:]))
    return out


def test_there_are_notebooks():
    assert {p.name for p in NOTEBOOKS} >= {"colab.ipynb", "kaggle.ipynb"}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_is_valid_nbformat4(path):
    nb = _load(path)
    assert nb["nbformat"] == 4 and isinstance(nb["nbformat_minor"], int)
    assert nb["metadata"]["kernelspec"]["language"] == "python"
    ids = [c.get("id") for c in nb["cells"]]
    if nb["nbformat_minor"] >= 5:  # cell ids are required from 4.5 on, and must be unique
        assert all(isinstance(i, str) and 1 <= len(i) <= 64 for i in ids) and len(set(ids)) == len(ids)
    for cell in nb["cells"]:
        assert cell["cell_type"] in ("code", "markdown", "raw")
        assert isinstance(cell["metadata"], dict)
        assert isinstance(cell["source"], (str, list))
        if isinstance(cell["source"], list):
            assert all(isinstance(s, str) for s in cell["source"])
        if cell["cell_type"] == "code":  # shipped clean: no outputs, never run
            assert cell["outputs"] == [] and cell["execution_count"] is None
    kinds = [c["cell_type"] for c in nb["cells"]]
    assert "markdown" in kinds and "code" in kinds
    text = "".join(_source(c) for c in nb["cells"])
    for step in ("pip install", "minioprd plan", "minioprd distill", "minioprd eval", "minioprd merge",
                 "minioprd report", "display(Image"):
        assert step in text, f"{path.name} lacks {step!r}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_every_command_parses(path):
    group = typer.main.get_command(app)
    cmds = commands(_load(path))
    assert len(cmds) >= 6
    for argv in cmds:
        assert argv[0] == "minioprd" and argv[1] in group.commands, argv
        sub = group.commands[argv[1]]
        try:  # strict parsing: unknown options, missing values and bad types all fail here
            sub.make_context(argv[1], list(argv[2:]))
        except click.ClickException as e:
            pytest.fail(f"{path.name}: `{shlex.join(argv)}` does not parse: {e.format_message()}")
        if "--recipe" in argv:
            assert (ROOT / argv[argv.index("--recipe") + 1]).is_file(), argv


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_plan_and_dry_run_commands_run(path):
    ran = 0
    for argv in commands(_load(path)):
        args = argv[1:]
        if args[0] == "plan":
            r = runner.invoke(app, [a if not a.startswith("recipes/") else str(ROOT / a) for a in args])
            assert r.exit_code == 0, (argv, r.output)
            assert "fits on" in r.output, (argv, r.output)  # the notebook's settings fit its card
        elif args[0] == "distill" and "--dry-run" in args:
            args = [a if not a.startswith("recipes/") else str(ROOT / a) for a in args]
            args += ["--teacher", "builtin:tiny-teacher", "--student", "builtin:tiny-student"]
            r = runner.invoke(app, args)
            assert r.exit_code == 0, (argv, r.output)
        else:
            continue
        ran += 1
    assert ran >= 2
