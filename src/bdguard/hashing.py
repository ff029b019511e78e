"""The one content hash of bdguard: what caches and run folders are keyed by."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch


def digest(*parts: Any) -> str:
    """16 hex digits of SHA-256 over `parts`: a tensor by its dtype, shape and bytes (a data set by its images and
    labels, never by its name or size alone), anything else as JSON with sorted keys."""
    h = hashlib.sha256()
    for part in parts:
        if isinstance(part, torch.Tensor):
            tensor = part.detach().cpu().contiguous()
            h.update(json.dumps([str(tensor.dtype), list(tensor.shape)]).encode())
            h.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
        else:
            h.update(json.dumps(part, sort_keys=True).encode())
    return h.hexdigest()[:16]


def settings_dict(config: Any) -> dict[str, Any]:
    """A run's settings as a dict, less what may change between sessions of the same run (device, threads)."""
    # imported here: bdguard.config is above this module's other users
    from bdguard.config import to_dict

    data = to_dict(config)
    for key in ("device", "threads"):
        data.get("train", {}).pop(key, None)
    return data
