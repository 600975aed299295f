"""Python baseline for benches/io.rs: onnx.load then onnx.save, nothing else.

    load_save.py IN OUT

External data, if any, is loaded and written back inline (models under 2 GiB).
"""

import sys

import onnx


def main(argv):
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    model = onnx.load(argv[0], load_external_data=True)
    onnx.save(model, argv[1])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
