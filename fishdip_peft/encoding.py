"""Byte-level encodings of FISH-DIP's files: fingerprints, digests, packed bits."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import torch


def fingerprint(base_values: torch.Tensor) -> torch.Tensor:
    data = base_values.detach().to("cpu", torch.bfloat16).contiguous().view(torch.int16).numpy().tobytes()
    return torch.frombuffer(bytearray(hashlib.sha256(data).digest()), dtype=torch.uint8)


def pack_bits(flags: torch.Tensor) -> torch.Tensor:
    padded = torch.zeros(-(-flags.numel() // 8) * 8, dtype=torch.uint8)
    padded[: flags.numel()] = flags.to(torch.uint8)
    weights = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)
    return (padded.view(-1, 8) * weights).sum(1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, count: int) -> torch.Tensor:
    bits = (packed.to(torch.uint8).view(-1, 1) >> torch.arange(8, dtype=torch.uint8)) & 1
    return bits.view(-1)[:count].bool()


# -- adapter file ---------------------------------------------------------------------------------------


def state_digest(obj, digest=None) -> bytes:
    """SHA-256 over a training state's structure, tensors (dtype, shape, bytes) and scalars."""
    digest = digest or hashlib.sha256()
    if isinstance(obj, torch.Tensor):
        tensor = obj.detach().cpu().contiguous()
        digest.update(f"T{tensor.dtype}{tuple(tensor.shape)}".encode())
        digest.update(tensor.view(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(obj, Mapping):
        digest.update(b"{")
        for key in sorted(obj, key=repr):
            digest.update(repr(key).encode())
            state_digest(obj[key], digest)
        digest.update(b"}")
    elif isinstance(obj, (list, tuple)):
        digest.update(b"[" if isinstance(obj, list) else b"(")
        for item in obj:
            state_digest(item, digest)
        digest.update(b"]")
    else:
        digest.update(f"{type(obj).__name__}:{obj!r}".encode())
    return digest.digest()
