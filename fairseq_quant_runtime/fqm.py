"""The exported model file (``.fqm``): bit-packed integer weights, their scales, float leftovers, the ONNX
graphs and everything decoding needs, in one versioned, checksummed file. numpy only (no torch, no fairseq).

Layout (little endian)::

    b"FQMODEL\\0" | u32 format version | u64 header length | header (zlib JSON) | data | sha256 of all before

The header names every tensor and blob by (offset, nbytes) into the data section. A quantized tensor is
stored as unsigned integers ``u = q - qmin`` packed at exactly ``bits`` bits each (1..8, low bits first),
one scale per group (and an offset per group for asymmetric grids, except balanced ones, whose offset
``scale * -(2**bits - 1) / 2`` the reader computes: record field ``grid: balanced``, version 2); it dequantizes as
``(u + qmin) * scale + offset`` per group, the same float32 operations as the training-time fake quantizer,
so the values are those the quantization-aware-trained model computed with. Blobs (SentencePiece model,
ONNX graph skeletons) are zlib-compressed.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .files import atomic_write

MAGIC = b"FQMODEL\x00"
FORMAT_VERSION = 2  # 2: balanced grids (their offsets computed, not stored)
READABLE_VERSIONS = (1, 2)
_PREFIX = struct.Struct("<8sIQ")
_DIGEST = 32
FLOAT_DTYPES = {"float16": np.float16, "float32": np.float32}


class ModelFileError(ValueError):
    """The model file is not a readable fairseq_quant export (truncated, corrupted, wrong version...)."""


def pack_bits(values: np.ndarray, bits: int) -> bytes:
    """Unsigned integers ``0 <= v < 2**bits`` packed densely, ``bits`` bits each, low bits first."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    flat = np.ascontiguousarray(values, dtype=np.uint8).reshape(-1)
    if flat.size and int(flat.max()) >= 1 << bits:
        raise ValueError(f"value {int(flat.max())} does not fit in {bits} bits")
    if bits == 8:
        return flat.tobytes()
    planes = (flat[:, None] >> np.arange(bits, dtype=np.uint8)) & 1
    return np.packbits(planes.reshape(-1), bitorder="little").tobytes()


def unpack_bits(data: bytes | np.ndarray, bits: int, count: int) -> np.ndarray:
    """Inverse of :func:`pack_bits`: ``count`` uint8 values."""
    raw = np.frombuffer(data, dtype=np.uint8)
    if raw.size * 8 < count * bits:
        raise ModelFileError(f"packed data holds {raw.size * 8} bits, {count * bits} needed")
    if bits == 8:
        return raw[:count].copy()
    planes = np.unpackbits(raw, count=count * bits, bitorder="little").reshape(count, bits)
    return (planes << np.arange(bits, dtype=np.uint8)).sum(axis=1, dtype=np.uint8)


def packed_nbytes(count: int, bits: int) -> int:
    return (count * bits + 7) // 8


def balanced_offset(scale: np.ndarray, bits: int) -> np.ndarray:
    """The offset of a balanced grid: ``scale * -(2**bits - 1) / 2`` in float32 (the training-time quantizer's
    own operation, so that the values are the same bit for bit)."""
    return scale.astype(np.float32) * np.float32(-((1 << bits) - 1) / 2)


@dataclass
class QuantTensor:
    """Integers ``q`` in ``[qmin, qmin + 2**bits - 1]`` in ``groups`` rows, a scale (and offset) per row."""

    shape: tuple[int, ...]
    bits: int
    qmin: int
    q: np.ndarray  # int32 [groups, group_size]
    scale: np.ndarray  # float32 [groups]
    offset: np.ndarray | None = None  # float32 [groups], None for symmetric grids

    @property
    def balanced(self) -> bool:
        """On a balanced grid: levels ``(u - (2**bits - 1) / 2) * scale``, as many above zero as below (1-bit
        binary weights, ``weight_method: balanced``), so the offset follows from the scale."""
        return (self.offset is not None and self.qmin == 0
                and np.array_equal(self.offset.astype(np.float32).reshape(-1),
                                   balanced_offset(self.scale, self.bits).reshape(-1)))

    def dequantize(self) -> np.ndarray:
        values = self.q.astype(np.float32) * self.scale.astype(np.float32)[:, None]
        if self.offset is not None:
            values = values + self.offset.astype(np.float32)[:, None]
        return values.reshape(self.shape)

    @property
    def groups(self) -> int:
        return self.q.shape[0]


@dataclass
class ModelFile:
    """What a ``.fqm`` file holds, in memory."""

    config: dict
    tensors: dict[str, QuantTensor | np.ndarray] = field(default_factory=dict)
    blobs: dict[str, bytes] = field(default_factory=dict)

    def float_tensor(self, name: str) -> np.ndarray:
        """A tensor as float32 (dequantized if it is quantized)."""
        tensor = self.tensors[name]
        return tensor.dequantize() if isinstance(tensor, QuantTensor) else tensor.astype(np.float32)


# ------------------------------------------------------------------------------------------------
# writing
# ------------------------------------------------------------------------------------------------
class _Data:
    def __init__(self):
        self.chunks: list[bytes] = []
        self.size = 0

    def add(self, data: bytes) -> dict:
        ref = {"offset": self.size, "nbytes": len(data)}
        self.chunks.append(data)
        self.size += len(data)
        return ref


def _scale_bytes(values: np.ndarray, dtype: str) -> bytes:
    return np.ascontiguousarray(values, dtype=FLOAT_DTYPES[dtype]).tobytes()


def encode(model: ModelFile, scale_dtype: str = "float32") -> tuple[bytes, dict]:
    """The file's bytes and a size breakdown {"weights", "scales", "floats", "blobs", "header"} in bytes."""
    data = _Data()
    sizes = {"weights": 0, "scales": 0, "floats": 0, "blobs": 0}
    tensors = {}
    for name, tensor in model.tensors.items():
        if isinstance(tensor, QuantTensor):
            u = tensor.q.astype(np.int64) - tensor.qmin
            if u.size and (u.min() < 0 or u.max() >= 1 << tensor.bits):
                raise ValueError(f"{name}: integers outside the {tensor.bits}-bit range")
            record = {"kind": "quant", "shape": list(tensor.shape), "bits": tensor.bits, "qmin": tensor.qmin,
                      "groups": int(tensor.q.shape[0]), "group_size": int(tensor.q.shape[1]),
                      "data": data.add(pack_bits(u.astype(np.uint8), tensor.bits)),
                      "scale_dtype": scale_dtype, "scale": data.add(_scale_bytes(tensor.scale, scale_dtype))}
            sizes["weights"] += record["data"]["nbytes"]
            sizes["scales"] += record["scale"]["nbytes"]
            if tensor.balanced:
                record["grid"] = "balanced"
            elif tensor.offset is not None:
                record["offset"] = data.add(_scale_bytes(tensor.offset, scale_dtype))
                sizes["scales"] += record["offset"]["nbytes"]
        else:
            dtype = "float16" if tensor.dtype == np.float16 else "float32"
            record = {"kind": "float", "dtype": dtype, "shape": list(tensor.shape),
                      "data": data.add(np.ascontiguousarray(tensor, dtype=FLOAT_DTYPES[dtype]).tobytes())}
            sizes["floats"] += record["data"]["nbytes"]
        tensors[name] = record
    blobs = {}
    for name, blob in model.blobs.items():
        blobs[name] = {"compression": "zlib", "raw_nbytes": len(blob), **data.add(zlib.compress(blob, 9))}
        sizes["blobs"] += blobs[name]["nbytes"]
    header = json.dumps({"format_version": FORMAT_VERSION, "config": model.config, "tensors": tensors,
                         "blobs": blobs}, separators=(",", ":")).encode()
    header = zlib.compress(header, 9)
    sizes["header"] = len(header)
    body = _PREFIX.pack(MAGIC, FORMAT_VERSION, len(header)) + header + b"".join(data.chunks)
    return body + hashlib.sha256(body).digest(), sizes


def write(path: str | os.PathLike, model: ModelFile, scale_dtype: str = "float32") -> dict:
    """Write atomically (temporary file in the same directory, then rename); returns the size breakdown."""
    payload, sizes = encode(model, scale_dtype)
    atomic_write(path, payload, fsync=True)
    sizes["total"] = len(payload)
    return sizes


# ------------------------------------------------------------------------------------------------
# reading
# ------------------------------------------------------------------------------------------------
def _slice(data: memoryview, ref, what: str) -> memoryview:
    try:
        offset, nbytes = int(ref["offset"]), int(ref["nbytes"])
    except (KeyError, TypeError, ValueError) as err:
        raise ModelFileError(f"{what}: malformed reference {ref!r}") from err
    if offset < 0 or nbytes < 0 or offset + nbytes > len(data):
        raise ModelFileError(f"{what}: bytes {offset}..{offset + nbytes} lie outside the data section "
                             f"({len(data)} bytes)")
    return data[offset:offset + nbytes]


def _read_floats(data, ref, dtype: str, count: int, what: str) -> np.ndarray:
    if dtype not in FLOAT_DTYPES:
        raise ModelFileError(f"{what}: unknown dtype {dtype!r}")
    raw = _slice(data, ref, what)
    expected = count * np.dtype(FLOAT_DTYPES[dtype]).itemsize
    if len(raw) != expected:
        raise ModelFileError(f"{what}: {len(raw)} bytes, expected {expected}")
    return np.frombuffer(raw, dtype=FLOAT_DTYPES[dtype]).copy()


def _tensor(name: str, record: dict, data: memoryview):
    what = f"tensor {name}"
    try:
        shape = tuple(int(d) for d in record["shape"])
        kind = record["kind"]
    except (KeyError, TypeError, ValueError) as err:
        raise ModelFileError(f"{what}: malformed record") from err
    count = int(np.prod(shape, dtype=np.int64))
    if kind == "float":
        return _read_floats(data, record.get("data"), record.get("dtype"), count, what).reshape(shape)
    if kind != "quant":
        raise ModelFileError(f"{what}: unknown kind {kind!r}")
    try:
        bits, qmin = int(record["bits"]), int(record["qmin"])
        groups, group_size = int(record["groups"]), int(record["group_size"])
        scale_dtype = record["scale_dtype"]
    except (KeyError, TypeError, ValueError) as err:
        raise ModelFileError(f"{what}: malformed record") from err
    if not 1 <= bits <= 8 or groups * group_size != count:
        raise ModelFileError(f"{what}: {bits} bits, {groups} x {group_size} values for shape {shape}")
    packed = _slice(data, record.get("data"), what)
    if len(packed) != packed_nbytes(count, bits):
        raise ModelFileError(f"{what}: {len(packed)} packed bytes, expected {packed_nbytes(count, bits)}")
    q = unpack_bits(packed, bits, count).astype(np.int32).reshape(groups, group_size) + qmin
    scale = _read_floats(data, record.get("scale"), scale_dtype, groups, f"{what} scales").astype(np.float32)
    offset = None
    grid = record.get("grid")
    if grid == "balanced":
        offset = balanced_offset(scale, bits)
    elif grid is not None:
        raise ModelFileError(f"{what}: unknown grid {grid!r}")
    elif "offset" in record:
        offset = _read_floats(data, record["offset"], scale_dtype, groups, f"{what} offsets").astype(np.float32)
    return QuantTensor(shape, bits, qmin, q, scale, offset)


def decode(payload: bytes, source: str = "model file") -> ModelFile:
    """Parse and verify a file's bytes; any problem raises one :class:`ModelFileError` naming it."""
    if len(payload) < _PREFIX.size + _DIGEST:
        raise ModelFileError(f"{source}: {len(payload)} bytes, too short to be a fairseq_quant model file "
                             "(truncated?)")
    magic, version, header_len = _PREFIX.unpack_from(payload)
    if magic != MAGIC:
        raise ModelFileError(f"{source}: not a fairseq_quant model file (magic {magic!r})")
    if version not in READABLE_VERSIONS:
        raise ModelFileError(f"{source}: format version {version}; this runtime reads versions "
                             f"{', '.join(map(str, READABLE_VERSIONS))} (re-export the model with a matching "
                             "fairseq_quant)")
    body, digest = payload[:-_DIGEST], payload[-_DIGEST:]
    if hashlib.sha256(body).digest() != digest:
        raise ModelFileError(f"{source}: checksum mismatch (the file is truncated or corrupted)")
    start = _PREFIX.size
    if start + header_len > len(body):
        raise ModelFileError(f"{source}: header of {header_len} bytes runs past the end of the file")
    try:
        header = json.loads(zlib.decompress(bytes(body[start:start + header_len])))
        config, records, blob_refs = header["config"], header["tensors"], header["blobs"]
    except (zlib.error, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise ModelFileError(f"{source}: unreadable header ({err})") from err
    data = memoryview(body)[start + header_len:]
    model = ModelFile(config=config)
    for name, record in records.items():
        model.tensors[name] = _tensor(name, record, data)
    for name, ref in blob_refs.items():
        try:
            model.blobs[name] = zlib.decompress(_slice(data, ref, f"blob {name}"))
        except zlib.error as err:
            raise ModelFileError(f"{source}: blob {name} does not decompress ({err})") from err
    return model


def read(path: str | os.PathLike) -> ModelFile:
    path = Path(path)
    try:
        payload = path.read_bytes()
    except OSError as err:
        raise ModelFileError(f"cannot read model file {path}: {err.strerror or err}") from err
    return decode(payload, str(path))


__all__ = ["FORMAT_VERSION", "MAGIC", "READABLE_VERSIONS", "ModelFile", "ModelFileError", "QuantTensor",
           "balanced_offset", "decode", "encode", "pack_bits", "packed_nbytes", "read", "unpack_bits", "write"]
