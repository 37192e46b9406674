"""The few ONNX protobuf messages the runtime edits, built from their field numbers with the protobuf library alone.

The ``onnx`` Python package is not needed to run a graph: ONNX Runtime takes the serialized model. The runtime only
adds weight initializers to a stored graph skeleton and swaps some ``MatMul`` nodes for low-bit kernels, and for that
``import onnx`` cost 0.6-1.2 s on this machine (mostly its ``ml_dtypes`` dependency), a tenth of decoding 500
utterances. These classes declare only the fields the runtime reads or writes, with ONNX's own field numbers and
types (``onnx/onnx.proto``, IR version 10); every other field of a parsed model (value infos, other attribute kinds,
metadata) is kept as an unknown field and written back unchanged.
"""
from __future__ import annotations

import numpy as np
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

_FIELD = descriptor_pb2.FieldDescriptorProto
# (message, [(field name, number, type, label, message type name or None)])
_MESSAGES = [
    ("OperatorSetIdProto", [("domain", 1, _FIELD.TYPE_STRING, _FIELD.LABEL_OPTIONAL, None),
                            ("version", 2, _FIELD.TYPE_INT64, _FIELD.LABEL_OPTIONAL, None)]),
    ("TensorProto", [("dims", 1, _FIELD.TYPE_INT64, _FIELD.LABEL_REPEATED, None),
                     ("data_type", 2, _FIELD.TYPE_INT32, _FIELD.LABEL_OPTIONAL, None),
                     ("name", 8, _FIELD.TYPE_STRING, _FIELD.LABEL_OPTIONAL, None),
                     ("raw_data", 9, _FIELD.TYPE_BYTES, _FIELD.LABEL_OPTIONAL, None)]),
    ("AttributeProto", [("name", 1, _FIELD.TYPE_STRING, _FIELD.LABEL_OPTIONAL, None),
                        ("i", 3, _FIELD.TYPE_INT64, _FIELD.LABEL_OPTIONAL, None),
                        ("type", 20, _FIELD.TYPE_INT32, _FIELD.LABEL_OPTIONAL, None)]),
    ("NodeProto", [("input", 1, _FIELD.TYPE_STRING, _FIELD.LABEL_REPEATED, None),
                   ("output", 2, _FIELD.TYPE_STRING, _FIELD.LABEL_REPEATED, None),
                   ("name", 3, _FIELD.TYPE_STRING, _FIELD.LABEL_OPTIONAL, None),
                   ("op_type", 4, _FIELD.TYPE_STRING, _FIELD.LABEL_OPTIONAL, None),
                   ("attribute", 5, _FIELD.TYPE_MESSAGE, _FIELD.LABEL_REPEATED, "AttributeProto"),
                   ("domain", 7, _FIELD.TYPE_STRING, _FIELD.LABEL_OPTIONAL, None)]),
    ("ValueInfoProto", [("name", 1, _FIELD.TYPE_STRING, _FIELD.LABEL_OPTIONAL, None)]),
    ("GraphProto", [("node", 1, _FIELD.TYPE_MESSAGE, _FIELD.LABEL_REPEATED, "NodeProto"),
                    ("name", 2, _FIELD.TYPE_STRING, _FIELD.LABEL_OPTIONAL, None),
                    ("initializer", 5, _FIELD.TYPE_MESSAGE, _FIELD.LABEL_REPEATED, "TensorProto"),
                    ("output", 12, _FIELD.TYPE_MESSAGE, _FIELD.LABEL_REPEATED, "ValueInfoProto")]),
    ("ModelProto", [("ir_version", 1, _FIELD.TYPE_INT64, _FIELD.LABEL_OPTIONAL, None),
                    ("graph", 7, _FIELD.TYPE_MESSAGE, _FIELD.LABEL_OPTIONAL, "GraphProto"),
                    ("opset_import", 8, _FIELD.TYPE_MESSAGE, _FIELD.LABEL_REPEATED, "OperatorSetIdProto")]),
]
_PACKAGE = "fairseq_quant_runtime.onnx_subset"  # not "onnx": both may live in one process's default pool
TENSOR_TYPES = {np.dtype(np.float32): 1, np.dtype(np.uint8): 2, np.dtype(np.int8): 3, np.dtype(np.int64): 7}
ATTRIBUTE_INT = 2  # AttributeProto.AttributeType.INT


def _build():
    file = descriptor_pb2.FileDescriptorProto(name="fairseq_quant_runtime/onnx_subset.proto", package=_PACKAGE,
                                              syntax="proto2")
    for message, fields in _MESSAGES:
        proto = file.message_type.add(name=message)
        for name, number, kind, label, type_name in fields:
            field = proto.field.add(name=name, number=number, type=kind, label=label)
            if type_name:
                field.type_name = f".{_PACKAGE}.{type_name}"
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    return {message: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{_PACKAGE}.{message}"))
            for message, _ in _MESSAGES}


_CLASSES = _build()
ModelProto = _CLASSES["ModelProto"]
GraphProto = _CLASSES["GraphProto"]
NodeProto = _CLASSES["NodeProto"]
TensorProto = _CLASSES["TensorProto"]
AttributeProto = _CLASSES["AttributeProto"]
OperatorSetIdProto = _CLASSES["OperatorSetIdProto"]


def load_model(data: bytes):
    """A serialized ONNX model as a :data:`ModelProto` (the fields above; the rest kept as they were)."""
    model = ModelProto()
    model.ParseFromString(data)
    return model


def tensor(array: np.ndarray, name: str):
    """An initializer holding ``array`` (float32, uint8, int8 or int64) as little-endian raw data."""
    array = np.asarray(array)
    if array.dtype not in TENSOR_TYPES:
        raise TypeError(f"initializer {name}: unsupported dtype {array.dtype}")
    return TensorProto(name=name, dims=list(array.shape), data_type=TENSOR_TYPES[array.dtype],
                       raw_data=np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes())


def node(op_type: str, inputs: list[str], outputs: list[str], name: str, domain: str = "", **ints: int):
    """A node of ``op_type`` whose attributes are all integers (the low-bit kernels need no other kind)."""
    return NodeProto(op_type=op_type, input=inputs, output=outputs, name=name, domain=domain,
                     attribute=[AttributeProto(name=key, i=int(value), type=ATTRIBUTE_INT)
                                for key, value in sorted(ints.items())])


def opset(domain: str, version: int):
    return OperatorSetIdProto(domain=domain, version=version)


__all__ = ["ModelProto", "NodeProto", "TensorProto", "load_model", "node", "opset", "tensor"]
