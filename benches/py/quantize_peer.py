"""Int8 weight quantization by a peer tool, for benches/optimize.rs.

    quantize_peer.py TOOL IN OUT

TOOL is one of:
  onnxruntime  onnxruntime.quantization.quantize_dynamic(IN, OUT, weight_type=QuantType.QInt8)
               (its defaults otherwise: every op type it supports, per-tensor weights)
  onnxsim      onnxsim.simplify(IN) with its defaults, then onnxsim.quantize_weight_only (int8
               symmetric per-output-channel weights of MatMul/Gemm/Conv behind one
               DequantizeLinear each; it skips models below opset 13), then onnx.save: what
               `onnxsim IN OUT --weight-only-quantize` does, less the before/after table the
               command line prints (its symbolic FLOP counts alone take seconds)

The last line of stdout is one JSON object: {"call_s": seconds spent in the tool's call,
interpreter start and imports excluded} on success, {"error": first line of the error message}
on failure. The tool's own chatter goes to stderr.

Exit codes: 0 ok, 1 the tool failed, 2 bad arguments.
"""

import contextlib
import json
import sys
import time


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    line = text.splitlines()[0].strip() if text else ""
    return f"{type(e).__name__}: {line}" if line else type(e).__name__


def run_onnxruntime(src: str, dst: str) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(model_input=src, model_output=dst, weight_type=QuantType.QInt8)


def run_onnxsim(src: str, dst: str) -> None:
    import onnx
    import onnxsim

    model, _ = onnxsim.simplify(src)
    model = onnxsim.quantize_weight_only(model)
    onnx.save(model, dst)


TOOLS = {"onnxruntime": run_onnxruntime, "onnxsim": run_onnxsim}


def main(argv):
    if len(argv) != 3 or argv[0] not in TOOLS:
        print(__doc__, file=sys.stderr)
        return 2
    tool, src, dst = argv
    result = {}
    with contextlib.redirect_stdout(sys.stderr):
        t0 = time.perf_counter()
        try:
            TOOLS[tool](src, dst)
            result["call_s"] = time.perf_counter() - t0
        except Exception as e:  # the point: report what the tool says, whatever it is
            import traceback

            traceback.print_exc()
            result["error"] = first_line(e)
    print(json.dumps(result))
    return 1 if "error" in result else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
