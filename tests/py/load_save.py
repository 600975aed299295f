"""Python baseline for benches/io.rs: onnx.load then onnx.save, nothing else.

    load_save.py IN OUT

External data, if any, is loaded and written back inline (models under 2 GiB).
Prints {"load_s": ..., "save_s": ...}: the in-process times, interpreter start excluded.
"""

import json
import sys
import time

import onnx


def main(argv):
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    model = onnx.load(argv[0], load_external_data=True)
    t1 = time.perf_counter()
    onnx.save(model, argv[1])
    t2 = time.perf_counter()
    print(json.dumps({"load_s": t1 - t0, "save_s": t2 - t1}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
