"""Open Inference Protocol v2 tensors: the request body's JSON header and binary
tail, the inputs decoded to model inputs, and the outputs encoded (JSON or the
binary tensor data extension, little-endian). See :mod:`server.http.v2`.
"""

from __future__ import annotations

import json
import struct

import numpy as np

from model.transforms import InputContract

from .. import errors
from ..settings import Settings
from . import decoding
from . import params as rules

OUTPUTS = {"probabilities": "FP32", "label": "BYTES", "class_id": "INT64", "exit": "INT32", "flops": "INT64"}
NUMPY = {"FP32": "<f4", "INT64": "<i8", "INT32": "<i4"}  # the protocol's binary layout is little-endian


def parse_body(body: bytes, header_length: str | None) -> tuple[dict, bytes]:
    """(JSON header, binary tail) of an inference request."""
    if header_length is None:
        split = len(body)
    else:
        try:
            split = int(header_length)
        except ValueError:
            raise errors.BadRequest(f"Inference-Header-Content-Length {header_length!r} is not an integer") from None
        if not 0 < split <= len(body):
            raise errors.BadRequest(f"Inference-Header-Content-Length {split} is outside the body's "
                                    f"{len(body)} bytes")
    try:
        header = json.loads(body[:split])
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise errors.BadRequest(f"request header is not valid JSON: {exc}") from None
    if not isinstance(header, dict):
        raise errors.BadRequest("request header must be a JSON object")
    return header, body[split:]


def bytes_elements(raw: bytes, count: int) -> list[bytes]:
    """The protocol's BYTES layout: per element a uint32 LE length, then the bytes."""
    out, pos = [], 0
    while pos < len(raw):
        if pos + 4 > len(raw):
            raise errors.BadRequest("image_bytes: binary data ends inside an element's 4-byte length")
        (n,) = struct.unpack_from("<I", raw, pos)
        if pos + 4 + n > len(raw):
            raise errors.BadRequest(f"image_bytes: element {len(out)} says {n} bytes, past the end of its data")
        out.append(raw[pos + 4: pos + 4 + n])
        pos += 4 + n
    if len(out) != count:
        raise errors.BadRequest(f"image_bytes: shape says {count} elements, binary data holds {len(out)}")
    return out


def flatten(data) -> list:
    """Nested JSON lists (row-major) to one flat list (iterative: any depth)."""
    out, stack = [], [iter([data])]
    while stack:
        for x in stack[-1]:
            if isinstance(x, list):
                stack.append(iter(x))
                break
            out.append(x)
        else:
            stack.pop()
    return out


def decode_inputs(contract: InputContract, settings: Settings, inputs: list, tail: bytes) -> list[np.ndarray]:
    """The request's images, each float32 (C, H, W) normalised by ``contract``, as
    :func:`server.http.decoding.decode` gives them.

    Raises:
        errors.ServiceError: malformed input (400), too many images (413), or
            an image ``decode`` refuses (its status, the input index prefixed).
    """
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise errors.BadRequest("inputs must hold exactly one tensor: 'image' (FP32 [N, C, H, W], normalised) "
                                "or 'image_bytes' (BYTES [N], encoded image files)")
    t = inputs[0]
    name, datatype, shape, params = t.get("name"), t.get("datatype"), t.get("shape"), t.get("parameters") or {}
    if not isinstance(params, dict):
        raise errors.BadRequest(f"input {name!r}: parameters must be a JSON object")
    expected = {"image": "FP32", "image_bytes": "BYTES"}
    if name not in expected:
        raise errors.BadRequest(f"unknown input {name!r}; inputs: 'image' (FP32) or 'image_bytes' (BYTES)")
    if datatype != expected[name]:
        raise errors.BadRequest(f"input '{name}' must have datatype {expected[name]}, got {datatype!r}")
    if not (isinstance(shape, list) and shape and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                                      for d in shape)):
        raise errors.BadRequest(f"input '{name}': shape must be a list of non-negative integers, got {shape!r}")
    s = contract
    if name == "image" and shape[1:] != [s.channels, s.image_size, s.image_size]:
        raise errors.BadRequest(f"input 'image': shape {shape} is not [N, {s.channels}, {s.image_size}, "
                                f"{s.image_size}]")
    n = shape[0] if name == "image" else int(np.prod(shape))
    if n < 1:
        raise errors.BadRequest(f"input '{name}' holds no images (shape {shape})")
    rules.image_count(n, settings.max_batch_images)
    size = params.get("binary_data_size")
    if size is not None:
        if not isinstance(size, int) or isinstance(size, bool) or size != len(tail):
            raise errors.BadRequest(f"input '{name}': binary_data_size {size!r} does not match the {len(tail)} "
                                    "bytes after the JSON header (is Inference-Header-Content-Length set?)")
    elif tail:
        raise errors.BadRequest(f"{len(tail)} bytes follow the JSON header but no input has binary_data_size")
    elif "data" not in t:
        raise errors.BadRequest(f"input '{name}' has neither 'data' nor binary_data_size")

    if name == "image":
        count = int(np.prod(shape))
        if size is not None:
            if size != 4 * count:
                raise errors.BadRequest(f"input 'image': {size} bytes of binary data, shape {shape} needs "
                                        f"{4 * count} (FP32)")
            arr = np.frombuffer(tail, dtype="<f4")
        else:
            flat = flatten(t["data"])
            if len(flat) != count or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in flat):
                raise errors.BadRequest(f"input 'image': data must be {count} numbers for shape {shape}")
            try:
                arr = np.asarray(flat, dtype=np.float32)
            except OverflowError:  # a JSON integer too large for any float
                raise errors.BadRequest("input 'image' holds a number too large for FP32") from None
        if not np.isfinite(arr).all():
            raise errors.BadRequest("input 'image' holds NaN or infinite values")
        arr = arr.astype(np.float32).reshape(shape)
        return [np.ascontiguousarray(a) for a in arr]

    if size is not None:
        files = bytes_elements(tail, n)
    else:
        flat = flatten(t["data"])
        if len(flat) != n or not all(isinstance(v, str) for v in flat):
            raise errors.BadRequest(f"input 'image_bytes': data must be {n} base64 strings for shape {shape}")
        files = [rules.b64decode(v, f"image_bytes[{i}]") for i, v in enumerate(flat)]
    images = []
    for i, data in enumerate(files):
        try:
            images.append(decoding.decode(data, contract, settings))
        except errors.ServiceError as exc:
            raise type(exc)(f"image_bytes[{i}]: {exc.message}", headers=exc.headers, **exc.details) from None
    return images


def requested_outputs(header: dict) -> list[tuple[str, bool]]:
    """(name, binary) per output to return, in response order."""
    params = header.get("parameters") or {}
    default_binary = params.get("binary_data_output", False)
    if not isinstance(default_binary, bool):
        raise errors.BadRequest(f"parameter binary_data_output must be a boolean, got {default_binary!r}")
    asked = header.get("outputs")
    if asked is None:
        return [(name, default_binary) for name in OUTPUTS]
    if not isinstance(asked, list) or not all(isinstance(o, dict) for o in asked):
        raise errors.BadRequest("outputs must be a list of objects with a 'name'")
    out = []
    for o in asked:
        name, p = o.get("name"), o.get("parameters") or {}
        if name not in OUTPUTS:
            raise errors.BadRequest(f"unknown output {name!r}; outputs: {', '.join(OUTPUTS)}")
        if not isinstance(p, dict):
            raise errors.BadRequest(f"output '{name}': parameters must be a JSON object")
        if "classification" in p:
            raise errors.BadRequest("the classification extension is not supported; ask for 'label' and "
                                    "'probabilities'")
        binary = p.get("binary_data", default_binary)
        if not isinstance(binary, bool):
            raise errors.BadRequest(f"output '{name}': binary_data must be a boolean, got {binary!r}")
        out.append((name, binary))
    return out


def encode_tensor(name: str, array: np.ndarray | list[bytes], binary: bool) -> tuple[dict, bytes]:
    """One output's JSON entry and its binary data (b"" when sent as JSON)."""
    datatype = OUTPUTS[name]
    if datatype == "BYTES":
        shape = [len(array)]
        raw = b"".join(struct.pack("<I", len(b)) + b for b in array) if binary else b""
        data = [b.decode() for b in array]
    else:
        array = np.ascontiguousarray(array, dtype=NUMPY[datatype])
        shape = list(array.shape)
        raw = array.tobytes() if binary else b""
        data = array.ravel().tolist()
    entry = {"name": name, "datatype": datatype, "shape": shape}
    if binary:
        entry["parameters"] = {"binary_data_size": len(raw)}
    else:
        entry["data"] = data
    return entry, raw
