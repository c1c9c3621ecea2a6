"""The README is tested: its examples that can run offline run here, and every command and option
has help text (as sqlite-utils' tests/test_docs.py does)."""

from __future__ import annotations

import contextlib
import io
import json
import re
import shlex
from pathlib import Path

import pytest
import typer
from conftest import make_image, make_note
from typer.testing import CliRunner
from videos import make_video

from mmsearch.cli import app

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()
runner = CliRunner()


def code_blocks(section: str, language: str = "") -> list[str]:
    """The fenced code blocks of a README section (a '## ' or '### ' heading and what follows
    up to the next heading of that level or above)."""
    start = README.index(f"\n{section}\n")
    level = section.split()[0]
    rest = README[start + len(section) + 2 :]
    end = re.search(rf"^#{{1,{len(level)}}} ", rest, re.M)
    body = rest[: end.start()] if end else rest
    return re.findall(rf"^```{language}\n(.*?)^```", body, re.M | re.S)


@pytest.fixture
def user_files(tmp_path, monkeypatch, tiny_model) -> Path:
    """A home folder with ~/Pictures and ~/Notes, indexed once with the tiny model (the README's
    commands then use the index's model: nothing is downloaded)."""
    home = tmp_path / "user"
    monkeypatch.setenv("HOME", str(home))
    for i in range(3):
        make_image(home / "Pictures" / f"photo{i}.jpg", pattern=i)
    make_note(home / "Notes" / "beach.md", "A dog on a beach, running after a ball.\n")
    r = runner.invoke(
        app,
        ["index", str(home / "Pictures"), str(home / "Notes"), "--model", str(tiny_model)],
    )
    assert r.exit_code == 0, r.output
    return home


def test_readme_python_example_runs(user_files):
    (example,) = code_blocks("## Python", "python")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(example, "README.md", "exec"), {"__name__": "readme"})
    lines = out.getvalue().splitlines()
    assert len(lines) == 4  # k=5, and the index holds four files
    ranks = [line.split(" ", 2)[0] for line in lines]
    paths = [line.split(" ", 2)[2] for line in lines]
    assert ranks == ["1", "2", "3", "4"]
    assert sorted(paths) == sorted(
        [str(user_files / "Pictures" / f"photo{i}.jpg") for i in range(3)]
        + [str(user_files / "Notes" / "beach.md")]
    )


def _shell_words(line: str, home: Path) -> list[str]:
    """A README command line as the shell passes it: comment dropped, ~ expanded."""
    words = shlex.split(line, comments=True)
    return [str(home) + w[1:] if w.startswith("~/") else w for w in words]


def test_readme_cli_examples_run(user_files, tmp_path, monkeypatch):
    """The 'Quick start' and 'Using it' commands that need no network: searching, the index's
    own model, the status each exits with (a search that finds nothing exits 1)."""
    monkeypatch.chdir(tmp_path)
    make_image(tmp_path / "query.jpg", pattern=1)
    make_image(tmp_path / "ref.jpg", pattern=2)
    make_video(user_files / "Videos" / "party.mp4", [(3, 70)], fps=2, size=(32, 32))  # not indexed
    quick = code_blocks("## Quick start")[0].splitlines()[0]
    lines = [part.strip() for part in quick.split("&&") if part.strip().startswith("mmsearch")]
    lines += code_blocks("## Using it")[0].splitlines()
    ran = []
    for line in lines:
        words = _shell_words(line, user_files)
        if not words:
            continue
        assert words[0] == "mmsearch", line
        if words[1] == "finetune" or "--audio" in words or "models/mine" in words:
            continue  # needs training pairs, a CLAP download or a fine-tuned model
        if words[1] == "serve":
            continue  # runs until stopped: tests/test_serve.py starts and stops it
        commands = [[w] for w in words[1:] if w != "|"] if "|" in words else [words[1:]]
        for args in commands:
            r = runner.invoke(app, args)
            # the index holds no sound and no video
            expected = 1 if args[-2:] in (["--type", "audio"], ["--type", "video"]) else 0
            assert r.exit_code == expected, (line, r.output)
            ran.append(args[0])
    assert ran.count("search") >= 6 and {"index", "info", "failures", "list", "clip"} <= set(ran)
    assert (tmp_path / "fireworks.mp4").is_file()


def test_readme_exit_codes_match_the_cli():
    from mmsearch.cli import ERROR, EXIT_CODES, FOUND, INTERRUPTED, NOTHING_FOUND

    table = dict(re.findall(r"^\| (\d+) \| (.+) \|$", README, re.M))
    assert sorted(map(int, table)) == sorted([FOUND, NOTHING_FOUND, ERROR, INTERRUPTED])
    assert "found nothing" in table[str(NOTHING_FOUND)] and "error" in table[str(ERROR)]
    for code in table:
        assert f"\n  {code} " in EXIT_CODES


def _commands():
    group = typer.main.get_command(app)
    return sorted(group.commands.items())


def test_every_command_and_option_has_help():
    missing = []
    for name, command in _commands():
        if not (command.help or "").strip():
            missing.append(name)
        for param in command.params:
            if not (getattr(param, "help", None) or "").strip():
                missing.append(f"{name} {param.opts[0] if param.opts else param.name}")
    assert not missing, f"no help text: {missing}"


def test_index_root_order_is_documented():
    section = README[README.index("### Where indexes live") :]
    for words in ("--index-dir", "$MMSEARCH_HOME", "upward", "~/.local/share/mmsearch/indexes"):
        assert words in section, words


def test_readme_relevance_examples_run(user_files):
    """The relevance section's commands: each searches, and one that keeps nothing at its
    --min-relevance exits 1 saying so (the tiny model's relevances are low)."""
    (block,) = code_blocks("### Relevance")
    ran = 0
    for line in block.splitlines():
        words = _shell_words(line.split("||")[0], user_files)
        assert words[:2] == ["mmsearch", "search"] and "--min-relevance" in words, line
        r = runner.invoke(app, words[1:])
        assert r.exit_code in (0, 1), (line, r.output)
        if r.exit_code == 1:
            assert "no results with relevance >=" in r.stderr
        ran += 1
    assert ran == 3


def test_readme_filter_batch_result_and_duplicate_examples_run(user_files, tmp_path, monkeypatch):
    """Every command of the Filters, Batch queries, Reading results and Duplicates sections,
    with what each finds in the fixture's home folder (three photos and a note, modified today)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "queries.txt").write_text("a dog\nsunset - people\n")
    pictures = user_files / "Pictures"
    (pictures / "copy.jpg").write_bytes((pictures / "photo0.jpg").read_bytes())
    assert runner.invoke(app, ["index", str(pictures)]).exit_code == 0
    outcomes = []
    for section in ("### Filters", "### Batch queries", "### Reading results", "### Duplicates"):
        for line in code_blocks(section)[0].splitlines():
            stdin = None
            if " | mmsearch " in line:  # printf '...' | mmsearch ...
                feed, line = line.split(" | ", 1)
                stdin = shlex.split(feed)[1].encode().decode("unicode_escape")
            words = _shell_words(line.split(" > ")[0], user_files)
            assert words[0] == "mmsearch", line
            r = runner.invoke(app, words[1:], input=stdin)
            assert r.exit_code in (0, 1), (line, r.output)
            outcomes.append((words[1], r.exit_code, r.stdout))
    codes = [code for _, code, _ in outcomes]
    # nothing taken in January 2023; under ~/Pictures or a note; no photo of 1 MiB
    assert codes[:3] == [1, 0, 1]
    hits = [json.loads(row) for row in outcomes[3][2].splitlines()]  # --queries FILE --json
    assert {h["query"] for h in hits} == {"a dog", "sunset - people"}
    assert outcomes[4][2].count("# ") == 2 and codes[3:5] == [0, 0]
    assert codes[5:7] == [0, 0] and "photo1.jpg" not in outcomes[6][2]  # --exclude-self
    # the copy of photo0 is found; there is no audio to compare
    assert codes[7:] == [0, 0, 1] and "copy.jpg" in outcomes[7][2]
    (group,) = [json.loads(row) for row in outcomes[8][2].splitlines()]
    assert sorted(group["paths"]) == sorted(
        [str(pictures / "copy.jpg"), str(pictures / "photo0.jpg")]
    )


def test_readme_composing_section_names_only_options_that_exist():
    section = README[README.index("### Composing a model") : README.index("### Searching")]
    helps = "".join(
        runner.invoke(app, [c, "--help"]).stdout for c in ("compose", "finetune", "eval")
    )
    named = set(re.findall(r"--[a-z][a-z-]+", section))
    assert {"--unlocked-text-layers", "--warmup-fraction", "--one-caption"} <= named
    assert named <= set(re.findall(r"--[a-z][a-z-]+", helps)), named - set(
        re.findall(r"--[a-z][a-z-]+", helps)
    )
