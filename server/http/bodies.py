"""How ``/classify`` and ``/batch`` read their request bodies: one table of readers,
one per media type, from which both the parsing and the OpenAPI ``requestBody`` come.

An endpoint (:class:`BodySpec`) names its JSON model, its multipart file field, the
number it takes (``deadline_ms`` or ``flops_budget``) and the media types it accepts;
:func:`read_body` picks the reader for the request's ``Content-Type`` and returns a
:class:`Body`; :func:`openapi` derives the route's ``openapi_extra``. A new body
encoding is one :class:`Reader` in :data:`READERS` and its name in a spec's ``accepts``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from fastapi import Request
from pydantic import BaseModel
from starlette.datastructures import UploadFile

from .. import errors
from . import params

_POSITIVE = {"type": "number", "exclusiveMinimum": 0, "maximum": params.MAX_NUMBER}
_BINARY = {"type": "string", "format": "binary"}


@dataclass(frozen=True)
class Base64:
    """One base64 image from a JSON list, decoded off the event loop by :meth:`decode`
    so that a bad one fails alone (``/batch``: an error entry in its place)."""

    text: str
    field: str  # e.g. "images[3]", named in the error

    def decode(self) -> bytes:
        """The image file's bytes. Raises :class:`server.errors.BadImage` (400) when
        ``text`` is not base64."""
        return params.b64decode(self.text, self.field)


@dataclass(frozen=True)
class Body:
    """What a body carried: the encoded image files in order (bytes, or :class:`Base64`
    still to decode) and the endpoint's number (``deadline_ms`` in milliseconds or
    ``flops_budget`` in FLOPs; None when not given)."""

    images: list[bytes | Base64]
    number: float | None


@dataclass(frozen=True)
class BodySpec:
    """What one endpoint takes. ``many``: a list of images (``/batch``), else exactly one;
    ``json_field``/``file_field``: where the images are in a JSON or multipart body;
    ``number``: the numeric parameter beside them; ``accepts``: keys of :data:`READERS`,
    in the order the OpenAPI document and the 415 message list them."""

    path: str
    json_model: type[BaseModel]
    json_field: str
    file_field: str
    number: str
    many: bool
    accepts: tuple[str, ...]
    number_doc: str = ""


@dataclass(frozen=True)
class Reader:
    """One body encoding: ``matches(media_type)``, ``doc(spec)`` (the OpenAPI content
    entry) and ``read(request, spec, max_images)`` (raises the 4xx
    :class:`server.errors.ServiceError` that names the problem)."""

    matches: Callable[[str], bool]
    doc: Callable[[BodySpec], dict]
    read: Callable[[Request, BodySpec, int], Awaitable[Body]]


async def _read_json(request: Request, spec: BodySpec, max_images: int) -> Body:
    body = await params.json_body(request, spec.json_model)
    value, number = getattr(body, spec.json_field), getattr(body, spec.number)
    if not spec.many:  # one image: its base64 is checked at once, before admission
        return Body([params.b64decode(value, spec.json_field)], number)
    params.image_count(len(value), max_images, spec.path)
    return Body([Base64(s, f"{spec.json_field}[{i}]") for i, s in enumerate(value)], number)


async def _read_multipart(request: Request, spec: BodySpec, max_images: int) -> Body:
    if not spec.many:
        form = await request.form()
        uploads = form.getlist(spec.file_field)
        if len(uploads) > 1:  # the last one used to win, silently
            raise errors.BadRequest(f"multipart body has {len(uploads)} file fields named {spec.file_field!r}; "
                                    "send one (several images: POST /batch)")
        upload = form.get(spec.file_field)
        if not isinstance(upload, UploadFile):
            raise errors.BadRequest(f"multipart body needs a file field named {spec.file_field!r}")
        return Body([await upload.read()], params.positive_number(form.get(spec.number), spec.number))
    form = await request.form(max_files=max_images + 1)
    names = (spec.file_field, spec.file_field.rstrip("s"))  # "file" is taken for "files" too
    uploads = [v for k, v in form.multi_items() if k in names and isinstance(v, UploadFile)]
    if not uploads:
        raise errors.BadRequest(f"multipart body needs one or more file fields named {names[0]!r} "
                                f"(or {names[1]!r})")
    params.image_count(len(uploads), max_images, spec.path)
    number = params.positive_number(form.get(spec.number), spec.number)
    return Body([await u.read() for u in uploads], number)


async def _read_raw(request: Request, spec: BodySpec, max_images: int) -> Body:
    data = await request.body()
    return Body([data], params.positive_number(request.query_params.get(spec.number), spec.number))


def _json_doc(spec: BodySpec) -> dict:
    return json_content(spec.json_model)


def _multipart_doc(spec: BodySpec) -> dict:
    files = {"type": "array", "items": _BINARY} if spec.many else _BINARY
    return {"schema": {"type": "object", "required": [spec.file_field],
                       "properties": {spec.file_field: files, spec.number: _POSITIVE}}}


def _raw_doc(spec: BodySpec) -> dict:
    return {"schema": _BINARY}


READERS: dict[str, Reader] = {
    "application/json": Reader(lambda m: m == "application/json", _json_doc, _read_json),
    "multipart/form-data": Reader(lambda m: m == "multipart/form-data", _multipart_doc, _read_multipart),
    "image/*": Reader(lambda m: m.startswith("image/"), _raw_doc, _read_raw),
    "application/octet-stream": Reader(lambda m: m == "application/octet-stream", _raw_doc, _read_raw),
}
RAW = ("image/*", "application/octet-stream")  # the body is the image file; the number is a query parameter


def json_content(model: type[BaseModel]) -> dict:
    """The OpenAPI content entry of a JSON body: the model's schema and first example."""
    return {"schema": model.model_json_schema(), "example": model.model_config["json_schema_extra"]["examples"][0]}


async def read_body(request: Request, spec: BodySpec, max_images: int = 1) -> Body:
    """The body of ``request`` read by the reader of its media type. The number
    (``deadline_ms``, ``flops_budget``) may also come in the query string, whatever the
    body: it follows the same rule, and given in both places it is refused.

    Raises :class:`server.errors.UnsupportedMedia` (415) naming the accepted types
    when ``spec`` takes no such body, :class:`server.errors.InvalidParameter` (422) for
    a bad or twice-given number, and the reader's 400/413/422 when the body is bad
    (``max_images``: the most images a ``many`` body may carry)."""
    media = params.content_type(request.headers)
    for key in spec.accepts:
        if READERS[key].matches(media):
            body = await READERS[key].read(request, spec, max_images)
            if key not in RAW and spec.number in request.query_params:  # one rule wherever it is given
                query = params.positive_number(request.query_params.get(spec.number), spec.number)
                if body.number is not None:
                    raise errors.InvalidParameter(f"{spec.number} is given twice (body and query string); "
                                                  "give it once", field=spec.number)
                body = Body(body.images, query)
            return body
    listed = ", ".join(spec.accepts[:-1]) + " or " + spec.accepts[-1]
    raise errors.UnsupportedMedia(f"content type {media or '(none)'!r} is not accepted; send {listed}")


def openapi(spec: BodySpec) -> dict:
    """The route's ``openapi_extra``: the ``requestBody`` with one content entry per
    accepted media type, and the number as a query parameter."""
    return {"requestBody": {"required": True, "content": {key: READERS[key].doc(spec) for key in spec.accepts}},
            "parameters": [{"name": spec.number, "in": "query", "required": False, "schema": _POSITIVE,
                            "description": spec.number_doc + " In the query string with any body (a raw image "
                            "body has no other place for it), but not in both the body and the query."}]}
