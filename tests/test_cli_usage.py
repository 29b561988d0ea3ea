"""The CLI's answers to arguments it cannot use: one line on stderr and exit 2, as typer's own
usage errors, never a traceback; and checked before anything is uploaded or any model runs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from cli.launcher import free_port

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cli.main", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


@pytest.fixture(scope="module")
def files(tmp_path_factory, utterances) -> dict[str, str]:
    here = tmp_path_factory.mktemp("usage")
    clip = here / "a.wav"
    clip.write_bytes(utterances["spk1"][0].read_bytes())
    (here / "b.m4a").write_bytes(clip.read_bytes())
    (here / "folder").mkdir()
    return {"a": str(clip), "b": str(here / "b.m4a"), "dir": str(here / "folder"),
            "missing_dir": str(here / "no-such-folder" / "out.json")}


# nothing listens at --url: each refusal must come before the API is asked
def _service(*args: str) -> tuple[str, ...]:
    return (*args, "--url", f"http://127.0.0.1:{free_port()}")


CASES = {
    "submit two files to diarize": (lambda f: _service("submit", f["a"], f["b"]), "diarize takes 1 file(s): file; got 2"),
    "compare with one file": (lambda f: _service("submit", "--kind", "compare", f["a"]), "compare takes 2 file(s)"),
    "an unknown kind": (lambda f: _service("submit", "--kind", "transcribe", f["a"]), "unknown job kind 'transcribe'"),
    "a URL where only uploads go": (lambda f: _service("submit", "--kind", "enroll", "https://example.com/a.wav"),
                                    "files must be a local file"),
    "a folder to submit": (lambda f: _service("submit", f["dir"]), "is a directory"),
    "a missing file to submit": (lambda f: _service("submit", f["a"] + ".gone"), "no such file"),
    "a result into a missing folder": (lambda f: _service("result", "0" * 32, "-o", f["missing_dir"]),
                                       "no such directory"),
    "a result onto a folder": (lambda f: _service("result", "0" * 32, "-o", f["dir"]), "is a directory"),
    "a vector into a missing folder": (lambda f: ("embed", f["a"], "-o", f["missing_dir"]), "no such directory"),
    "RTTM onto a folder": (lambda f: ("diarize", f["a"], "--rttm", f["dir"]), "is a directory"),
    # the API's rules of a request, offline too: the threshold was dropped and the speakers never named
    "a threshold without voiceprints": (lambda f: ("diarize", f["a"], "--identification-threshold", "0.9"),
                                        "identification_threshold: given without voiceprints"),
    "segments longer than any audio": (lambda f: ("diarize", f["a"], "--min-duration", "1e20"),
                                       "longer than the longest audio"),
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_a_mistake_in_the_arguments_is_one_line_and_exit_2(files, case):
    argv, said = CASES[case]
    out = _run(*argv(files))
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2, (out.returncode, out.stderr[-2000:])
    assert len(lines) == 1 and said in lines[0], out.stderr[-2000:]
    assert "Traceback" not in out.stderr and "cannot reach the API" not in out.stderr
    assert out.stdout == ""
