"""Download the production models from the Hugging Face hub into a model directory.

    python scripts/fetch_models.py --out /models [--token hf_...]   (or HF_TOKEN in the environment)

Writes the layout that ``engine.models.loading`` reads (see its docstring); the folder names
and file names come from there, so the two cannot drift apart. The pyannote repositories are
gated: the token's account must have accepted their conditions on huggingface.co.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path
from typing import Callable

from huggingface_hub import hf_hub_download

from engine.models.loading import (
    DIARIZATION_ID,
    ECAPA_FILES,
    ECAPA_ID,
    LOCAL_NAMES,
    PIPELINE_CONFIG,
    PYANNOTE_CHECKPOINT,
)

# (hub repository, file) pairs; the 3.1 config names the two pyannote checkpoints it needs
FILES: tuple[tuple[str, str], ...] = (
    (DIARIZATION_ID, PIPELINE_CONFIG),
    ("pyannote/segmentation-3.0", PYANNOTE_CHECKPOINT),
    ("pyannote/wespeaker-voxceleb-resnet34-LM", PYANNOTE_CHECKPOINT),
    *((ECAPA_ID, name) for name in ECAPA_FILES),
)

Download = Callable[..., str]


def fetch(out: Path, token: str | None, download: Download = hf_hub_download) -> list[Path]:
    """Download every file into ``out/<local name>/<file>``; returns the paths written."""
    written = []
    for repo_id, filename in FILES:
        folder = out / LOCAL_NAMES[repo_id]
        # local_dir: a plain file at folder/filename, not a symlink into a cache that the
        # image's final stage would not copy
        path = Path(download(repo_id, filename, local_dir=folder, token=token))
        if path.resolve() != (folder / filename).resolve() or not path.is_file():
            raise RuntimeError(f"{repo_id}/{filename} landed at {path}, not in {folder}")
        written.append(path)
    for repo_id in {repo for repo, _ in FILES}:
        # huggingface_hub's resume metadata: not part of the model directory
        shutil.rmtree(out / LOCAL_NAMES[repo_id] / ".cache", ignore_errors=True)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="model directory to fill (e.g. /models)")
    parser.add_argument("--token", default=os.environ.get("HF_TOKEN"), help="hub token (default: $HF_TOKEN)")
    args = parser.parse_args(argv)
    if not args.token:
        parser.error("a token is needed for the gated pyannote models: --token or HF_TOKEN")
    for path in fetch(args.out, args.token):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
