"""Every code block of README.md and docs/*.md runs, so none can rot.

The convention, by the fence's info string:

- ```` ```python ````: run. A document's Python blocks run in order, as one script, in a fresh
  process and a fresh directory (so later blocks see what earlier ones defined and wrote).
- ```` ```text output ````: what the code block above it prints (the nearest Python or shell
  block before it). Each of its lines (trailing spaces ignored) must be found, in order, within
  the lines of that kind's output (the Python script's, or the shell commands'), after the lines
  matched by any earlier such block (ANSI colour codes stripped, as a terminal shows them).
- ```` ```bash ````, ```` ```console ````, ```` ```sh ````, ```` ```shell ````: commands, one a
  line (an optional ``$ `` prompt; ``# ...`` comments). A ``torchkeep ...`` command runs, after
  the document's Python blocks and in their directory, and must exit 0, or the status its comment
  names (``# exits 1``). A command that is not ``torchkeep`` must be one of ``NOT_RUN`` (set-up
  commands such as ``make test``, which this suite is part of); any other command fails the test.
- ```` ```bash s3 ````: shell commands that need an S3 server (``moto_server``, ``python -c``);
  tests/remote/test_readme.py runs them against the server the remote tests start, not here.
- Anything else (```` ```text ````, ```` ```json ````, a bare fence): listings, layouts and file
  formats, read by people and not run.

A few blocks of docs/format.md are fragments of a specification (the seal of a header, the seal
of a manifest, an independent reader): ``HOOKS`` gives them a real file to work on before they
run and checks their result after, against torchkeep itself.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```[ \t]*$", re.M | re.S)
ANSI = re.compile(r"\x1b\[[0-9;]*m")
SHELL = {"bash", "console", "sh", "shell"}
NOT_RUN = {"make", "pip", ".ci/run"}
#: Variables that make rich treat a pipe as a terminal (see tests/cli/_helpers.py).
TERMINAL_ENV = ("FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE", "NO_COLOR", "COLUMNS")


@dataclass(frozen=True)
class Block:
    info: str
    body: str
    line: int

    @property
    def kind(self) -> str:
        return self.info.split()[0] if self.info.split() else ""

    @property
    def needs_s3(self) -> bool:
        """Run by tests/remote/test_readme.py, against a real S3 server."""
        return self.kind in SHELL and "s3" in self.info.split()[1:]


def blocks(path: Path) -> list[Block]:
    text = path.read_text()
    return [
        Block(m.group(1).strip(), m.group(2), text.count("\n", 0, m.start()) + 1)
        for m in FENCE.finditer(text)
    ]


# -- docs/format.md: a real file for each fragment, and its result checked --------------------

_FORMAT_SETUP = """
import json, struct, torch, xxhash
import torchkeep as tk
from xxhash import xxh3_128_hexdigest
tk.save({"w": torch.arange(6.0).reshape(2, 3), "epoch": 3, "nested": {"t": (1, "a")}},
        "sealed.safetensors", metadata={"note": "format.md"})
_data = open("sealed.safetensors", "rb").read()
(_n,) = struct.unpack("<Q", _data[:8])
header = json.loads(_data[8 : 8 + _n])
with tk.CheckpointManager("run") as _mgr:
    _mgr.save(0, {"w": torch.ones(2), "epoch": 0})
_manifest = open("run/checkpoints/0000000000.json", "rb").read()
document = json.loads(_manifest)
del document["digest"]
"""

HOOKS: dict[tuple[str, int], tuple[str, str]] = {
    # (document, index among its Python blocks): (code before the block, checks after it)
    ("format.md", 0): (
        _FORMAT_SETUP,
        'assert seal == header["__metadata__"]["torchkeep_digest"], seal\nprint("seal ok")',
    ),
    ("format.md", 1): ("", 'assert text == _manifest, text\nprint("manifest seal ok")'),
    ("format.md", 2): (
        "",
        """
_obj, _meta = read("sealed.safetensors")
_ref = tk.load("sealed.safetensors")
assert (_obj["w"] == _ref["w"].numpy()).all() and _obj["epoch"] == 3, _obj
assert _obj["nested"] == _ref["nested"] and _meta == {"note": "format.md"}, (_obj, _meta)
assert sealed(_manifest) and not sealed(_manifest.replace(b'"step":0', b'"step":1'))
tk.save({"w": torch.ones(3)}, "record.pt")
assert set(pt_record("record.pt")["hashes"]) == {"w"}
print("independent reader ok")
""",
    ),
}


def script_of(path: Path, python: list[Block]) -> str:
    parts = []
    for i, block in enumerate(python):
        before, after = HOOKS.get((path.name, i), ("", ""))
        parts += [textwrap.dedent(before), f"# {path.name}:{block.line}", block.body, after]
    return "\n".join(parts)


def shell_commands(block: Block) -> list[tuple[list[str], int]]:
    """The ``torchkeep`` commands of a shell block with their expected exit status."""
    out = []
    for raw in block.body.splitlines():
        line = raw.strip().removeprefix("$ ")
        command, _, comment = line.partition("#")
        words = shlex.split(command)
        if not words:
            continue
        if words[0] != "torchkeep":
            assert words[0] in NOT_RUN, (
                f"line {block.line}: {line!r} is neither a torchkeep command nor in NOT_RUN"
            )
            continue
        status = re.search(r"exits (\d+)", comment)
        out.append((words[1:], int(status.group(1)) if status else 0))
    return out


def check_output(path: Path, expected_blocks: list[Block], output: str) -> None:
    lines = [line.rstrip() for line in ANSI.sub("", output).splitlines()]
    at = 0
    for block in expected_blocks:
        for want in block.body.splitlines():
            want = want.rstrip()
            if not want:
                continue
            found = next((i for i in range(at, len(lines)) if want in lines[i]), None)
            assert found is not None, (
                f"{path.name}:{block.line}: the documented output line\n  {want!r}\n"
                f"is not in what the blocks print (from line {at}):\n" + "\n".join(lines[at:])
            )
            at = found + 1


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.name)
def test_every_doc_block_runs(path: Path, tmp_path: Path) -> None:
    all_blocks = blocks(path)
    python = [b for b in all_blocks if b.kind == "python"]
    expected: dict[str, list[Block]] = {"python": [], "shell": []}
    last = ""
    for b in all_blocks:
        if b.kind == "python" or b.kind in SHELL:
            last = "python" if b.kind == "python" else "shell"
        elif b.info.split() == ["text", "output"]:
            assert last, f"{path.name}:{b.line}: an output block before any code block"
            expected[last].append(b)
    commands = [
        c for b in all_blocks if b.kind in SHELL and not b.needs_s3 for c in shell_commands(b)
    ]
    if path.name == "README.md":
        assert len(python) >= 3, "the README lost its examples"
    if not python and not commands:
        pytest.skip(f"{path.name} has no code to run")
    output, shell_output = "", ""
    if python:
        script = tmp_path / f"{path.stem}_blocks.py"
        script.write_text(script_of(path, python))
        result = subprocess.run(
            [sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=240
        )
        assert result.returncode == 0, f"{path.name}'s Python blocks failed:\n{result.stderr}"
        output += result.stdout
    env = {k: v for k, v in os.environ.items() if k not in TERMINAL_ENV}
    for args, status in commands:
        result = subprocess.run(
            [sys.executable, "-m", "torchkeep", *args],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
        )
        assert result.returncode == status, (
            f"{path.name}: torchkeep {shlex.join(args)} exited {result.returncode}, "
            f"documented {status}:\n{result.stdout}\n{result.stderr}"
        )
        shell_output += result.stdout
    check_output(path, expected["python"], output)
    check_output(path, expected["shell"], shell_output)
    if path.name == "README.md":  # the Quickstart's printed report, and the files it writes
        assert "LoadReport: 4 loaded, 0 missing, 0 unexpected, 0 mismatched" in output
        assert (tmp_path / "ckpt.safetensors").is_file() and (tmp_path / "net").is_dir()


def test_the_readme_cli_reference_lists_every_command() -> None:
    """Each command of ``torchkeep --help`` has its row in the README's CLI reference."""
    from typer.main import get_command

    from torchkeep.cli import app

    commands = set(get_command(app).commands)  # type: ignore[attr-defined]
    text = (ROOT / "README.md").read_text()
    reference = text.split("## CLI reference", 1)[1].split("\n## ", 1)[0]
    listed = set(re.findall(r"^\| `torchkeep ([a-z-]+)", reference, flags=re.M))
    assert commands <= listed, f"missing from the README's CLI reference: {commands - listed}"
    assert listed - {"--version"} <= commands, f"not commands: {listed - commands}"


def test_the_readme_links_every_tutorial_example() -> None:
    text = (ROOT / "README.md").read_text()
    section = text.split("## From the PyTorch tutorials", 1)[1].split("\n## ", 1)[0]
    for example in sorted((ROOT / "examples").glob("0*.py")):
        assert f"](examples/{example.name})" in section, example.name
    for target in re.findall(r"\]\(((?:examples|docs)/[^)#]+)\)", text):
        assert (ROOT / target).exists(), f"README links to a missing {target}"


def test_the_conventions_catch_what_they_promise(tmp_path: Path) -> None:
    """A documented output line that is not printed, or printed out of order, fails; a shell
    command that would silently not run fails; ``# exits N`` sets the expected status."""
    doc = tmp_path / "doc.md"
    doc.write_text(
        "```python\nprint('one')\nprint('two')\n```\n\n```text output\ntwo\none\n```\n\n"
        "```bash\n$ torchkeep diff a b   # exits 1\nmake test\n```\n\n```bash\nrm -rf x\n```\n"
    )
    found = blocks(doc)
    assert [b.info for b in found] == ["python", "text output", "bash", "bash"]
    assert found[1].line == 6
    check_output(doc, [], "anything")
    with pytest.raises(AssertionError, match="'one'"):
        check_output(doc, [found[1]], "one\ntwo\n")  # out of order
    check_output(doc, [found[1]], "\x1b[1mtwo\x1b[0m \none\n")  # ANSI and trailing spaces
    assert shell_commands(found[2]) == [(["diff", "a", "b"], 1)]
    with pytest.raises(AssertionError, match="neither a torchkeep command nor in NOT_RUN"):
        shell_commands(found[3])
