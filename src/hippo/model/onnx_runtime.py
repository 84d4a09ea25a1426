"""The recursive UNet run by ONNX Runtime on a CPU: the same network, about 1.5x faster than torch.

:func:`unet_graph` writes a :class:`hippo.model.unet.UNet` as a serialized ONNX model straight from
its module tree and weights (Conv, InstanceNormalization/BatchNormalization, LeakyRelu, MaxPool,
ConvTranspose, Concat): no exporter, no tracing, no file, about 0.1 s per network. The protobuf is
encoded here (the handful of ONNX messages a UNet needs, field numbers from ``onnx.proto``, IR
version 8) rather than with the ``onnx`` package, whose import alone takes 0.8 s on a small CPU.
:class:`OnnxUNet` holds an ONNX Runtime session of that model behind the UNet's call signature, so
:func:`hippo.model.slicewise.segment_slices` runs it unchanged.

Why: on an AVX2-only 2-core CPU torch's float32 convolutions run the shipped networks at about
85 GFLOP/s, ONNX Runtime's (blocked NCHWc layout) at about 130. The logits agree to within 1e-4
(float32 rounding), so the labels are the same but for voxels at an exact tie.

Imports ``onnxruntime`` (and torch, for the tensors it returns); :func:`available` says whether it is
installed without importing it.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any

import numpy as np
import torch
from torch import nn

from hippo.model.unet import DoubleConv, UNet, UnetSkipConnectionBlock, check_input_shape

#: ONNX operator set the graphs are written in (InstanceNormalization, ConvTranspose and LeakyRelu
#: have not changed since opset 6-11; 17 is what every ONNX Runtime since 1.11 runs).
OPSET = 17
#: ONNX IR version of the model (8: ONNX 1.10; readable by every ONNX Runtime that runs opset 17).
IR_VERSION = 8
_FLOAT = 1  # TensorProto.DataType FLOAT


def available() -> bool:
    """Whether ``onnxruntime`` can be imported (checked without importing it)."""
    return importlib.util.find_spec("onnxruntime") is not None


# --- protobuf wire format: varint (0), 64-bit (1), length-delimited (2), 32-bit (5) -------------------

def _varint(value: int) -> bytes:
    if value < 0:
        value += 1 << 64
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _int(field: int, value: int) -> bytes:
    return _varint(field << 3) + _varint(int(value))


def _bytes(field: int, value: bytes | str) -> bytes:
    data = value.encode() if isinstance(value, str) else bytes(value)
    return _varint(field << 3 | 2) + _varint(len(data)) + data


def _float(field: int, value: float) -> bytes:
    return _varint(field << 3 | 5) + np.float32(value).tobytes()


def _attribute(name: str, value: int | float | list[int]) -> bytes:
    """AttributeProto: name 1, f 2, i 3, ints 8, type 20 (FLOAT 1, INT 2, INTS 7)."""
    if isinstance(value, float):
        return _bytes(1, name) + _float(2, value) + _int(20, 1)
    if isinstance(value, int):
        return _bytes(1, name) + _int(3, value) + _int(20, 2)
    return _bytes(1, name) + b"".join(_int(8, v) for v in value) + _int(20, 7)


def _value_info(name: str, dims: list[int | str]) -> bytes:
    """ValueInfoProto of a float tensor: name 1, type 2 -> TypeProto.tensor_type 1 -> elem_type 1,
    shape 2 -> dim 1 -> dim_value 1 | dim_param 2."""
    shape = b"".join(_bytes(1, _int(1, d) if isinstance(d, int) else _bytes(2, d)) for d in dims)
    return _bytes(1, name) + _bytes(2, _bytes(1, _int(1, _FLOAT) + _bytes(2, shape)))


class _GraphWriter:
    """Collects the encoded nodes and float32 initializers of one graph, naming tensors in order."""

    def __init__(self) -> None:
        self.nodes: list[bytes] = []
        self.initializers: list[bytes] = []
        self._n = 0

    def name(self, stem: str) -> str:
        self._n += 1
        return f"{stem}_{self._n}"

    def weight(self, stem: str, value: torch.Tensor) -> str:
        """TensorProto: dims 1, data_type 2, name 8, raw_data 9 (little-endian float32)."""
        name = self.name(stem)
        array = np.ascontiguousarray(value.detach().cpu().float().numpy(), dtype="<f4")
        self.initializers.append(b"".join(_int(1, d) for d in array.shape) + _int(2, _FLOAT)
                                 + _bytes(8, name) + _bytes(9, array.tobytes()))
        return name

    def node(self, op: str, inputs: list[str], stem: str, **attrs: int | float | list[int]) -> str:
        """NodeProto: input 1, output 2, name 3, op_type 4, attribute 5."""
        out = self.name(stem)
        self.nodes.append(b"".join(_bytes(1, i) for i in inputs) + _bytes(2, out) + _bytes(3, out) + _bytes(4, op)
                          + b"".join(_bytes(5, _attribute(k, v)) for k, v in attrs.items()))
        return out

    def layer(self, module: nn.Module, x: str) -> str:
        """One module of a :class:`DoubleConv` (or the head) applied to tensor ``x``."""
        if isinstance(module, nn.Conv2d):
            if module.groups != 1 or module.dilation != (1, 1):
                raise ValueError(f"cannot write {module}: grouped or dilated convolutions are not used by UNet")
            inputs = [x, self.weight("w", module.weight)]
            if module.bias is not None:
                inputs.append(self.weight("b", module.bias))
            ph, pw = module.padding
            return self.node("Conv", inputs, "conv", kernel_shape=list(module.kernel_size),
                             strides=list(module.stride), pads=[ph, pw, ph, pw])
        if isinstance(module, nn.InstanceNorm2d):
            if not module.affine or module.track_running_stats:
                raise ValueError(f"cannot write {module}: UNet's instance norms are affine without running stats")
            return self.node("InstanceNormalization",
                             [x, self.weight("scale", module.weight), self.weight("shift", module.bias)],
                             "inorm", epsilon=float(module.eps))
        if isinstance(module, nn.BatchNorm2d):
            return self.node("BatchNormalization",
                             [x, self.weight("scale", module.weight), self.weight("shift", module.bias),
                              self.weight("mean", module.running_mean), self.weight("var", module.running_var)],
                             "bnorm", epsilon=float(module.eps))
        if isinstance(module, nn.LeakyReLU):
            return self.node("LeakyRelu", [x], "lrelu", alpha=float(module.negative_slope))
        if isinstance(module, (nn.Identity, nn.Dropout2d)):  # inference: both pass the input through
            return x
        raise ValueError(f"cannot write {type(module).__name__} as ONNX")

    def block(self, block: UnetSkipConnectionBlock, x: str) -> str:
        """:meth:`UnetSkipConnectionBlock.forward`, node for node."""
        skip = self.double_conv(block.encode, x)
        if block.submodule is None:
            return skip
        pooled = self.node("MaxPool", [skip], "pool", kernel_shape=[2, 2], strides=[2, 2])
        inner = self.block(block.submodule, pooled)
        up = self.node("ConvTranspose", [inner, self.weight("w", block.up.weight), self.weight("b", block.up.bias)],
                       "up", kernel_shape=[2, 2], strides=[2, 2])
        y = self.double_conv(block.decode, self.node("Concat", [skip, up], "cat", axis=1))
        return self.layer(block.head, y) if block.head is not None else y

    def double_conv(self, seq: DoubleConv, x: str) -> str:
        for module in seq:
            x = self.layer(module, x)
        return x


def unet_graph(net: UNet) -> bytes:
    """A serialized ONNX model of ``net`` in eval mode: input ``image`` ``(N, in_channels, H, W)``
    float32, output ``logits`` ``(N, num_classes, H, W)`` float32; ``N``, ``H`` and ``W`` free
    (``H`` and ``W`` multiples of ``net.size_multiple``, as for the torch network)."""
    writer = _GraphWriter()
    out = writer.block(net.model, "image")
    n_in, n_out = int(net.config["in_channels"]), int(net.config["num_classes"])
    # GraphProto: node 1, name 2, initializer 5, input 11, output 12
    graph = (b"".join(_bytes(1, n) for n in writer.nodes) + _bytes(2, "hippo_unet")
             + b"".join(_bytes(5, t) for t in writer.initializers)
             + _bytes(11, _value_info("image", ["N", n_in, "H", "W"]))
             + _bytes(12, _value_info(out, ["N", n_out, "H", "W"])))
    # ModelProto: ir_version 1, producer_name 2, graph 7, opset_import 8 -> (domain 1 "", version 2)
    return _int(1, IR_VERSION) + _bytes(2, "hippo") + _bytes(7, graph) + _bytes(8, _int(2, OPSET))


class OnnxUNet:
    """A :class:`UNet` run by an ONNX Runtime CPU session, called like the network.

    Args:
        net: the network (its weights are copied into the session; it is kept for ``config``).
        threads: intra-op threads of the session (None: torch's current thread count, which the
            caller already sized to the machine).

    Calling it with a ``(N, in_channels, H, W)`` float tensor returns ``(N, num_classes, H, W)``
    float32 logits, as ``net(x)`` would.
    """

    def __init__(self, net: UNet, threads: int | None = None):
        import onnxruntime as ort

        self.config: dict[str, Any] = dict(net.config)
        self.size_multiple = int(net.size_multiple)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = int(threads or torch.get_num_threads() or os.cpu_count() or 1)
        options.inter_op_num_threads = 1
        # the pool sleeps between runs instead of spinning: other stages (registration, reading the
        # next scan) run beside inference in the same process
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.log_severity_level = 3
        self.session = ort.InferenceSession(unet_graph(net.eval()), options, providers=["CPUExecutionProvider"])
        self._input = self.session.get_inputs()[0].name

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        check_input_shape(x.shape, self.size_multiple)
        image = np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)
        return torch.from_numpy(self.session.run(None, {self._input: image})[0])
