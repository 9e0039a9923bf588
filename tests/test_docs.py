"""Every fenced code block of README.md, docs/*.md (not the generated config.md) and
benchmarks/README.md: python blocks are executed; shell blocks' `jaxlm` lines parsed as `jaxlm`
parses them, their shipped configs loaded with their overrides (a pipeline's every stage), and
`jaxlm config` / `jaxlm plan` lines run (the `generate`, `eval`, `report`, `data`, training and
`score` lines run as printed on a small pipeline's models and data in tests/test_whole_pipeline.py;
`pipeline`, `bench` and `convert` lines are parsed here and run by their own tests); YAML blocks
loaded (as a jaxlm config when they are one).
Other languages and unlabelled (output) blocks are not checked.

A python block that cannot run here is preceded by `<!-- not run: REASON -->`; the reason must be
given. Python blocks run in a fresh namespace with the working directory a temporary one holding
`runs/tiny` (the session's `tiny_run`) and `configs/`.
"""
from __future__ import annotations

import codecs
import dataclasses
import re
import shlex
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SHELL = {"bash", "sh", "shell", "console"}
NOT_RUN = re.compile(r"^<!--\s*not run:(.*?)-->\s*$")


@dataclasses.dataclass
class Block:
    path: Path
    line: int  # of the opening fence, 1-based
    lang: str
    text: str
    not_run: str | None  # the reason given in a `<!-- not run: ... -->` right before, if any

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def doc_files() -> list[Path]:
    docs = sorted(p for p in (ROOT / "docs").glob("*.md") if p.name != "config.md")
    return [ROOT / "README.md", *docs, ROOT / "benchmarks" / "README.md"]


def blocks(path: Path) -> list[Block]:
    """The fenced blocks of a Markdown file, with the language after the opening fence."""
    lines, found, i = path.read_text().split("\n"), [], 0
    while i < len(lines):
        m = re.match(r"^(\s*)```(\S*)\s*$", lines[i])
        if not m:
            i += 1
            continue
        start, body, i = i, [], i + 1
        while i < len(lines) and lines[i].strip() != "```":
            body.append(lines[i][len(m.group(1)):])
            i += 1
        if i == len(lines):
            raise AssertionError(f"{path.relative_to(ROOT)}:{start + 1}: code block never closed")
        before = next((lines[j] for j in range(start - 1, -1, -1) if lines[j].strip()), "")
        reason = NOT_RUN.match(before.strip())
        found.append(Block(path, start + 1, m.group(2).lower(), "\n".join(body) + "\n",
                           reason.group(1).strip() if reason else None))
        i += 1
    return found


ALL = [b for p in doc_files() for b in blocks(p)]


def of(*langs) -> list:
    return [pytest.param(b, id=b.where) for b in ALL if b.lang in langs]


# --- shell: the jaxlm commands --------------------------------------------------------------------


def _ansi_c(m: re.Match) -> str:
    """A bash $'...' string as a plain shell word."""
    return shlex.quote(codecs.decode(m.group(1).encode(), "unicode_escape"))


def commands(text: str) -> list[list[str]]:
    """The simple commands of a shell block: continuations joined, comments dropped, `VAR=value`
    prefixes dropped, lists (&&, ||, ;, |) split."""
    out = []
    for line in text.replace("\\\n", " ").split("\n"):
        line = re.sub(r"^\$ ", "", line.strip())
        lexer = shlex.shlex(re.sub(r"\$'((?:[^'\\]|\\.)*)'", _ansi_c, line), posix=True, punctuation_chars=";&|")
        lexer.whitespace_split, lexer.commenters = True, "#"
        words: list[str] = []
        for tok in [*lexer, ";"]:
            if tok and set(tok) <= set(";&|"):
                while words and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", words[0]):
                    words.pop(0)
                if words:
                    out.append(words)
                words = []
            else:
                words.append(tok)
    return out


def test_commands_splits_like_bash():
    text = ("XLA_FLAGS=--x=8 jaxlm pretrain c.yaml a=1 \\\n    b=2  # note\n"
            "cd x && jaxlm generate r --infill $'a\\n b' \"c d\"\n")
    assert commands(text) == [["jaxlm", "pretrain", "c.yaml", "a=1", "b=2"], ["cd", "x"],
                              ["jaxlm", "generate", "r", "--infill", "a\n b", "c d"]]


RUN = ("config", "plan")  # commands that use no devices and take a second: run, not only parsed


@pytest.mark.parametrize("block", of(*SHELL))
def test_shell_block(block, monkeypatch, capsys):
    from jaxlm import cli, pipeline
    from jaxlm.config import ConfigError, find_config, load_config

    monkeypatch.chdir(ROOT)  # the documented commands run in the repository root
    for words in commands(block.text):
        if words[0] != "jaxlm":
            continue
        literal = [w for w in words if "\\n" in w]
        assert not literal, f"{block.where}: {literal} pass a backslash and an n, not a newline: write $'...'"
        try:
            args = cli._parse(cli._dotted_flags(words[1:]))  # as `jaxlm` parses its command line
        except SystemExit:
            pytest.fail(f"{block.where}: `{shlex.join(words)}` does not parse (jaxlm {' '.join(words[1:3])} --help)")
        if args.command in RUN:
            code = cli.main(words[1:])
            assert code == 0, f"{block.where}: `{shlex.join(words)}` exited {code}: {capsys.readouterr().err}"
            continue
        config = getattr(args, "config", None)
        placeholder = any(re.fullmatch(r"[A-Z_]+(\.yaml)?", part) for part in Path(config or "").parts)
        if config is None or placeholder or (config.endswith(".yaml") and not config.startswith("configs/")):
            continue  # a config of the reader's own (CONFIG, 1b_2x8.yaml, RUN_DIR/config.yaml)
        try:
            config = find_config(config, cli.KINDS[args.command])  # a shipped one: it must exist
            if args.command == "pipeline":  # every stage's config, resolved and validated; nothing runs
                pipeline.load(config, args.overrides)
            else:
                load_config(config, args.overrides)
        except ConfigError as e:
            pytest.fail(f"{block.where}: `{shlex.join(words)}`: {e}")


# --- YAML ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("block", of("yaml", "yml"))
def test_yaml_block(block, tmp_path):
    from jaxlm.config import Config, ConfigError, load_config

    try:
        tree = yaml.safe_load(block.text)
    except yaml.YAMLError as e:
        pytest.fail(f"{block.where}: not valid YAML: {e}")
    sections = {f.name for f in dataclasses.fields(Config)}
    if isinstance(tree, dict) and tree and set(tree) <= sections:
        (tmp_path / "block.yaml").write_text(block.text)
        try:
            load_config(tmp_path / "block.yaml")
        except ConfigError as e:
            pytest.fail(f"{block.where}: not a valid jaxlm config: {e}")


# --- Python ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("block", of("python", "py"))
def test_python_block(block, tiny_run, tmp_path, monkeypatch):
    if block.not_run is not None:
        assert block.not_run, f"{block.where}: `<!-- not run: -->` needs a reason"
        pytest.skip(f"not run: {block.not_run}")
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "tiny").symlink_to(tiny_run, target_is_directory=True)
    (tmp_path / "configs").symlink_to(ROOT / "configs", target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    try:
        exec(compile(block.text, block.where, "exec"), {"__name__": "__docs__"})
    except Exception as e:  # noqa: BLE001 - any error is the block's
        pytest.fail(f"{block.where}: the block raised {type(e).__name__}: {e}")


def test_not_run_only_before_python():
    """A `not run` mark sits only before a python block, the one kind that runs."""
    bad = [b.where for b in ALL if b.not_run is not None and b.lang not in ("python", "py")]
    assert not bad, f"`<!-- not run -->` before a block that is not python: {bad}"


def test_blocks_found():
    counts: dict = {}
    for b in ALL:
        counts[b.lang or "(none)"] = counts.get(b.lang or "(none)", 0) + 1
    assert counts.get("python") and counts.get("bash") and counts.get("yaml"), counts


# --- links ----------------------------------------------------------------------------------------


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"[`*]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(path: Path) -> set:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    return {_slug(m.group(1)) for m in re.finditer(r"^#+ (.*)$", text, flags=re.M)}


@pytest.mark.parametrize("path", doc_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(path):
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    bad = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"^[a-z]+:", target):
            continue
        file, _, anchor = target.partition("#")
        dest = (path.parent / file).resolve() if file else path
        if not dest.exists():
            bad.append(f"{target} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            bad.append(f"{target} (no such heading)")
    assert not bad, f"{path.relative_to(ROOT)}: broken links: {bad}"
