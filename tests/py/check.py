"""Run the onnx checker with full_check (shape inference included) on a model file.

    check.py MODEL

Exit codes: 0 valid, 1 the checker refused it (its message on stderr).
"""

import sys

import onnx


def main(argv):
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    try:
        onnx.checker.check_model(argv[0], full_check=True)
    except Exception as e:
        print(f"{argv[0]}: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    print(f"valid: {argv[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
