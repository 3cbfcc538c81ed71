"""What the door checks of a multipart/form-data body before BentoML parses it (service.http.guards)."""

from __future__ import annotations

from python_multipart.multipart import MultipartParser, parse_options_header

from service.core.refusals import Refusal

# Multipart fields that must carry uploaded files. BentoML would treat a plain
# text value in such a field as a URL and download it (server-side request
# forgery); we refuse that before BentoML sees the form.
FILE_FIELDS = ("images", "image")


def multipart_refusal(content_type: bytes, body: bytes) -> Refusal | None:
    """What is wrong with a multipart body, read from its part headers alone: a body BentoML would
    choke on (a 500 there), or a text value in a file field (which BentoML would fetch as a URL)."""
    malformed = Refusal(400, "malformed_multipart", "the multipart/form-data body could not be parsed")
    boundary = multipart_boundary(content_type)
    if boundary is None:
        return malformed  # multipart without a boundary cannot be parsed at all
    names_without_filename: list[bytes] = []
    header: dict[bytes, bytearray] = {}
    current = bytearray()

    def on_header_field(data: bytes, start: int, end: int) -> None:
        current[:] = data[start:end].lower()
        header.setdefault(bytes(current), bytearray())

    def on_header_value(data: bytes, start: int, end: int) -> None:
        header[bytes(current)] += data[start:end]

    def on_headers_finished() -> None:
        _, params = parse_options_header(bytes(header.get(b"content-disposition", b"")))
        if b"filename" not in params:  # a plain text part (a file part always names its file)
            names_without_filename.append(params.get(b"name", b""))
        header.clear()

    parser = MultipartParser(boundary, {"on_header_field": on_header_field, "on_header_value": on_header_value,
                                        "on_headers_finished": on_headers_finished})
    try:
        parser.write(body)
        parser.finalize()
    except Exception:
        return malformed
    if any(name.decode("latin-1") in FILE_FIELDS for name in names_without_filename):
        return Refusal(400, "file_field_not_a_file",
                       "multipart fields `images`/`image` must be uploaded files; URLs are not fetched")
    return None


def multipart_boundary(content_type: bytes) -> bytes | None:
    if content_type.lower().startswith(b"multipart/form-data"):
        for param in content_type.split(b";")[1:]:
            key, _, val = param.strip().partition(b"=")
            if key.lower() == b"boundary":
                return val.strip(b'"')
    return None
