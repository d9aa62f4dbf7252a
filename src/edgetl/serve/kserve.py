"""The KServe v2 ("Open Inference Protocol") REST endpoints, so Triton's and KServe's clients work.

A bundle is one model whose input is the encoded image file (``image``, datatype ``BYTES``, shape
``[N]`` or ``[N, 1]``) or, for text bundles, the UTF-8 text (``text``). Outputs:

* classification and text: ``label`` (BYTES), ``confidence`` (FP32), ``unknown`` (BOOL),
  ``probabilities`` (FP32 ``[N, classes]`` in the order of the model's ``labels`` parameter),
  ``drift_p`` (FP32, where the bundle has a drift reference) and ``id`` (BYTES: the prediction id
  ``/feedback`` takes);
* defects: ``label`` (``good`` / ``defect``), ``score``, ``threshold``, ``normalised`` (score /
  threshold), ``id``, and, only when asked for by name, ``anomaly_map`` (FP32 ``[N, S, S]``, a
  tiled bundle's ``[N, H, W]`` over its working frame).

Both encodings of the protocol are read and written: JSON ``data`` (BYTES elements as strings;
an image in JSON is base64, as the protocol has no raw bytes there) and the binary tensor
extension (a JSON header of ``Inference-Header-Content-Length`` bytes, then raw tensors; BYTES
elements each prefixed by their 4-byte little-endian length), which ``tritonclient`` uses by
default.
"""

from __future__ import annotations

import base64
import binascii
import json
import struct

import numpy as np

from ..errors import DataError
from ..tasks.base import Task
from .web import as_object, parse_json

HEADER = "inference-header-content-length"
# Numpy dtypes of the protocol's datatypes (BYTES is handled on its own).
DTYPES = {
    "BOOL": np.bool_,
    "UINT8": np.uint8,
    "UINT16": np.uint16,
    "UINT32": np.uint32,
    "UINT64": np.uint64,
    "INT8": np.int8,
    "INT16": np.int16,
    "INT32": np.int32,
    "INT64": np.int64,
    "FP16": np.float16,
    "FP32": np.float32,
    "FP64": np.float64,
}
MAX_ITEMS = 64


def input_name(task: Task) -> str:
    return "text" if task.reads_texts else "image"


def output_names(task: Task) -> list[str]:
    if task.one_class:
        return ["label", "score", "threshold", "normalised", "id", "anomaly_map"]
    return ["label", "confidence", "unknown", "probabilities", "drift_p", "id"]


DEFAULT_EXCLUDED = {"anomaly_map"}


def metadata(name: str, version: int, task: Task, labels: list[str], map_shape: tuple[int, int] | None) -> dict:
    """The v2 model metadata; ``map_shape`` (h, w) of a defect bundle's maps: the model's input
    view, or a tiled bundle's working frame."""
    mh, mw = map_shape or (-1, -1)
    outs = {
        "label": ("BYTES", [-1]),
        "confidence": ("FP32", [-1]),
        "unknown": ("BOOL", [-1]),
        "probabilities": ("FP32", [-1, len(labels)]),
        "drift_p": ("FP32", [-1]),
        "id": ("BYTES", [-1]),
        "score": ("FP32", [-1]),
        "threshold": ("FP32", [-1]),
        "normalised": ("FP32", [-1]),
        "anomaly_map": ("FP32", [-1, mh, mw]),
    }
    return {
        "name": name,
        "versions": [str(version)],
        "platform": "edgetl",
        "inputs": [{"name": input_name(task), "datatype": "BYTES", "shape": [-1]}],
        "outputs": [{"name": n, "datatype": outs[n][0], "shape": outs[n][1]} for n in output_names(task)],
        "parameters": {"task": task.name, "labels": labels, "head_version": version},
    }


def split_body(body: bytes, header_length: str | None) -> tuple[dict, bytes]:
    """(the JSON part, the binary part) of a request.

    Raises:
        DataError: not JSON, or a header length that does not fit the body.
    """
    if header_length is not None:
        try:
            n = int(header_length)
        except ValueError:
            raise DataError(f"Inference-Header-Content-Length {header_length[:20]!r} is not a number") from None
        if not 0 < n <= len(body):
            raise DataError(f"Inference-Header-Content-Length {n} does not fit a body of {len(body)} bytes")
        head, rest = body[:n], body[n:]
    else:
        head, rest = body, b""
    try:
        req = parse_json(head, "the body")
    except DataError as exc:
        raise DataError(f"the request is not KServe v2 JSON (an object with 'inputs'): {exc}") from None
    if not isinstance(req, dict) or not isinstance(req.get("inputs"), list):
        raise DataError("the request is not KServe v2 JSON (an object with 'inputs')")
    return req, rest


def _bytes_elements(raw: bytes) -> list[bytes]:
    out, i = [], 0
    while i < len(raw):
        if i + 4 > len(raw):
            raise DataError("a BYTES tensor ends inside an element's length prefix")
        (n,) = struct.unpack_from("<I", raw, i)
        i += 4
        if i + n > len(raw):
            raise DataError("a BYTES tensor element is longer than the data sent")
        out.append(raw[i : i + n])
        i += n
    return out


def _flatten(data) -> list:
    if isinstance(data, list):
        return [x for d in data for x in _flatten(d)]
    return [data]


def read_inputs(req: dict, binary: bytes, task: Task) -> list:
    """The items of the model's one input: image bytes (or texts for a text bundle).

    Raises:
        DataError: another input name, datatype or shape, or data that does not decode.
    """
    want = input_name(task)
    inputs = req["inputs"]
    names = [i.get("name") for i in inputs if isinstance(i, dict)]
    if len(inputs) != 1 or names != [want]:
        raise DataError(f"inputs {names}: this model takes one input named {want!r} (BYTES, shape [N])")
    spec = inputs[0]
    if spec.get("datatype") != "BYTES":
        raise DataError(
            f"input {want!r} has datatype {spec.get('datatype')!r}; send BYTES (the encoded "
            f"{'image file' if want == 'image' else 'UTF-8 text'} per element)"
        )
    shape = spec.get("shape")
    if not (
        isinstance(shape, list)
        and all(isinstance(d, int) and d >= 0 for d in shape)
        and (len(shape) == 1 or (len(shape) == 2 and shape[1] == 1))
    ):
        raise DataError(f"input {want!r} has shape {shape!r}; send [N] or [N, 1]")
    count = shape[0]
    if not 1 <= count <= MAX_ITEMS:
        raise DataError(f"input {want!r} holds {count} items; send 1 to {MAX_ITEMS} per request")
    params = as_object(spec.get("parameters"), f"input {want!r}'s parameters")
    if "binary_data_size" in params:
        size = params["binary_data_size"]
        if not isinstance(size, int) or size < 0 or size > len(binary):
            raise DataError(f"binary_data_size {size!r} does not fit the {len(binary)} bytes after the header")
        elements = _bytes_elements(binary[:size])
    elif "data" in spec:
        elements = _flatten(spec["data"])
        if want == "image":
            decoded = []
            for e in elements:
                if not isinstance(e, str):
                    raise DataError("an image in JSON data must be a base64 string (or use the binary extension)")
                try:
                    decoded.append(base64.b64decode(e, validate=True))
                except (binascii.Error, ValueError):
                    raise DataError("an image in JSON data is not valid base64") from None
            elements = decoded
        elif not all(isinstance(e, str) for e in elements):
            raise DataError("texts in JSON data must be strings")
    else:
        raise DataError(f"input {want!r} has neither 'data' nor a binary_data_size parameter")
    if len(elements) != count:
        raise DataError(f"input {want!r} declares {count} items and carries {len(elements)}")
    if task.reads_texts:
        try:
            return [e.decode("utf-8") if isinstance(e, bytes) else e for e in elements]
        except UnicodeDecodeError:
            raise DataError("a text element is not UTF-8") from None
    return elements


def requested_outputs(req: dict, task: Task) -> list[tuple[str, bool]]:
    """(name, binary?) of the outputs to send: those asked for, or every default one."""
    names = output_names(task)
    default_binary = bool(as_object(req.get("parameters"), "the request's parameters").get("binary_data_output", False))
    asked = req.get("outputs")
    if asked is not None and not isinstance(asked, list):
        raise DataError(f'outputs must be a list of {{"name": ...}} objects, got {type(asked).__name__}')
    if not asked:
        return [(n, default_binary) for n in names if n not in DEFAULT_EXCLUDED]
    out = []
    for o in asked:
        name = o.get("name") if isinstance(o, dict) else None
        if not isinstance(name, str) or name not in names:
            raise DataError(f"output {str(name)[:40]!r}: this model has {', '.join(names)}")
        params = as_object(o.get("parameters"), f"output {name!r}'s parameters")
        out.append((name, bool(params.get("binary_data", default_binary))))
    return out


def output_tensors(task: Task, labels: list[str], answers: list, ids: list[str]) -> dict[str, tuple[str, np.ndarray]]:
    """Every output as (datatype, array) from the engine's answers (all items answered)."""
    r = [a.result for a in answers]
    t = {
        "label": ("BYTES", np.array([x["label"].encode() for x in r], dtype=object)),
        "id": ("BYTES", np.array([i.encode() for i in ids], dtype=object)),
    }
    if task.one_class:
        t.update(
            score=("FP32", np.array([x["score"] for x in r], np.float32)),
            threshold=("FP32", np.array([x["threshold"] for x in r], np.float32)),
            normalised=("FP32", np.array([x["normalised"] for x in r], np.float32)),
        )
        if all(a.raw_map is not None for a in answers):
            t["anomaly_map"] = ("FP32", np.stack([a.raw_map for a in answers]).astype(np.float32))
        return t
    index = {l: i for i, l in enumerate(labels)}
    probs = np.zeros((len(r), len(labels)), np.float32)
    for row, x in enumerate(r):
        for e in x.get("top_k", []):
            if e["label"] in index:
                probs[row, index[e["label"]]] = e["p"]
    t.update(
        confidence=("FP32", np.array([x["confidence"] for x in r], np.float32)),
        unknown=("BOOL", np.array([bool(x["unknown"]) for x in r], np.bool_)),
        probabilities=("FP32", probs),
        drift_p=("FP32", np.array([x.get("drift_p", float("nan")) for x in r], np.float32)),
    )
    return t


def _serialize_bytes(arr: np.ndarray) -> bytes:
    return b"".join(struct.pack("<I", len(e)) + e for e in arr.reshape(-1))


def response(model: str, version: int, request_id, tensors: dict, wanted: list[tuple[str, bool]]) -> tuple[bytes, dict]:
    """(body, extra headers) of an inference response."""
    outputs, blobs = [], []
    for name, binary in wanted:
        if name not in tensors:
            if name == "drift_p":
                continue
            raise DataError(f"output {name!r} is not available for this request")
        dtype, arr = tensors[name]
        entry = {"name": name, "datatype": dtype, "shape": list(arr.shape)}
        if binary:
            raw = _serialize_bytes(arr) if dtype == "BYTES" else np.ascontiguousarray(arr).tobytes()
            entry["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        elif dtype == "BYTES":
            entry["data"] = [e.decode("utf-8", "replace") for e in arr.reshape(-1)]
        else:
            flat = arr.reshape(-1)
            entry["data"] = [None if (dtype.startswith("FP") and not np.isfinite(v)) else v.item() for v in flat]
        outputs.append(entry)
    doc = {"model_name": model, "model_version": str(version), "outputs": outputs}
    if request_id is not None:
        doc["id"] = str(request_id)
    head = json.dumps(doc, separators=(",", ":")).encode()
    if not blobs:
        return head, {"content-type": "application/json"}
    return head + b"".join(blobs), {"content-type": "application/octet-stream", HEADER: str(len(head))}
