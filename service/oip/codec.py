"""The Open Inference Protocol's wire format (KServe v2 REST), with Triton's binary tensor data
extension: request bodies to tensors, tensors to response bodies. No HTTP, no model.

A body is a JSON object, optionally followed by binary tensor data; then the header
`Inference-Header-Content-Length` gives the JSON's length, and each input sent as binary
data says its size in `parameters.binary_data_size`, in input order. Binary tensors are
little-endian, row-major; a BYTES element is a 4-byte little-endian length and its bytes.
In JSON, BYTES elements are strings: here each is an encoded image in base64 (raw image
bytes cannot be JSON text). Everything a client can get wrong is a Refusal (400) naming it.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field

import numpy as np

from service.core.refusals import Refusal
from service.core.inputs import b64decode

NUMPY_DTYPES = {"UINT8": np.uint8, "INT64": np.int64, "FP32": np.float32}
DATATYPES = ("BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64",
             "FP16", "FP32", "FP64", "BYTES")


def bad_request(reason: str, detail: str) -> Refusal:
    return Refusal(400, reason, detail)


@dataclass
class InputTensor:
    name: str
    datatype: str
    shape: list[int]
    parameters: dict
    data: object = None  # the JSON `data`, or the tensor's binary bytes (memoryview)
    binary: bool = False

    @property
    def elements(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    def uint8(self) -> np.ndarray:
        """The tensor as a uint8 array of its shape."""
        if self.binary:
            if len(self.data) != self.elements:
                raise bad_request("size_mismatch", f"input {self.name!r}: shape {self.shape} is {self.elements:,} "
                                                   f"UINT8 values, but binary_data_size is {len(self.data):,} bytes")
            # a copy: the body is read-only, and torch.from_numpy warns on (and must not write to) such arrays
            return np.frombuffer(self.data, dtype=np.uint8).reshape(self.shape).copy()
        try:
            values = np.asarray(self.data, dtype=np.int64)
        except (ValueError, TypeError, OverflowError):
            raise bad_request("invalid_data", f"input {self.name!r}: `data` must be a (flat or nested) list of "
                                              "integers 0..255") from None
        if values.size != self.elements:
            raise bad_request("size_mismatch", f"input {self.name!r}: shape {self.shape} is {self.elements:,} "
                                               f"values; `data` has {values.size:,}")
        if values.size and (values.min() < 0 or values.max() > 255):
            raise bad_request("invalid_data", f"input {self.name!r}: UINT8 values must be in 0..255")
        return values.astype(np.uint8).reshape(self.shape)

    def bytes_elements(self) -> list[bytes]:
        """The elements of a BYTES tensor: from binary (length-prefixed) or JSON (base64 strings)."""
        if self.binary:
            found = split_bytes(self.data, self.name)
        else:
            texts = _flatten(self.data, self.name)
            found = []
            for index, text in enumerate(texts):
                if not isinstance(text, str):
                    raise bad_request("invalid_data", f"input {self.name!r}: BYTES elements in JSON must be "
                                                      "strings (the encoded image in base64)")
                found.append(b64decode(text, f"{self.name}[{index}]"))
        if len(found) != self.elements:
            raise bad_request("size_mismatch", f"input {self.name!r}: shape {self.shape} is {self.elements} "
                                               f"elements; the data has {len(found)}")
        return found


@dataclass
class RequestedOutput:
    name: str
    parameters: dict = field(default_factory=dict)


@dataclass
class InferRequest:
    id: str | None
    parameters: dict
    inputs: list[InputTensor]
    outputs: list[RequestedOutput] | None  # None: the model's default outputs


def parse_request(body: bytes, header_length: str | None) -> InferRequest:
    """An inference request from its body and Inference-Header-Content-Length (None: all JSON)."""
    view = memoryview(body)
    if header_length is None:
        json_part, binary = view, view[len(view):]
    else:
        try:
            size = int(header_length)
        except ValueError:
            size = -1
        if not 0 <= size <= len(view):
            raise bad_request("invalid_header_length", f"Inference-Header-Content-Length is {header_length!r}; "
                                                       f"the body has {len(view):,} bytes")
        json_part, binary = view[:size], view[size:]
    try:
        header = json.loads(bytes(json_part))
    except (ValueError, UnicodeDecodeError, RecursionError):  # RecursionError: nested past the parser's depth
        raise bad_request("invalid_json", "the inference request is not valid JSON (with binary tensor data, "
                                          "Inference-Header-Content-Length must give the JSON's length)") from None
    if not isinstance(header, dict):
        raise bad_request("invalid_request", "the inference request must be a JSON object")
    inputs, offset = [], 0
    raw_inputs = header.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise bad_request("no_input", "`inputs` must be a non-empty list")
    for raw in raw_inputs:
        tensor, offset = _input(raw, binary, offset)
        inputs.append(tensor)
    if offset != len(binary):
        raise bad_request("size_mismatch", f"{len(binary) - offset:,} bytes of binary data follow the JSON beyond "
                                           "the inputs' binary_data_size")
    outputs = header.get("outputs")
    if outputs is not None:
        if not isinstance(outputs, list) or not all(isinstance(o, dict) and isinstance(o.get("name"), str)
                                                    for o in outputs):
            raise bad_request("invalid_request", "`outputs` must be a list of objects with a `name`")
        outputs = [RequestedOutput(o["name"], _parameters(o, f"output {o['name']!r}")) for o in outputs]
    request_id = header.get("id")
    return InferRequest(None if request_id is None else str(request_id), _parameters(header, "the request"),
                        inputs, outputs)


def _parameters(holder: dict, where: str) -> dict:
    parameters = holder.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise bad_request("invalid_request", f"`parameters` of {where} must be an object")
    return parameters


def _input(raw, binary: memoryview, offset: int) -> tuple[InputTensor, int]:
    if not isinstance(raw, dict) or not isinstance(raw.get("name"), str):
        raise bad_request("invalid_request", "each input must be an object with a `name`")
    name, datatype, shape = raw["name"], raw.get("datatype"), raw.get("shape")
    if datatype not in DATATYPES:
        raise bad_request("invalid_datatype", f"input {name!r}: datatype {datatype!r} is not one of {list(DATATYPES)}")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                              for d in shape):
        raise bad_request("invalid_shape", f"input {name!r}: `shape` must be a list of non-negative integers")
    parameters = _parameters(raw, f"input {name!r}")
    size = parameters.get("binary_data_size")
    if size is None:
        if "data" not in raw:
            raise bad_request("no_data", f"input {name!r} has neither `data` nor parameters.binary_data_size")
        return InputTensor(name, datatype, shape, parameters, raw["data"]), offset
    if not isinstance(size, int) or isinstance(size, bool) or size < 0 or offset + size > len(binary):
        raise bad_request("size_mismatch", f"input {name!r}: binary_data_size {size!r} does not fit the "
                                           f"{len(binary) - offset:,} bytes of binary data left")
    return InputTensor(name, datatype, shape, parameters, binary[offset:offset + size], True), offset + size


def split_bytes(data: memoryview, name: str) -> list[bytes]:
    """BYTES tensor data: each element a 4-byte little-endian length, then its bytes."""
    elements, offset = [], 0
    while offset < len(data):
        if offset + 4 > len(data):
            raise bad_request("size_mismatch", f"input {name!r}: BYTES data ends inside an element's length")
        (length,) = struct.unpack_from("<I", data, offset)
        offset += 4
        if offset + length > len(data):
            raise bad_request("size_mismatch", f"input {name!r}: a BYTES element claims {length:,} bytes; "
                                               f"{len(data) - offset:,} are left")
        elements.append(bytes(data[offset:offset + length]))
        offset += length
    return elements


def _flatten(data, name: str) -> list:
    if not isinstance(data, list):
        raise bad_request("invalid_data", f"input {name!r}: `data` must be a list")
    flat = []
    stack = [iter(data)]
    while stack:
        item = next(stack[-1], StopIteration)
        if item is StopIteration:
            stack.pop()
        elif isinstance(item, list):
            stack.append(iter(item))
        else:
            flat.append(item)
    return flat


@dataclass
class OutputTensor:
    name: str
    datatype: str  # FP32 | INT64 | BYTES
    value: np.ndarray | list  # an array, or for BYTES a nested list of str
    shape: list[int]
    binary: bool


def encode_bytes(strings: list[str]) -> bytes:
    parts = []
    for text in strings:
        raw = text.encode()
        parts.append(struct.pack("<I", len(raw)))
        parts.append(raw)
    return b"".join(parts)


def encode_response(header: dict, outputs: list[OutputTensor]) -> tuple[bytes, int | None]:
    """The response body, and the JSON's length when binary tensor data follows it (else None)."""
    described, blobs = [], []
    for out in outputs:
        entry = {"name": out.name, "datatype": out.datatype, "shape": out.shape}
        if out.datatype == "BYTES":
            flat = [s for row in out.value for s in row] if out.value and isinstance(out.value[0], list) \
                else list(out.value)
            if out.binary:
                blob = encode_bytes(flat)
            else:
                entry["data"] = flat
        else:
            array = np.ascontiguousarray(out.value, dtype=NUMPY_DTYPES[out.datatype])
            if out.binary:
                blob = array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()
            else:
                entry["data"] = array.ravel().tolist()
        if out.binary:
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        described.append(entry)
    text = json.dumps({**header, "outputs": described}, separators=(",", ":")).encode()
    if not blobs:
        return text, None
    return b"".join([text, *blobs]), len(text)
