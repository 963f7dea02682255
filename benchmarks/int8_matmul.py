"""The matrix products of MiniLM alone, fp32 against each int8 kernel, side by side in one run: why
the INC program trails ONNX Runtime at batch 1 on short texts while it leads at batch 32.

    .venv/bin/python benchmarks/int8_matmul.py

For each shape of MiniLM's linear layers (hidden 384, feed-forward 1536) and each row count (the
tokens of one short text, of a batch of 32 short texts, of a batch of 32 long ones):
  fp32             torch.nn.functional.linear, what fp32 eager runs;
  oneDNN int8      onednn.qlinear_pointwise on weights packed by onednn.qlinear_prepack, uint8
                   activations with a zero point: the call INC's compiled program makes;
  fbgemm int8      quantized::linear_dynamic on fbgemm-packed weights: torch.ao dynamic int8;
  ONNX Runtime     one MatMul quantized by onnxruntime's quantize_dynamic (DynamicQuantizeLinear,
                   MatMulInteger on weights packed at session start).
The kernels take turns call by call; the median of --calls calls is printed, in microseconds.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from intel_compressor_test import cpu_description

SHAPES = [(384, 384), (384, 1536), (1536, 384)]  # (in, out) of attention projections, FFN up, FFN down


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--rows", type=int, nargs="+", default=[16, 512, 4096], help="Token rows per call (default 16 512 4096)."
    )
    parser.add_argument("--calls", type=int, default=200, help="Timed calls per kernel and shape (default 200).")
    parser.add_argument("--num_threads", type=int, default=2, help="CPU threads for every kernel (default 2).")
    return parser


def onednn_int8(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> Callable[[], object]:
    scales = weight.abs().amax(dim=1) / 127
    packed = torch.ops.onednn.qlinear_prepack(torch.round(weight / scales[:, None]).to(torch.int8), list(x.shape))
    x_scale = float(x.max() - x.min()) / 255
    x_zero_point = round(-float(x.min()) / x_scale)
    xq = torch.clamp(torch.round(x / x_scale) + x_zero_point, 0, 255).to(torch.uint8)
    zero_points = torch.zeros(weight.shape[0], dtype=torch.long)
    return lambda: torch.ops.onednn.qlinear_pointwise(
        xq, x_scale, x_zero_point, packed, scales, zero_points, bias, 1.0, 0, torch.float32, "none", [], ""
    )


def fbgemm_int8(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> Callable[[], object]:
    torch.backends.quantized.engine = "fbgemm"
    scales = weight.abs().amax(dim=1).double() / 127
    qweight = torch.quantize_per_channel(weight, scales, torch.zeros(weight.shape[0], dtype=torch.long), 0, torch.qint8)
    packed = torch.ops.quantized.linear_prepack(qweight, bias)
    return lambda: torch.ops.quantized.linear_dynamic(x, packed)


def onnxruntime_int8(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, threads: int, scratch: Path
) -> Callable[[], object]:
    import onnx
    import onnxruntime
    from onnx import TensorProto, helper, numpy_helper
    from onnxruntime.quantization import QuantType, quantize_dynamic

    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["xw"]), helper.make_node("Add", ["xw", "b"], ["y"])],
        "linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["rows", weight.shape[1]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["rows", weight.shape[0]])],
        [numpy_helper.from_array(weight.T.contiguous().numpy(), "w"), numpy_helper.from_array(bias.numpy(), "b")],
    )
    fp32_path, int8_path = scratch / "linear.onnx", scratch / "linear.int8.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), fp32_path)
    quantize_dynamic(str(fp32_path), str(int8_path), weight_type=QuantType.QInt8)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # as in benchmarks/quantization.py
    session = onnxruntime.InferenceSession(str(int8_path), options, providers=["CPUExecutionProvider"])
    feed = {"x": x.numpy()}
    return lambda: session.run(None, feed)


def median_microseconds(kernels: dict[str, Callable[[], object]], calls: int) -> dict[str, float]:
    """Every kernel once per round, `calls` rounds after a warm-up, so machine noise hits all alike."""
    for kernel in kernels.values():
        for _ in range(10):
            kernel()
    times: dict[str, list[float]] = {name: [] for name in kernels}
    for _ in range(calls):
        for name, kernel in kernels.items():
            started = time.perf_counter()
            kernel()
            times[name].append(time.perf_counter() - started)
    return {name: 1e6 * statistics.median(values) for name, values in times.items()}


def main(argv: list[str] | None = None) -> list[dict]:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.num_threads)
    torch.manual_seed(0)
    results = []
    print(f"CPU: {cpu_description()}; torch threads {torch.get_num_threads()}")
    print("| rows | in x out | fp32 us | oneDNN int8 us | fbgemm int8 us | ONNX Runtime int8 us |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as scratch, torch.no_grad():
        for rows in args.rows:
            for fan_in, fan_out in SHAPES:
                x = torch.randn(rows, fan_in)
                weight, bias = torch.randn(fan_out, fan_in) / np.sqrt(fan_in), torch.randn(fan_out) / 10
                kernels = {
                    "fp32": lambda x=x, w=weight, b=bias: torch.nn.functional.linear(x, w, b),
                    "oneDNN int8": onednn_int8(x, weight, bias),
                    "fbgemm int8": fbgemm_int8(x, weight, bias),
                    "ONNX Runtime int8": onnxruntime_int8(x, weight, bias, args.num_threads, Path(scratch)),
                }
                timing = median_microseconds(kernels, args.calls)
                results.append({"rows": rows, "in": fan_in, "out": fan_out, **timing})
                print(
                    f"| {rows} | {fan_in} x {fan_out} | "
                    + " | ".join(f"{timing[name]:.0f}" for name in kernels)
                    + " |",
                    flush=True,
                )
    return results


if __name__ == "__main__":
    main()
