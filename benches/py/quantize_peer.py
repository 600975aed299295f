"""Int8 quantization by a peer tool, for benches/optimize.rs and benches/quantize.rs.

    quantize_peer.py TOOL IN OUT [CALIBRATION_DIR]

TOOL is one of:
  onnxruntime  onnxruntime.quantization.quantize_dynamic(IN, OUT, weight_type=QuantType.QInt8)
               (its defaults otherwise: every op type it supports, per-tensor weights)
  onnxsim      onnxsim.simplify(IN) with its defaults, then onnxsim.quantize_weight_only (int8
               symmetric per-output-channel weights of MatMul/Gemm/Conv behind one
               DequantizeLinear each; it skips models below opset 13), then onnx.save: what
               `onnxsim IN OUT --weight-only-quantize` does, less the before/after table the
               command line prints (its symbolic FLOP counts alone take seconds)

Calibrated static quantization, on the samples of CALIBRATION_DIR (its *.npz files in name
order, one sample each, keyed by graph input name; other keys are ignored):
  ort-static   onnxruntime.quantization.quantize_static(IN, OUT, reader) with a
               CalibrationDataReader that loads one file per get_next() call, QDQ format,
               QUInt8 activations, QInt8 weights, MinMax, per_channel when the model's opset is
               at least 13 (per-axis DequantizeLinear; onnxruntime does not raise the opset for
               it); its other defaults (every op type it supports, no pre-processing)
  onnxsim-static
               onnxsim.simplify(IN), then onnxsim.quantize_static(calibration_data=the samples,
               method="minmax"): QDQ on the inputs of MatMul/Gemm/Conv, int8 per-channel
               weights; what `onnxsim IN OUT --static-quantize` does with local data (its
               command line only takes calibration data from a dataset hub)
  onnxsim-full-qdq
               the same with onnxsim.full_qdq.quantize_full_qdq, what quantize_static runs with
               full_graph=True (every float activation in QDQ, uint8, int32 biases), called
               directly because quantize_static refuses full_graph below opset 13 while
               quantize_full_qdq takes per_channel=False there (per-tensor weights)

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


def opset(model) -> int:
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def sample_files(cal_dir: str) -> list:
    import os

    files = sorted(f for f in os.listdir(cal_dir) if f.endswith(".npz"))
    if not files:
        raise ValueError(f"no .npz file in {cal_dir}")
    return [os.path.join(cal_dir, f) for f in files]


def load_sample(path: str, names) -> dict:
    import numpy as np

    with np.load(path) as z:
        return {n: z[n] for n in names if n in z.files}


def graph_inputs(model) -> list:
    inits = {t.name for t in model.graph.initializer}
    return [i.name for i in model.graph.input if i.name not in inits]


def run_ort_static(src: str, dst: str, cal_dir: str) -> None:
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    model = onnx.load(src, load_external_data=False)
    names = graph_inputs(model)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.files = iter(sample_files(cal_dir))

        def get_next(self):
            path = next(self.files, None)
            return None if path is None else load_sample(path, names)

    quantize_static(
        model_input=src,
        model_output=dst,
        calibration_data_reader=Reader(),
        quant_format=QuantFormat.QDQ,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        per_channel=opset(model) >= 13,
        calibrate_method=CalibrationMethod.MinMax,
    )


def run_onnxsim_static(src: str, dst: str, cal_dir: str, full_graph: bool = False) -> None:
    import onnx
    import onnxsim

    model, _ = onnxsim.simplify(src)
    names = graph_inputs(model)
    data = [load_sample(p, names) for p in sample_files(cal_dir)]
    if full_graph:
        from onnxsim.full_qdq import quantize_full_qdq

        # quantize_static(full_graph=True) refuses opsets below 13; the function behind it
        # takes per-tensor weights there.
        model = quantize_full_qdq(
            model, calibration_data=data, method="minmax", per_channel=opset(model) >= 13
        )
    else:
        model = onnxsim.quantize_static(model, calibration_data=data, method="minmax")
    onnx.save(model, dst)


def run_onnxsim_full_qdq(src: str, dst: str, cal_dir: str) -> None:
    run_onnxsim_static(src, dst, cal_dir, full_graph=True)


TOOLS = {"onnxruntime": run_onnxruntime, "onnxsim": run_onnxsim}
CALIBRATED = {
    "ort-static": run_ort_static,
    "onnxsim-static": run_onnxsim_static,
    "onnxsim-full-qdq": run_onnxsim_full_qdq,
}


def main(argv):
    if not (
        (len(argv) == 3 and argv[0] in TOOLS) or (len(argv) == 4 and argv[0] in CALIBRATED)
    ):
        print(__doc__, file=sys.stderr)
        return 2
    tool, src, dst = argv[:3]
    result = {}
    with contextlib.redirect_stdout(sys.stderr):
        t0 = time.perf_counter()
        try:
            if tool in CALIBRATED:
                CALIBRATED[tool](src, dst, argv[3])
            else:
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
