"""The docs site builds under `mkdocs build --strict` (a broken link, a missing page or a docstring
griffe cannot read fails it), and its CLI reference, generated from the click commands, names every
`trtc` command and every flag `trtc COMMAND --help` shows."""

from __future__ import annotations

import html
import os
import re
import subprocess
import sys
from pathlib import Path

import click
import pytest

pytest.importorskip("mkdocs", reason="the docs extra is not installed (pip install -e '.[docs]')")
pytest.importorskip("mkdocs_click")
pytest.importorskip("mkdocstrings_handlers.python")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("site")
    r = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)], cwd=REPO,
                       capture_output=True, text=True, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert r.returncode == 0, r.stdout + r.stderr
    return out


def page_text(site: Path, page: str) -> str:
    return html.unescape(re.sub(r"<[^>]+>", " ", (site / page / "index.html").read_text()))


def test_cli_reference_names_every_command_and_flag(site):
    from trtc.cli import main

    text = page_text(site, "cli")
    ctx = click.Context(main)
    assert main.list_commands(ctx)
    for name in main.list_commands(ctx):
        command = main.get_command(ctx, name)
        assert f"trtc {name}" in text, name
        for param in command.params:
            if isinstance(param, click.Option) and not param.hidden:
                for flag in (*param.opts, *param.secondary_opts):
                    assert re.search(rf"{re.escape(flag)}\b", text), f"trtc {name} {flag}"


def test_api_reference_documents_the_public_classes(site):
    text = page_text(site, "api")
    for name, member in (("LLM", "generate_stream"), ("SamplingParams", "logit_bias"), ("RequestOutput", "token_ids")):
        assert name in text and member in text, (name, member)
