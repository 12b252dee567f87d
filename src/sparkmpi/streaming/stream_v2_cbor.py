"""Stream V2's CBOR: one message is a map; arrays are RFC 8746 typed arrays (tags 64-87) inside
multi-dimensional arrays (tags 40, 1040), possibly compressed with the DECTRIS tag 56500
(``[algorithm, element size, bytes]``: ``bslz4``, ``lz4``), decompressed with the maintained
``dectris-compression`` library, never by hand. Every failure is a :class:`MalformedRecord`.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from sparkmpi.streaming.protocol import MalformedRecord

DTYPES = ("uint8", "uint16", "uint32")
COMPRESSION = ("bslz4", "lz4")
TYPED_ARRAYS = {  # RFC 8746 section 2.1 tag -> dtype (half and quad floats are not supported)
    64: "u1", 65: ">u2", 66: ">u4", 67: ">u8", 68: "u1", 69: "<u2", 70: "<u4", 71: "<u8",
    72: "i1", 73: ">i2", 74: ">i4", 75: ">i8", 77: "<i2", 78: "<i4", 79: "<i8",
    81: ">f4", 82: ">f8", 85: "<f4", 86: "<f8",
}  # fmt: skip
TAG_TYPED = {dtype: tag for tag, dtype in TYPED_ARRAYS.items() if tag != 68}


@dataclass(frozen=True)
class Compressed:
    """The content of a tag 56500 (not decompressed): algorithm, element size, bytes."""

    algorithm: str
    elem_size: int
    data: bytes


def _decompress(value: Compressed, limit: int) -> bytes:
    from dectris.compression import decompress

    if value.algorithm not in COMPRESSION:
        raise MalformedRecord(f"compression {value.algorithm!r} is not one of {COMPRESSION}")
    size = int.from_bytes(value.data[:8], "big")  # HDF5 framing: decompressed size first
    if len(value.data) < 12 or size > limit:
        raise MalformedRecord(f"{value.algorithm} data claims {size} bytes, at most {limit}")
    try:
        return decompress(value.data, value.algorithm, elem_size=value.elem_size)
    except Exception as exc:
        raise MalformedRecord(f"{value.algorithm} data does not decompress ({exc})") from None


def _hook(limit: int | None):
    """A cbor2 tag hook: 56500 -> :class:`Compressed`; typed arrays -> numpy arrays (their
    compressed content decompressed, at most ``limit`` bytes; None: left compressed);
    tag 40 / 1040 -> shaped arrays."""

    def hook(tag, immutable):
        value = tag.value
        if tag.tag == 56500:
            fields = tuple(value) if isinstance(value, list | tuple) else ()
            types = tuple(type(v) for v in fields)
            if types != (str, int, bytes):
                raise MalformedRecord("tag 56500 is not [algorithm, elem_size, bytes]")
            return Compressed(*fields)
        if tag.tag in TYPED_ARRAYS:
            if isinstance(value, Compressed):
                if limit is None:
                    return value
                value = _decompress(value, limit)
            if not isinstance(value, bytes):
                raise MalformedRecord(f"typed array tag {tag.tag} holds no byte string")
            dtype = np.dtype(TYPED_ARRAYS[tag.tag])
            if len(value) % dtype.itemsize:
                raise MalformedRecord(f"{len(value)} bytes are not whole {dtype} values")
            return np.frombuffer(value, dtype=dtype)
        if tag.tag in (40, 1040):
            if not (isinstance(value, list | tuple) and len(value) == 2):
                raise MalformedRecord(f"tag {tag.tag} is not [dimensions, array]")
            dims, array = value
            if isinstance(array, Compressed):
                return (tuple(dims), array)
            if not isinstance(array, np.ndarray):
                array = np.asarray(array)
            try:
                return array.reshape(tuple(dims), order="F" if tag.tag == 1040 else "C")
            except (TypeError, ValueError):
                raise MalformedRecord(f"{array.size} values are not {dims}") from None
        return tag

    return hook


def loads(message: bytes, limit: int | None = None) -> Mapping:
    """The top-level map of one Stream V2 message (with or without the self-describe tag
    55799), arrays decoded and, unless ``limit`` is None, decompressed (at most ``limit``
    bytes each); :class:`MalformedRecord` saying why it is not one."""
    import cbor2

    stream = io.BytesIO(message)
    try:
        value = cbor2.CBORDecoder(stream, tag_hook=_hook(limit)).decode()
    except cbor2.CBORDecodeEOF:
        raise MalformedRecord(f"truncated CBOR ({len(message)} bytes)") from None
    except (cbor2.CBORError, ValueError, TypeError, RecursionError) as exc:
        cause = exc.__cause__
        if isinstance(cause, MalformedRecord):
            raise MalformedRecord(str(cause)) from None
        raise MalformedRecord(f"not CBOR ({exc})") from None
    if stream.tell() != len(message):
        raise MalformedRecord(f"{len(message) - stream.tell()} bytes after the CBOR message")
    if not isinstance(value, Mapping) or not isinstance(value.get("type"), str):
        raise MalformedRecord("not a Stream V2 message (a map with a text 'type')")
    return value


def plain(value: Any) -> Any:
    """``value`` as JSON-able Python: maps -> dicts, sequences and arrays -> lists."""
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    return value
