"""List the models shipped in the installed onnx package's backend test data.

    backend_models.py

Prints one absolute path per line, sorted: every model.onnx under
onnx/backend/test/data/{pytorch-converted,pytorch-operator,simple}/<case>/ (their
test_data_set_* folders sit beside them) and every *.onnx in .../light/ (those cases ship
only an expected output, no inputs). Exit 1 if nothing was found.
"""

import os
import sys

import onnx

SETS = ("light", "pytorch-converted", "pytorch-operator", "simple")


def main():
    base = os.path.join(os.path.dirname(onnx.__file__), "backend", "test", "data")
    found = []
    for s in SETS:
        root = os.path.join(base, s)
        for dirpath, _, files in os.walk(root):
            for f in files:
                if f == "model.onnx" or (s == "light" and f.endswith(".onnx")):
                    found.append(os.path.join(dirpath, f))
    for p in sorted(found):
        print(p)
    if not found:
        print(f"no backend models under {base}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
