"""One parsing rule per request parameter, whatever the route or encoding.

``deadline_ms`` and ``flops_budget`` arrive as JSON numbers (``/classify``,
``/batch``, v2 ``parameters``), multipart form fields or query strings; base64
images arrive in JSON bodies and v2 ``BYTES`` tensors; the request id arrives in
a header. Each has one function here, used by every route, so one input gets one
answer everywhere.

Rules:

- a positive number is a finite float greater than 0 and at most
  :data:`MAX_NUMBER`; a JSON integer too large for a float (``1`` followed by 400
  zeros), ``1e309``, ``"Infinity"`` and ``NaN`` are refused with 422 naming the
  field (never a 500, never echoed as ``null``); booleans are not numbers;
- base64 is the standard alphabet with padding, validated (``binascii``);
- a request id is 1 to 128 characters of ``[A-Za-z0-9._:-]``; anything else is
  replaced by a generated id (never echoed or logged verbatim).
"""

from __future__ import annotations

import base64
import binascii
import math
import re
import uuid

from pydantic import ValidationError

from .. import errors

# Far above any real deadline (ms) or budget (FLOPs), far below float overflow.
MAX_NUMBER = 1e30
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def positive_number(value, name: str) -> float | None:
    """``value`` as a positive finite float; None or "" give None.

    Accepts int, float and numeric strings (form fields, query strings).

    Raises:
        errors.InvalidParameter: (422, ``field=name``) for anything else: zero,
            negatives, NaN, infinities, numbers beyond :data:`MAX_NUMBER`
            (including integers too large for a float), booleans, other types.
    """
    if value is None or (isinstance(value, str) and value.strip() == ""):
        return None
    problem = f"{name} must be a positive finite number (at most {MAX_NUMBER:g}), got {_show(value)}"
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise errors.InvalidParameter(problem, field=name)
    try:
        v = float(value)
    except (ValueError, OverflowError):
        raise errors.InvalidParameter(problem, field=name) from None
    if not (math.isfinite(v) and 0 < v <= MAX_NUMBER):
        raise errors.InvalidParameter(problem, field=name)
    return v


def _show(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:20]}...({len(text)} characters)"


_WHITESPACE = str.maketrans("", "", " \t\r\n")


def b64decode(value, what: str) -> bytes:
    """Decode standard base64 (validated). Line breaks and spaces are dropped first
    (GNU ``base64`` wraps at 76 characters), and a data URL's
    ``data:<type>;base64,`` prefix, as browsers write it.

    Raises:
        errors.BadImage: (400) naming ``what`` when ``value`` is not a string of
            valid base64.
    """
    if not isinstance(value, str):
        raise errors.BadImage(f"{what} must be a base64 string, got {type(value).__name__}")
    if value.startswith("data:") and ";base64," in value[:256]:
        value = value[value.index(";base64,") + len(";base64,"):]
    try:
        return base64.b64decode(value.translate(_WHITESPACE), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise errors.BadImage(f"{what} is not valid base64: {exc}") from exc


def request_id(raw: bytes | None) -> str:
    """The client's ``X-Request-ID`` when it is safe to echo and log, else a new one.

    Safe: 1 to 128 characters of ``[A-Za-z0-9._:-]`` (bytes decoded as Latin-1,
    so no header value can fail to decode).
    """
    if raw is not None:
        text = raw.decode("latin-1")
        if _REQUEST_ID.fullmatch(text):
            return text
    return uuid.uuid4().hex[:16]


def label(value, classes) -> int:
    """A true label as a class id: a JSON integer in ``[0, len(classes))`` or a class
    name exactly as the model spells it (``classes``).

    Raises:
        errors.InvalidParameter: (422, ``field="label"``) for anything else (booleans,
            floats, ids out of range, unknown names), naming the valid ones.
    """
    n = len(classes)
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < n:
        return value
    if isinstance(value, str) and value in classes:
        return list(classes).index(value)
    names = ", ".join(repr(c) for c in list(classes)[:10]) + (", ..." if n > 10 else "")
    raise errors.InvalidParameter(f"label must be a class id 0..{n - 1} or a class name ({names}), got {_show(value)}",
                                  field="label")


def image_count(n: int, limit: int, where: str = "request") -> None:
    """Refuse a request with more than ``limit`` images (``where``: "/batch" or "request", for the message).

    Raises:
        errors.TooLarge: (413) when ``n > limit``.
    """
    if n > limit:
        raise errors.TooLarge(f"{n} images; at most {limit} per {where}", max_images=limit)


def content_type(headers) -> str:
    """The media type of a request's ``Content-Type`` (lower case, no parameters)."""
    return headers.get("content-type", "").split(";")[0].strip().lower()


async def json_body(request, model):
    """The request body parsed and validated as the pydantic ``model``.

    Raises:
        errors.InvalidParameter: (422) naming each field that fails, the first as ``field``.
    """
    try:
        return model.model_validate_json(await request.body())
    except ValidationError as exc:
        problems = [(".".join(str(p) for p in e["loc"]) or "body", e["msg"].removeprefix("Value error, "))
                    for e in exc.errors()]
        # a rule of this module already names its field ("deadline_ms must be ..."): not twice
        raise errors.InvalidParameter("; ".join(msg if msg.startswith(f"{where} ") else f"{where}: {msg}"
                                                for where, msg in problems), field=problems[0][0]) from None
