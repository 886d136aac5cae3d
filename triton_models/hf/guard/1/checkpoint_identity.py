"""What a Hugging Face checkpoint directory is: the name and version a verdict will carry.

The consumer reads `guard_model_name` and `guard_model_version` from the served model's config
(they are fill-time values of triton_models/hf), so they must be known before Triton starts.
This prints them for a checkpoint directory, ready for fill.py:

    python triton_models/hf/guard/1/checkpoint_identity.py /models/LlavaGuard-v1.2-0.5B-OV-hf
    guard_model_name=AIML-TUDA/LlavaGuard-v1.2-0.5B-OV-hf
    guard_model_version=sha256:0123456789abcdef

The version is a fingerprint of the files' contents, not a hub revision: it is the same however
the files were copied, and the model recomputes it when it loads (`verify_checkpoint`) and
refuses to serve files that are not the ones its config names. A hub snapshot's commit, when the
directory is one, is printed as a comment for the operator's records.

Standard library only: it runs wherever fill.py runs, without torch.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

# huggingface_hub's cache layout: models--<org>--<name>/snapshots/<commit>/
_HUB_SNAPSHOT = re.compile(
    r"models--(?P<org>[^/]+?)--(?P<name>[^/]+)/snapshots/(?P<commit>[0-9a-f]{40})$"
)
_CHUNK = 8 * 1024 * 1024


@dataclass(frozen=True)
class Identity:
    name: str
    version: str
    hub_commit: str | None = None


def identify(checkpoint: Path) -> Identity:
    """The checkpoint's name and content fingerprint (reads every file once)."""
    if not checkpoint.is_dir():
        raise ValueError(f"{checkpoint} is not a checkpoint directory")
    snapshot = _HUB_SNAPSHOT.search(checkpoint.resolve().as_posix()) or _HUB_SNAPSHOT.search(
        checkpoint.absolute().as_posix()
    )
    if snapshot is not None:
        name = f"{snapshot['org']}/{snapshot['name']}"
        return Identity(name, fingerprint(checkpoint), snapshot["commit"])
    return Identity(
        _declared_name(checkpoint) or checkpoint.resolve().name, fingerprint(checkpoint)
    )


def fingerprint(checkpoint: Path) -> str:
    """sha256 over every file that can change what the model does, with its relative path.

    Left out: hidden files and directories (.git, .cache, .gitattributes) and Markdown (the
    model card), so a copy made by git, by the hub client or by rsync fingerprints the same.
    """
    manifest = hashlib.sha256()
    for path in _content_files(checkpoint):
        digest = hashlib.sha256()
        with path.open("rb") as file:
            while chunk := file.read(_CHUNK):
                digest.update(chunk)
        relative = path.relative_to(checkpoint).as_posix()
        manifest.update(f"{relative}\0{digest.hexdigest()}\n".encode())
    return f"sha256:{manifest.hexdigest()[:16]}"


def _content_files(checkpoint: Path) -> Iterator[Path]:
    for path in sorted(checkpoint.rglob("*")):
        relative = path.relative_to(checkpoint)
        if any(part.startswith(".") for part in relative.parts) or path.suffix == ".md":
            continue
        if path.is_file():  # follows the hub cache's symlinks to their blobs
            yield path


def _declared_name(checkpoint: Path) -> str | None:
    """config.json's `_name_or_path` when it names a hub repository, not a local path."""
    try:
        declared = json.loads((checkpoint / "config.json").read_text()).get("_name_or_path")
    except (OSError, ValueError, AttributeError):
        return None
    if isinstance(declared, str) and re.fullmatch(r"[\w.-]+/[\w.-]+", declared):
        return declared
    return None


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        print(f"usage: {Path(__file__).name} CHECKPOINT_DIR", file=sys.stderr)
        return 2
    try:
        identity = identify(Path(args[0]))
    except (OSError, ValueError) as exc:
        print(f"checkpoint_identity: {exc}", file=sys.stderr)
        return 2
    if identity.hub_commit:
        print(f"# hub revision {identity.hub_commit}", file=sys.stderr)
    print(f"guard_model_name={identity.name}")
    print(f"guard_model_version={identity.version}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
