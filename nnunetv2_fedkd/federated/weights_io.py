"""Saving, loading, fingerprinting and converting federated model weights (``Dict[str, torch.Tensor]``).

Weights files may come from other sites, so they hold no pickle at all: a ``.fedkd`` file is a safetensors file
(https://github.com/huggingface/safetensors: a JSON header and raw tensor bytes, read without running any code).
:func:`load_weights` checks its structure and digest, raising :class:`CorruptCheckpoint` (naming the file) for
anything unexpected. The safetensors header's metadata (strings only)::

    {"format": "nnunetv2_fedkd.weights", "version": "2",
     "meta_json": "<JSON text>",          # caller's metadata (round, strategy, site, metrics, ...)
     "keys_json": "<JSON list>",          # the weights' key order (safetensors sorts its tensors)
     "digest": "<sha256 hex>"}            # weights_digest(weights), checked on load

Files are written to a temporary file in the target folder and renamed into place, so a reader never sees half a file.
Version 1 files (a ``torch.save`` zip, this package before safetensors) are refused with a message saying so: reading
them would mean unpickling.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_bytes

from nnunetv2_fedkd.utils import atomic_write

__all__ = [
    "WEIGHTS_FORMAT",
    "WEIGHTS_FORMAT_VERSION",
    "CorruptCheckpoint",
    "save_weights",
    "load_weights",
    "upgrade_weights_file",
    "weights_digest",
    "plans_digest",
    "to_numpy_arrays",
    "from_numpy_arrays",
]

WEIGHTS_FORMAT = "nnunetv2_fedkd.weights"
WEIGHTS_FORMAT_VERSION = 2

Weights = Dict[str, torch.Tensor]


class CorruptCheckpoint(Exception):
    """A weights file is truncated, corrupt, not a weights file, or holds something other than the expected
    structure. ``path``: the file; ``reason``: what is wrong."""

    def __init__(self, path: os.PathLike, reason: str):
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{self.path}: not a valid weights file: {reason}")


def _check_weights(weights: Mapping[str, Any], what: str) -> None:
    if not isinstance(weights, Mapping):
        raise TypeError(f"{what}: weights must be a mapping of names to tensors, got {type(weights).__name__}")
    for k, v in weights.items():
        if not isinstance(k, str):
            raise TypeError(f"{what}: weight names must be strings, got {k!r}")
        if not isinstance(v, torch.Tensor):
            raise TypeError(f"{what}: weight {k!r} is a {type(v).__name__}, not a tensor")


def save_weights(path: os.PathLike, weights: Mapping[str, torch.Tensor], meta: Optional[Mapping[str, Any]] = None
                 ) -> Path:
    """Write ``weights`` (copied to CPU) and JSON-serialisable ``meta`` to ``path`` as a safetensors file, atomically
    (temporary file in the same folder, fsync, rename). Returns the path."""
    _check_weights(weights, "save_weights")
    try:
        meta_json = json.dumps(dict(meta or {}), sort_keys=True)
    except (TypeError, ValueError) as e:
        raise TypeError(f"save_weights: meta must be JSON-serialisable: {e}") from None
    cpu = {k: v.detach().to("cpu").clone(memory_format=torch.contiguous_format) for k, v in weights.items()}
    data = safetensors_bytes(cpu, metadata={"format": WEIGHTS_FORMAT, "version": str(WEIGHTS_FORMAT_VERSION),
                                            "meta_json": meta_json, "keys_json": json.dumps(list(cpu)),
                                            "digest": weights_digest(cpu)})
    return atomic_write(path, lambda f: f.write(data), binary=True)


def load_weights(path: os.PathLike) -> Tuple[Weights, Dict[str, Any]]:
    """Read a file written by :func:`save_weights`; returns ``(weights, meta)`` (weights in the saved key order).

    Raises FileNotFoundError if there is no such file, and :class:`CorruptCheckpoint` if it is not a safetensors file
    (truncated, random bytes, a pickle -- which is never unpickled), if its metadata is not the one above, or if the
    weights do not match the stored digest.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as st:
            info = st.metadata() or {}
            # copies: the tensors must not read from the file after its digest was checked
            stored = {k: st.get_tensor(k).clone() for k in st.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        if _is_zip(path):
            raise CorruptCheckpoint(path, "is a torch.save zip (an nnunetv2_fedkd weights file of format version 1, or "
                                      "any other torch file); this version reads only its safetensors files (version "
                                      f"{WEIGHTS_FORMAT_VERSION}) and never unpickles: convert a run folder of your "
                                      "own with `nnunetv2_fedkd upgrade-weights RUN_FOLDER`") from None
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise CorruptCheckpoint(path, f"is not a readable safetensors file ({type(e).__name__}: {first_line})") from e
    if info.get("format") != WEIGHTS_FORMAT:
        raise CorruptCheckpoint(path, f"format tag is {info.get('format')!r}, expected {WEIGHTS_FORMAT!r}")
    if info.get("version") != str(WEIGHTS_FORMAT_VERSION):
        raise CorruptCheckpoint(path, f"unsupported format version {info.get('version')!r} (this code reads "
                                      f"{WEIGHTS_FORMAT_VERSION})")
    missing = [k for k in ("meta_json", "keys_json", "digest") if k not in info]
    if missing:
        raise CorruptCheckpoint(path, f"missing entry {missing[0]!r}")
    try:
        meta = json.loads(info["meta_json"])
        order = json.loads(info["keys_json"])
    except ValueError as e:
        raise CorruptCheckpoint(path, f"'meta_json' or 'keys_json' is not valid JSON ({e})") from None
    if not isinstance(meta, dict):
        raise CorruptCheckpoint(path, "'meta_json' does not hold a JSON object")
    if not isinstance(order, list) or not all(isinstance(k, str) for k in order) or sorted(order) != sorted(stored):
        raise CorruptCheckpoint(path, "'keys_json' does not list the stored tensors")
    weights = {k: stored[k] for k in order}
    if info["digest"] != weights_digest(weights):
        raise CorruptCheckpoint(path, "the weights do not match the stored digest")
    return weights, meta


def upgrade_weights_file(path: os.PathLike) -> bool:
    """Rewrite a format-1 weights file (``torch.save`` zip of ``{"format", "version": 1, "weights", "meta_json",
    "digest"}``, this package before safetensors) as a safetensors file in place (atomic); False if it already is
    one. The old file is read with ``torch.load(weights_only=True)`` (PyTorch's restricted unpickler) and its digest
    checked: run it only on files you wrote yourself. :class:`CorruptCheckpoint` for anything else."""
    path = Path(path)
    if not _is_zip(path):
        load_weights(path)  # already safetensors: it must read as one
        return False
    try:
        old = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CorruptCheckpoint(path, f"cannot be read safely ({type(e).__name__})") from e
    if not isinstance(old, dict) or old.get("format") != WEIGHTS_FORMAT or old.get("version") != 1:
        raise CorruptCheckpoint(path, "is not a format-1 nnunetv2_fedkd weights file")
    weights, meta_json = old.get("weights"), old.get("meta_json")
    if not isinstance(weights, dict) or not isinstance(meta_json, str) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in weights.items()):
        raise CorruptCheckpoint(path, "is a damaged format-1 weights file")
    if old.get("digest") != weights_digest(weights):
        raise CorruptCheckpoint(path, "the weights do not match the stored digest")
    try:
        meta = json.loads(meta_json)
    except ValueError as e:
        raise CorruptCheckpoint(path, f"'meta_json' is not valid JSON ({e})") from None
    save_weights(path, weights, meta)
    return True


def _is_zip(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"PK\x03\x04"


def weights_digest(weights: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 (hex) over the weights in sorted key order: each key's name, dtype, shape and raw bytes. Equal for
    equal weights whatever the dict order or device; changes with any value, name, dtype or shape."""
    _check_weights(weights, "weights_digest")
    h = hashlib.sha256()
    for key in sorted(weights):
        t = weights[key].detach().to("cpu").contiguous()
        raw = t.reshape(-1).view(torch.uint8).numpy() if t.numel() else np.empty(0, dtype=np.uint8)
        header = json.dumps([key, str(t.dtype), list(t.shape), int(raw.nbytes)])
        h.update(header.encode("utf-8"))
        h.update(b"\n")
        h.update(raw)
    return h.hexdigest()


def plans_digest(plans: Mapping[str, Any]) -> str:
    """SHA-256 (hex) of nnU-Net plans as canonical JSON (sorted keys, no whitespace), to check that every site
    trains with identical plans."""
    try:
        text = json.dumps(plans, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    except (TypeError, ValueError) as e:
        raise ValueError(f"plans_digest: plans are not JSON-serialisable: {e}") from None
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def to_numpy_arrays(weights: Mapping[str, torch.Tensor]) -> Dict[str, np.ndarray]:
    """Weights as a dict of numpy arrays (copies, CPU) for transports such as Flower's ``ArrayRecord``. bfloat16 has
    no numpy dtype and is sent as float32 (exact); :func:`from_numpy_arrays` with ``like=`` casts it back."""
    _check_weights(weights, "to_numpy_arrays")
    out: Dict[str, np.ndarray] = {}
    for k, v in weights.items():
        t = v.detach().to("cpu")
        if t.dtype == torch.bfloat16:
            t = t.float()
        out[k] = np.array(t.numpy(), copy=True, order="C")
    return out


def from_numpy_arrays(arrays: Mapping[str, np.ndarray], like: Optional[Mapping[str, torch.Tensor]] = None
                      ) -> Weights:
    """Inverse of :func:`to_numpy_arrays`. With ``like`` (e.g. the global weights), the keys and shapes must match
    and every array must have ``like``'s dtype (float32 for a bfloat16 tensor, which is cast back); the result
    then has ``like``'s key order. Raises ValueError naming the first offending key."""
    if like is not None:
        missing = [k for k in like if k not in arrays]
        if missing:
            raise ValueError(f"from_numpy_arrays: missing array {missing[0]!r}")
        extra = [k for k in arrays if k not in like]
        if extra:
            raise ValueError(f"from_numpy_arrays: unexpected array {extra[0]!r}")
        order = list(like)
    else:
        order = list(arrays)
    out: Weights = {}
    for k in order:
        a = arrays[k]
        if not isinstance(a, np.ndarray):
            raise ValueError(f"from_numpy_arrays: {k!r} is a {type(a).__name__}, not a numpy array")
        if a.dtype.hasobject:
            raise ValueError(f"from_numpy_arrays: {k!r} has dtype {a.dtype}, not a numeric array")
        if not a.dtype.isnative:
            a = a.astype(a.dtype.newbyteorder("="))
        try:
            t = torch.from_numpy(np.array(a, copy=True, order="C"))
        except TypeError as e:
            raise ValueError(f"from_numpy_arrays: {k!r}: {e}") from None
        if like is not None:
            ref = like[k]
            if tuple(t.shape) != tuple(ref.shape):
                raise ValueError(f"from_numpy_arrays: shape of {k!r} is {tuple(t.shape)}, expected "
                                 f"{tuple(ref.shape)}")
            if ref.dtype == torch.bfloat16 and t.dtype == torch.float32:
                t = t.to(torch.bfloat16)
            elif t.dtype != ref.dtype:
                raise ValueError(f"from_numpy_arrays: dtype of {k!r} is {t.dtype}, expected {ref.dtype}")
        out[k] = t
    return out
