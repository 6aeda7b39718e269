"""The metadata of a safetensors blob, read without loading tensors or unpickling anything."""
from __future__ import annotations

import json
import struct


def read_metadata(data: bytes) -> dict[str, str]:
    """The JSON header's __metadata__ of a safetensors blob, without loading tensors."""
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    return dict(header.get("__metadata__", {}))
