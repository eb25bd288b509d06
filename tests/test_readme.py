"""The README's first two commands are the ones CI runs, so they stay true."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


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
