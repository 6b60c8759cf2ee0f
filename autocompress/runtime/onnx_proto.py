"""A minimal ONNX model writer: just enough protobuf to build small graphs for ONNX Runtime.

The ``onnx`` package is not a dependency (onnxruntime does not need it), and the graphs the
CPU kernels need are tiny: one input, initializers and a few nodes with integer attributes.
Protobuf's wire format for those is a handful of rules, written out here:
a field is a varint key ``(number << 3) | wire_type``; wire type 0 = varint, 2 = length-delimited
(strings, bytes, sub-messages, packed repeated integers).

Field numbers follow onnx.proto3 (ModelProto, GraphProto, NodeProto, AttributeProto, TensorProto,
ValueInfoProto, TypeProto).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

# TensorProto.DataType
FLOAT = 1
UINT8 = 2
FLOAT16 = 10
ONNX_DTYPE = {np.dtype(np.float32): FLOAT, np.dtype(np.uint8): UINT8,
              np.dtype(np.float16): FLOAT16}

_ATTRIBUTE_INT = 2  # AttributeProto.AttributeType.INT
IR_VERSION = 8


def _varint(value: int) -> bytes:
    if value < 0:
        value += 1 << 64  # int64 negatives are ten-byte two's complement varints
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _int_field(number: int, value: int) -> bytes:
    return _varint(number << 3) + _varint(value)


def _bytes_field(number: int, payload: bytes) -> bytes:
    return _varint((number << 3) | 2) + _varint(len(payload)) + payload


def _str_field(number: int, text: str) -> bytes:
    return _bytes_field(number, text.encode())


@dataclass
class Node:
    op_type: str
    inputs: Sequence[str]
    outputs: Sequence[str]
    domain: str = ""
    attributes: dict[str, int] = field(default_factory=dict)  # integer attributes only
    name: str = ""  # unique within a graph; defaults to the first output's name

    def encode(self) -> bytes:
        out = b"".join(_str_field(1, name) for name in self.inputs)
        out += b"".join(_str_field(2, name) for name in self.outputs)
        out += _str_field(3, self.name or self.outputs[0]) + _str_field(4, self.op_type)
        for name, value in self.attributes.items():
            attr = _str_field(1, name) + _int_field(3, int(value)) + _int_field(20, _ATTRIBUTE_INT)
            out += _bytes_field(5, attr)
        if self.domain:
            out += _str_field(7, self.domain)
        return out


def tensor_proto(name: str, array: np.ndarray) -> bytes:
    """TensorProto with raw little-endian data."""
    array = np.ascontiguousarray(array)
    dims = b"".join(_int_field(1, d) for d in array.shape)
    return (dims + _int_field(2, ONNX_DTYPE[array.dtype]) + _str_field(8, name)
            + _bytes_field(9, array.tobytes()))


def value_info(name: str, dtype: int, shape: Sequence[int | str]) -> bytes:
    """ValueInfoProto: a graph input or output; a str dimension is symbolic (any size)."""
    dims = b""
    for d in shape:
        dim = _str_field(2, d) if isinstance(d, str) else _int_field(1, d)
        dims += _bytes_field(1, dim)
    tensor_type = _int_field(1, dtype) + _bytes_field(2, dims)
    return _str_field(1, name) + _bytes_field(2, _bytes_field(1, tensor_type))


def model_bytes(nodes: Node | Sequence[Node], inputs: Sequence[bytes], outputs: Sequence[bytes],
                initializers: Sequence[bytes] = (), opsets: dict[str, int] | None = None) -> bytes:
    """Serialized ModelProto of a graph of ``nodes`` (inputs / outputs from ``value_info``)."""
    nodes = [nodes] if isinstance(nodes, Node) else nodes
    graph = b"".join(_bytes_field(1, node.encode()) for node in nodes) + _str_field(2, "g")
    graph += b"".join(_bytes_field(5, t) for t in initializers)
    graph += b"".join(_bytes_field(11, v) for v in inputs)
    graph += b"".join(_bytes_field(12, v) for v in outputs)
    opsets = opsets or {"": 21, "com.microsoft": 1}
    model = _int_field(1, IR_VERSION)
    for domain, version in opsets.items():
        model += _bytes_field(8, _str_field(1, domain) + _int_field(2, version))
    model += _bytes_field(7, graph)
    return model
