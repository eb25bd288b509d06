"""The README's first two commands are the ones CI runs, and every code block of README.md and
docs/*.md is run: Python blocks as they are, ``fedspine`` commands as ``fedspine run --check``
(their config, model shape and data are checked; nothing trains); the rest are listed in
``NOT_RUN`` with the reason."""

import os
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# Commands the test does not run, by their first word(s), and why.
NOT_RUN = {
    "bash scripts/setup.sh": "builds the venv; CI runs it",
    "python -m pytest": "the test suite itself",
    "python experiments/": "an experiment (minutes); experiments have their own smoke tests",
    "python scripts/bench_pruning.py": "a benchmark on real models (minutes)",
    "source ": "shell setup",
    "export ": "shell setup",
    "flwr ": "needs a running Flower SuperLink",
    "flower-superlink": "a Flower server process",
    "flower-supernode": "a Flower device process",
    "ray ": "a Ray cluster",
    "RAY_ADDRESS=": "a Flower server process on a Ray cluster",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1": "a Flower server process",
    "HF_HUB_OFFLINE=1 python scripts/bench_pruning.py": "a benchmark on real models (minutes)",
    "fedspine partition": "builds the real data and partition (~30 s); tests/test_cli.py runs it on smoke",
}


def code_blocks(lang: str) -> list[tuple[str, str]]:
    """(file name, body) of every ```lang block of README.md and docs/*.md."""
    out = []
    for path in DOCS:
        for body in re.findall(rf"```{lang}\n(.*?)```", path.read_text(), re.S):
            out.append((path.name, body))
    return out


def shell_commands() -> list[tuple[str, str]]:
    """(file name, command) of every bash block: continuation lines joined, comments dropped,
    ``.venv/bin/`` removed, ``a && b`` split."""
    out = []
    for name, body in code_blocks("bash"):
        for line in body.replace("\\\n", " ").splitlines():
            line = re.sub(r"(^|\s)#.*$", "", line).replace(".venv/bin/", "").strip()
            out += [(name, part.strip()) for part in line.split("&&") if part.strip()]
    return out


def fedspine_args(command: str) -> list[str] | None:
    """``fedspine run --check`` arguments for a ``fedspine run|flower`` command, else None."""
    words = shlex.split(command)
    if words[:2] == ["fedspine", "run"]:
        return ["run", "--check", *words[2:]]
    if words[:2] == ["fedspine", "flower"] or words[:3] == ["python", "-m", "fedspine.flower"]:
        rest = words[3:] if words[0] == "fedspine" else words[4:]  # after sim|deploy
        return ["run", "--check", *rest]
    return None


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = re.search(r"```bash\n(.*?)```", text, re.S)
    assert block, "README.md must open with a ```bash block"
    assert text.index("```bash") < text.index("## "), "the commands must come before the first section"
    return [line.strip() for line in block.group(1).splitlines() if line.strip()]


def test_readme_opens_with_exactly_two_commands_that_ci_runs_verbatim():
    commands = readme_commands()
    assert len(commands) == 2, commands
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    for command in commands:
        assert command in ci_lines, f"{command!r} is not run by .ci/run"
    assert "pytest" in commands[1]
    assert commands[0].startswith("bash scripts/setup.sh")


def test_torch_is_pinned_exactly():
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert '"torch==2.13.0"' in pyproject
    assert "torch==2.13.0" in (ROOT / "scripts" / "setup.sh").read_text()


def test_the_allocator_block_runs():
    """The README's allocator example is real code (the other blocks: issue #14)."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## The allocator on its own") :]
    block = re.search(r"```python\n(.*?)```", section, re.S)
    assert block
    scope: dict = {}
    exec(compile(block.group(1), "README.md", "exec"), scope)  # noqa: S102
    assert scope["alloc"].state_dict()["round"] == 10


@pytest.mark.parametrize("index", range(len(code_blocks("python"))))
def test_every_python_block_runs(index, tmp_path, monkeypatch):
    name, body = code_blocks("python")[index]
    monkeypatch.chdir(tmp_path)  # blocks may write files (an export)
    exec(compile(body, name, "exec"), {})  # noqa: S102


def test_every_shell_command_is_checked_or_listed_as_not_run():
    unknown = [
        c for _, c in shell_commands() if fedspine_args(c) is None and not any(map(c.startswith, NOT_RUN))
    ]
    assert not unknown, f"add a check or a NOT_RUN entry for {unknown}"


@pytest.mark.parametrize("args", sorted({tuple(a) for _, c in shell_commands() if (a := fedspine_args(c))}))
def test_every_fedspine_command_passes_its_check(args, capsys):
    from fedspine.cli import main

    cwd = os.getcwd()
    os.chdir(ROOT)  # configs are named relative to the repository
    try:
        assert main(list(args)) == 0, capsys.readouterr().err
    finally:
        os.chdir(cwd)
    assert "nothing written" in capsys.readouterr().out
