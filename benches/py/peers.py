"""Versions of the Python peers and what they offer, for benches/optimize.rs.

    peers.py

Prints one JSON object:
  "versions": {package: version or null when it is not importable} for onnx, onnxruntime,
              numpy, onnxsim, onnxslim;
  "onnxsim_weight_only": true when onnxsim has quantize_weight_only (int8 weights);
  "onnxslim_options": the options of the onnxslim command line that name a precision or
              quantization (dtype, quant, int8, int4, fp16), each {"option", "choices"}.
"""

import importlib
import json
import re
import sys


def version(name):
    try:
        return importlib.import_module(name).__version__
    except Exception:
        return None


def onnxslim_options():
    try:
        from onnxslim.argparser import (
            CheckerArguments,
            ModelArguments,
            ModificationArguments,
            OnnxSlimArgumentParser,
            OptimizationArguments,
        )

        parser = OnnxSlimArgumentParser(
            ModelArguments, OptimizationArguments, ModificationArguments, CheckerArguments
        ).parser
    except Exception as e:
        return {"error": f"{type(e).__name__}: {e}"}
    found = []
    for action in parser._actions:
        for opt in action.option_strings:
            if re.search(r"dtype|quant|int8|int4|fp16", opt):
                found.append({"option": opt, "choices": list(action.choices or [])})
    return found


def main():
    names = ["onnx", "onnxruntime", "numpy", "onnxsim", "onnxslim"]
    out = {"versions": {n: version(n) for n in names}}
    try:
        import onnxsim

        out["onnxsim_weight_only"] = callable(getattr(onnxsim, "quantize_weight_only", None))
    except Exception:
        out["onnxsim_weight_only"] = False
    out["onnxslim_options"] = onnxslim_options() if out["versions"]["onnxslim"] else None
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
