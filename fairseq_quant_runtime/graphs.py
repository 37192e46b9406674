"""Turn the stored graph skeletons back into runnable ONNX models, choosing a kernel per weight.

Each weight initializer the exporter removed is restored from the model file either as a float32 tensor
(dequantized; plain ``MatMul``/``Conv``/``Gather``) or, for a ``MatMul`` whose weight is on a symmetric grid,
as ONNX Runtime's low-bit ``MatMulNBits`` (com.microsoft): the stored integers re-packed into its blocks
along the input dimension, each channel's scale repeated across its blocks. 3-bit weights ride in the
4-bit kernel and 1-bit weights in the 2-bit one (exactly: same values). ``accuracy_level`` 1 keeps the
activations and the products in float32, so the kernel computes what the fp32 kernel computes up to float
rounding (level 4 would quantize activations to int8 per block: on the demo's 2.29-bit model its CTC
log-probabilities moved by up to 0.39 and which kernel `auto` timed faster changed the transcripts). Or, as ``int8``, ONNX Runtime's
``DynamicQuantizeMatMul`` (com.microsoft): the stored integers as int8 weights with one scale per output channel
(every grid of at most 8 bits fits int8 exactly), the activations quantized to uint8 per tensor at run time,
the product in integers.
"""
from __future__ import annotations

import numpy as np

from . import onnx_proto
from .fqm import ModelFile, ModelFileError, QuantTensor, pack_bits

KERNELS = ("fp32", "nbits", "nbits-int8", "int8", "int8-static")
# the kernels `auto` chooses among: those that compute the model's own function (the exact stored weights, float
# activations). nbits-int8 (MatMulNBits with int8 activation blocks) and int8 (DynamicQuantizeMatMul) also rounds every input to uint8 with its own per-tensor range at run
# time, which the QAT model never saw (on the shipped reference's searched 2.29-bit model: -0.7%, n.s., on dev and
# +7.3% on test against fp32 kernels, 2026-12-04), so it is chosen explicitly, never by speed alone
AUTO_KERNELS = ("fp32", "nbits")
# with the model's static activation grids (a file exported with --exact-activations), in order of preference:
# int8-static where a graph has a linear layer on an 8-bit grid, else fp32; chosen, not timed. Both compute the fake-quantized QAT model's
# function, but not to the same rounding: a value at a quantization boundary can take the other step and carry it
# through the next quantizers (500 test-clean utterances of the demo's searched model: WER 10.82 against 10.67), so
# a choice by timing would let the transcripts vary between loads. int8-static is the faster everywhere measured
# (benchmarks/kernel_widths.py: x1.95-5.51 at widths 128-1024, 10 and 400 rows)
EXACT_AUTO_KERNELS = ("int8-static", "fp32")
CONTAINER_BITS = {1: 2, 2: 2, 3: 4, 4: 4, 8: 8}
ACCURACY_LEVEL = 1  # float32 activations and products: the model's own function (see above)


def block_size_for(k: int) -> int:
    for size in (128, 64, 32, 16):
        if k % size == 0:
            return size
    return 32


def nbits_operands(tensor: QuantTensor) -> tuple[int, np.ndarray, np.ndarray] | None:
    """(container bits, unsigned integers [N, K] with the container's default zero point, scale per element
    [N, K]) for a weight on a symmetric grid, or on a balanced one (1-bit binary, ``balanced``: odd integers at
    half the step, in a container one bit wider); None where the grid has other offsets."""
    if len(tensor.shape) != 2:
        return None
    n, k = tensor.shape
    bits = tensor.bits
    q = tensor.q.astype(np.int32)
    scale = tensor.scale.astype(np.float32)
    if tensor.offset is None and tensor.qmin == -(1 << (bits - 1)):
        container = CONTAINER_BITS[bits]
        u = q + (1 << (container - 1))
    elif tensor.balanced and bits + 1 in CONTAINER_BITS:
        container = CONTAINER_BITS[bits + 1]
        # values (q - (2^b - 1)/2) * scale = (2q - (2^b - 1)) * scale/2 = (u - zero) * scale/2
        u = 2 * q + ((1 << (container - 1)) - ((1 << bits) - 1))
        scale = scale / 2
    else:
        return None
    per_group = q.shape[1]
    u_full = u.reshape(n, k)
    scale_full = np.repeat(scale, per_group).reshape(n, k)
    return container, u_full.astype(np.uint8), scale_full


def matmul_nbits(node, name: str, tensor: QuantTensor, accuracy_level: int = ACCURACY_LEVEL
                 ) -> tuple[object, list] | None:
    operands = nbits_operands(tensor)
    if operands is None:
        return None
    bits, u, scale_full = operands
    n, k = u.shape
    block = block_size_for(k)
    blocks = -(-k // block)
    padded = blocks * block
    if padded != k:  # pad K with the zero point (dequantizes to 0)
        u = np.concatenate([u, np.full((n, padded - k), 1 << (bits - 1), np.uint8)], axis=1)
        scale_full = np.concatenate([scale_full, np.repeat(scale_full[:, -1:], padded - k, axis=1)], axis=1)
    block_scales = scale_full.reshape(n, blocks, block)
    if not np.all(block_scales == block_scales[:, :, :1]):
        return None  # quantization groups smaller than the kernel's blocks
    packed = np.frombuffer(pack_bits(u.reshape(-1), bits), np.uint8).reshape(n, blocks, block * bits // 8)
    b_name, s_name = f"{name}.nbits_B", f"{name}.nbits_scales"
    inits = [onnx_proto.tensor(packed, b_name), onnx_proto.tensor(block_scales[:, :, 0], s_name)]
    new = onnx_proto.node("MatMulNBits", [node.input[0], b_name, s_name], list(node.output), name=node.name + "_nbits",
                          domain="com.microsoft", K=k, N=n, bits=bits, block_size=block, accuracy_level=accuracy_level)
    return new, inits


def int8_operands(tensor: QuantTensor) -> tuple[np.ndarray, np.ndarray] | None:
    """(int8 weights [N, K], scale per output channel [N]) for a 2-D weight on a symmetric (or balanced) grid
    with one scale per output channel; None otherwise."""
    if len(tensor.shape) != 2:
        return None
    n, k = tensor.shape
    q = tensor.q.astype(np.int32)
    scale = tensor.scale.astype(np.float32).reshape(-1)
    if scale.size != n or q.size != n * k:
        return None  # quantization groups within a channel
    if tensor.offset is None and tensor.qmin == -(1 << (tensor.bits - 1)):
        values = q
    elif tensor.balanced and tensor.bits < 8:
        values, scale = 2 * q - ((1 << tensor.bits) - 1), scale / 2  # (2q - (2^b - 1)) * scale/2
    else:
        return None
    return values.reshape(n, k).astype(np.int8), scale


def matmul_int8(node, name: str, tensor: QuantTensor) -> tuple[object, list] | None:
    operands = int8_operands(tensor)
    if operands is None:
        return None
    q, scale = operands
    b_name, s_name, z_name = f"{name}.int8_B", f"{name}.int8_scale", f"{name}.int8_zero"
    inits = [onnx_proto.tensor(q.T, b_name),  # [K, N]
             onnx_proto.tensor(scale, s_name),
             onnx_proto.tensor(np.zeros(scale.shape, np.int8), z_name)]
    new = onnx_proto.node("DynamicQuantizeMatMul", [node.input[0], b_name, s_name, z_name], list(node.output),
                          name=node.name + "_int8", domain="com.microsoft")
    return new, inits


def matmul_nbits_int8(node, name: str, tensor: QuantTensor) -> tuple[object, list] | None:
    """MatMulNBits at accuracy level 4: the same packed weights, activations quantized to int8 per block and the
    products in integers (faster at large widths, but not the function the model was trained to compute)."""
    return matmul_nbits(node, name, tensor, accuracy_level=4)


def matmul_int8_static(node, name: str, tensor: QuantTensor, producers: dict) -> tuple[object, list] | None:
    """MatMulIntegerToFloat (com.microsoft) for a MatMul whose input is the model's own static activation grid
    (``DequantizeLinear`` of a per-tensor uint8 ``QuantizeLinear``, as graphs exported with exact activations
    write it): the quantized activations and the stored integers multiplied in integers, then scaled. It computes
    what the fake-quantized QAT model computes (the products are exact), and fast: about 3x fp32's MatMul at this
    model's shapes on a CPU without VNNI. None where the input is not on such a grid (float, per-channel or
    per-token ranges) or the weight does not fit int8 with one scale per output channel."""
    dq = producers.get(node.input[0])
    if dq is None or dq.op_type != "DequantizeLinear" or len(dq.input) < 3 or any(a.name == "axis" for a in dq.attribute):
        return None
    operands = int8_operands(tensor)
    if operands is None:
        return None
    q, scale = operands
    b_name, s_name = f"{name}.int8_B", f"{name}.int8_scale"
    inits = [onnx_proto.tensor(q.T, b_name), onnx_proto.tensor(scale, s_name)]  # [K, N], [N]
    new = onnx_proto.node("MatMulIntegerToFloat", [dq.input[0], b_name, dq.input[1], s_name, dq.input[2]],
                          list(node.output), name=node.name + "_int8_static", domain="com.microsoft")
    return new, inits


LOW_BIT_KERNELS = {"nbits": matmul_nbits, "nbits-int8": matmul_nbits_int8, "int8": matmul_int8,
                   "int8-static": matmul_int8_static}
# the nodes those kernels put in a graph
LOW_BIT_OPS = {"MatMulNBits", "DynamicQuantizeMatMul", "MatMulIntegerToFloat"}


def materialize(model_file: ModelFile, graph: str, kernel: str = "fp32"):
    """A complete ONNX model of ``graph`` ("encoder" or "decoder") with its weights restored
    (an :data:`onnx_proto.ModelProto`: ``SerializeToString()`` gives the model ONNX Runtime and ``onnx.load`` read)."""
    if kernel not in KERNELS:
        raise ValueError(f"unknown kernel {kernel!r}; expected one of {KERNELS}")
    blob = model_file.blobs.get(f"{graph}.onnx")
    refs = model_file.config.get("graphs", {}).get(graph)
    if blob is None or refs is None:
        raise ModelFileError(f"the model file has no {graph} graph")
    proto = onnx_proto.load_model(blob)
    consumers: dict[str, list] = {}
    for node in proto.graph.node:
        for inp in node.input:
            consumers.setdefault(inp, []).append(node)
    producers = {out: node for node in proto.graph.node for out in node.output}
    replaced: dict[str, tuple[object, list]] = {}
    new_inits = []
    for init_name, ref in refs.items():
        tensor_name = ref["tensor"]
        if tensor_name not in model_file.tensors:
            raise ModelFileError(f"the {graph} graph needs tensor {tensor_name}, which the file lacks")
        tensor = model_file.tensors[tensor_name]
        users = consumers.get(init_name, [])
        if (kernel in LOW_BIT_KERNELS and isinstance(tensor, QuantTensor) and ref.get("transpose")
                and len(users) == 1 and users[0].op_type == "MatMul" and users[0].input[1] == init_name):
            extra = (producers,) if kernel == "int8-static" else ()
            swap = LOW_BIT_KERNELS[kernel](users[0], init_name, tensor, *extra)
            if swap is not None:
                replaced[users[0].name or users[0].output[0]] = swap
                continue
        value = model_file.float_tensor(tensor_name)
        if ref.get("transpose"):
            value = np.ascontiguousarray(value.T)
        new_inits.append(onnx_proto.tensor(value.astype(np.float32), init_name))
    nodes = []
    for node in proto.graph.node:
        key = node.name or node.output[0]
        if key in replaced:
            new, inits = replaced[key]
            nodes.append(new)
            new_inits.extend(inits)
        else:
            nodes.append(node)
    if kernel == "int8-static":
        nodes = _fold_bias(nodes, {t.name: list(t.dims) for t in (*proto.graph.initializer, *new_inits)})
    # a DequantizeLinear whose every reader now takes its integers is gone
    read = {inp for node in nodes for inp in node.input} | {o.name for o in proto.graph.output}
    nodes = [n for n in nodes if n.op_type != "DequantizeLinear" or n.output[0] in read]
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)
    proto.graph.initializer.extend(new_inits)
    if replaced and not any(op.domain == "com.microsoft" for op in proto.opset_import):
        proto.opset_import.append(onnx_proto.opset("com.microsoft", 1))
    return proto


def _fold_bias(nodes: list, constants: dict[str, list[int]]) -> list:
    """MatMulIntegerToFloat -> Add(bias) as one MatMulIntegerToFloat with its bias input (ONNX Runtime fuses
    MatMul + Add into Gemm for float, not this): one node less per layer in every decoder step. ``constants``: the
    graph's initializers and their shapes; only a constant of shape [N] (one value per output column) is a bias."""
    readers: dict[str, list] = {}
    for node in nodes:
        for inp in node.input:
            readers.setdefault(inp, []).append(node)
    dropped = set()
    for node in nodes:
        if node.op_type != "MatMulIntegerToFloat" or len(node.input) > 5:
            continue
        users = readers.get(node.output[0], [])
        if len(users) != 1 or users[0].op_type != "Add":
            continue
        add = users[0]
        bias = add.input[1] if add.input[0] == node.output[0] else add.input[0]
        weight = constants.get(node.input[1], [])  # [K, N]
        if len(weight) != 2 or constants.get(bias) != weight[1:]:
            continue
        node.input.extend(["", bias])  # no weight zero point (symmetric), the bias
        del node.output[:]
        node.output.extend(add.output)
        dropped.add(id(add))
    return [n for n in nodes if id(n) not in dropped]


def count_kernels(proto) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in proto.graph.node:
        if node.op_type in ("MatMul", "MatMulNBits", "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "Conv", "Gather"):
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


__all__ = ["AUTO_KERNELS", "EXACT_AUTO_KERNELS", "KERNELS", "LOW_BIT_OPS", "count_kernels", "int8_operands", "materialize", "matmul_int8", "matmul_int8_static", "matmul_nbits", "matmul_nbits_int8",
           "nbits_operands"]
