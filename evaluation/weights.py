"""Find, verify and load the FID Inception weights; never download them.

Resolution order: an explicit path (`--inception-weights`), the environment variable
`ADM_INCEPTION_WEIGHTS`, then the torch hub cache (`$TORCH_HOME/hub/checkpoints/`, by default
`~/.cache/torch/hub/checkpoints/`). A file is trusted only if its sha256 matches the released one:
a truncated or different file would shift every FID silently.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from runtime.files import file_sha256
from runtime.safe_load import load_torch_file
from evaluation.inception import FIDInception

WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_SHA256 = "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2"
WEIGHTS_BYTES = 95_628_359
WEIGHTS_URL = f"https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/{WEIGHTS_NAME}"
ENV_VAR = "ADM_INCEPTION_WEIGHTS"


def hub_checkpoint_dir() -> Path:
    """The torch hub checkpoint folder (honours TORCH_HOME), without creating it."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def download_hint() -> str:
    """The commands a user runs (on a machine with internet access) to fetch the weights."""
    target = hub_checkpoint_dir() / WEIGHTS_NAME
    return (f"mkdir -p {target.parent} && curl -L -o {target} {WEIGHTS_URL}   "
            f"(or pass --inception-weights PATH / set {ENV_VAR}=PATH)")


def resolve_inception_weights(path: str | os.PathLike | None = None, check_hash: bool = True) -> Path:
    """Return the path of verified FID Inception weights, or raise FileNotFoundError with the fix.

    `path` (if given) must exist; otherwise `$ADM_INCEPTION_WEIGHTS`, then the torch hub cache are
    tried. With `check_hash`, a file whose sha256 differs raises ValueError.
    """
    # The first source given is the only one tried: a wrong explicit path must not fall back silently.
    if path is not None:
        source, chosen = "--inception-weights", Path(path).expanduser()
    elif os.environ.get(ENV_VAR):
        source, chosen = ENV_VAR, Path(os.environ[ENV_VAR]).expanduser()
    else:
        source, chosen = "torch hub cache", hub_checkpoint_dir() / WEIGHTS_NAME
    if not chosen.is_file():
        raise FileNotFoundError(
            f"FID Inception weights not found at {chosen} (from {source}). They are never downloaded "
            f"automatically; fetch them with: {download_hint()}")
    if check_hash:
        digest = file_sha256(chosen)
        if digest != WEIGHTS_SHA256:
            raise ValueError(
                f"{chosen} has sha256 {digest}, expected {WEIGHTS_SHA256} ({WEIGHTS_NAME}, "
                f"{WEIGHTS_BYTES:,} bytes): the file is truncated or a different network. "
                f"Fetch it again with: {download_hint()}")
    return chosen


def load_fid_inception(path: str | os.PathLike | None = None, device="cpu",
                       check_hash: bool = True) -> FIDInception:
    """Build `FIDInception` and load the released weights strictly (every one of the 472 tensors)."""
    file = resolve_inception_weights(path, check_hash=check_hash)
    state = load_torch_file(file, "Inception weights file")
    model = FIDInception()
    model.load_state_dict(state, strict=True)
    return model.to(device).eval()
