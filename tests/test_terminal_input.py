"""A stage started at a terminal without an input file stops at once and says how to give one, instead of waiting
silently for text typed at the keyboard."""

from __future__ import annotations

import os
import pty
import subprocess
import sys

import pytest

from caictl.data.reading import _command_words


def test_a_stage_reading_stdin_from_a_terminal_is_a_usage_error(tmp_path):
    primary, secondary = pty.openpty()  # stdin a real terminal, as when the command is typed at a shell
    env = {k: v for k, v in os.environ.items() if not k.startswith("CAICTL_")}
    try:
        result = subprocess.run([sys.executable, "-m", "caictl", "sample", "--from-revisions", "-o", "pairs.jsonl"],
                                stdin=secondary, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail("caictl sample waited on the terminal for input instead of saying how to give it")
    finally:
        os.close(secondary)
        os.close(primary)
    assert result.returncode == 2, result.stderr
    message = "no input: give a file (caictl sample FILE.jsonl) or pipe one in (... | caictl sample)"
    assert message in " ".join(result.stderr.split())


@pytest.mark.parametrize("argv, words", [
    (["revise", "--model", "m"], ["revise"]),
    (["-v", "eval", "compare", "--model", "a"], ["eval", "compare"]),
    (["label", "-o", "x.jsonl", "extra"], ["label"]),
])
def test_the_message_names_the_command_as_typed(argv, words):
    assert _command_words(argv) == words
