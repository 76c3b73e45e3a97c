"""Deterministic seeds derived from (job seed, round, node id).

Every random choice of a run is seeded from these, so a run restored from its log and
carried on draws exactly the numbers the uninterrupted run drew. Pure: no I/O, no clock.
"""

from __future__ import annotations

import hashlib

__all__ = ["derive_seed"]


def derive_seed(job_seed: int, round_number: int, node_id: str, purpose: str = "train") -> int:
    """Return a 63-bit seed that depends only on its arguments.

    ``purpose`` separates independent streams (e.g. "train", "split") that share the
    other three inputs.
    """
    material = f"fedsm-seed\x00{int(job_seed)}\x00{int(round_number)}\x00{node_id}\x00{purpose}"
    digest = hashlib.sha256(material.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") & 0x7FFF_FFFF_FFFF_FFFF
