"""Are two ONNX models the same message?

    same_model.py [--tensor-values] A B
    same_model.py [--tensor-values] --batch PAIRS.tsv

Loads both with onnx.load(..., load_external_data=True) (external tensors become raw_data,
which is how onnx itself reads them) and compares the ModelProto messages with ==.
On a difference it walks both messages and prints each differing field path, e.g.
    graph.node[12].attribute[0].t.raw_data: 4096 bytes vs 4096 bytes, first difference at byte 17
--tensor-values compares tensors by value (dtype, dims, name, elements) instead of by
encoding, so float_data vs raw_data or inline vs external storage do not count as differences.

--batch reads lines "A<TAB>B" and prints one JSON object per pair:
{"a", "b", "same": bool, "diff": [paths...] or "error": message}; exit 0 when all pairs are
the same.

Exit codes: 0 same, 1 different, 2 a model could not be loaded.
"""

import json
import sys

import numpy as np
import onnx
from onnx import numpy_helper
from google.protobuf.descriptor import FieldDescriptor

from onnx_common import all_tensors

MAX_DIFFS = 20


def describe(v):
    if isinstance(v, bytes):
        return f"{len(v)} bytes"
    s = repr(v)
    return s if len(s) <= 80 else s[:77] + "..."


def diff_scalar(path, a, b, out):
    if a == b:
        return
    if isinstance(a, bytes) and isinstance(b, bytes):
        n = min(len(a), len(b))
        first = next((i for i in range(n) if a[i] != b[i]), n)
        out.append(f"{path}: {len(a)} bytes vs {len(b)} bytes, first difference at byte {first}")
    else:
        out.append(f"{path}: {describe(a)} vs {describe(b)}")


def is_repeated(f):
    # protobuf >= 5 has FieldDescriptor.is_repeated; older releases only have .label.
    rep = getattr(f, "is_repeated", None)
    if rep is not None:
        return rep() if callable(rep) else rep
    return f.label == FieldDescriptor.LABEL_REPEATED


def diff_message(path, a, b, out):
    """Append to `out` the paths where messages a and b differ (set-ness included)."""
    if len(out) >= MAX_DIFFS or a == b:
        return
    fields = {f.name: f for f, _ in a.ListFields()}
    fields.update({f.name: f for f, _ in b.ListFields()})
    for name in sorted(fields, key=lambda n: fields[n].number):
        f = fields[name]
        p = f"{path}.{name}" if path else name
        is_msg = f.type == FieldDescriptor.TYPE_MESSAGE
        if is_repeated(f):
            la, lb = getattr(a, name), getattr(b, name)
            if len(la) != len(lb):
                out.append(f"{p}: {len(la)} entries vs {len(lb)} entries")
            for i, (x, y) in enumerate(zip(la, lb)):
                if is_msg:
                    diff_message(f"{p}[{i}]", x, y, out)
                else:
                    diff_scalar(f"{p}[{i}]", x, y, out)
                if len(out) >= MAX_DIFFS:
                    return
        else:
            ha = a.HasField(name)
            hb = b.HasField(name)
            if ha != hb:
                shown = describe(getattr(a if ha else b, name)) if not is_msg else "message"
                out.append(f"{p}: {'set' if ha else 'unset'} vs {'set' if hb else 'unset'} ({shown})")
            elif is_msg:
                diff_message(p, getattr(a, name), getattr(b, name), out)
            else:
                diff_scalar(p, getattr(a, name), getattr(b, name), out)
        if len(out) >= MAX_DIFFS:
            return


def canonical_tensors(model):
    """Rewrite every tensor in place as (name, dims, data_type, doc_string, value bytes)."""
    for t in all_tensors(model):
        if t.data_type == onnx.TensorProto.STRING:
            value = list(t.string_data)
        else:
            arr = numpy_helper.to_array(t)
            value = np.ascontiguousarray(arr).tobytes()
        keep = (t.name, list(t.dims), t.data_type, t.doc_string)
        t.Clear()
        t.name, t.data_type, t.doc_string = keep[0], keep[2], keep[3]
        t.dims.extend(keep[1])
        if isinstance(value, list):
            t.string_data.extend(value)
        else:
            t.raw_data = value


def load(path, by_value):
    m = onnx.load(path, load_external_data=True)
    if by_value:
        canonical_tensors(m)
    return m


class LoadError(Exception):
    pass


def compare(a_path, b_path, by_value):
    """Return the list of differing paths ([] when same)."""
    try:
        a, b = load(a_path, by_value), load(b_path, by_value)
    except Exception as e:
        raise LoadError(f"cannot load: {type(e).__name__}: {e}") from e
    if a == b:
        return []
    out = []
    diff_message("", a, b, out)
    if not out:  # equal field by field yet != (should not happen): say so rather than pass
        out.append("<messages differ but no field path found; compare serialized bytes>")
    return out


def main(argv):
    by_value = "--tensor-values" in argv
    argv = [a for a in argv if a != "--tensor-values"]
    if len(argv) == 2 and argv[0] == "--batch":
        all_same = True
        with open(argv[1]) as f:
            for line in f:
                line = line.rstrip("\n")
                if not line:
                    continue
                a, b = line.split("\t")
                rec = {"a": a, "b": b}
                try:
                    d = compare(a, b, by_value)
                    rec["same"] = not d
                    rec["diff"] = d
                except Exception as e:  # report and go on: the caller collects all failures
                    rec["same"] = False
                    rec["error"] = f"{type(e).__name__}: {e}"
                all_same &= rec["same"]
                print(json.dumps(rec), flush=True)
        return 0 if all_same else 1
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    try:
        d = compare(argv[0], argv[1], by_value)
    except LoadError as e:
        print(e, file=sys.stderr)
        return 2
    if not d:
        print(f"same: {argv[0]} == {argv[1]}")
        return 0
    print(f"different: {argv[0]} vs {argv[1]}")
    for line in d:
        print(f"  {line}")
    if len(d) >= MAX_DIFFS:
        print(f"  ... (stopped after {MAX_DIFFS} differences)")
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
