//! `fold_transpose`: a Transpose of an initializer becomes the transposed initializer, exactly,
//! and only where nothing else reads the initializer.

use super::*;
use crate::ir::Tensor;
use crate::passes::fold_transpose::transposed;

/// The element of `dims` (row-major) at multi-index `ix`.
fn offset(dims: &[usize], ix: &[usize]) -> usize {
    ix.iter().zip(dims).fold(0, |acc, (&i, &d)| acc * d + i)
}

/// `transposed` against the definition (output index `o` reads input index `i` with
/// `i[perm[a]] = o[a]`), for every permutation of ranks 0 to 4, on 1-, 2-, 4- and 8-byte
/// elements, in `raw_data` and in a typed field; invalid permutations are refused.
#[test]
fn transposed_moves_every_element_where_the_definition_puts_it() {
    fn perms(n: usize) -> Vec<Vec<usize>> {
        if n == 0 {
            return vec![vec![]];
        }
        let mut out = Vec::new();
        for p in perms(n - 1) {
            for at in 0..=p.len() {
                let mut q = p.clone();
                q.insert(at, n - 1);
                out.push(q);
            }
        }
        out
    }
    let shapes: [&[usize]; 5] = [&[], &[5], &[2, 3], &[2, 3, 4], &[2, 1, 3, 2]];
    for dims in shapes {
        let n: usize = dims.iter().product();
        let d64: Vec<i64> = dims.iter().map(|&d| d as i64).collect();
        let values: Vec<i64> = (0..n as i64).map(|v| v * 7 - 3).collect();
        let tensors = [
            Tensor::from_raw(
                DataType::Uint8 as i32,
                &d64,
                (0..n).map(|v| v as u8).collect(),
            ),
            Tensor::from_raw(
                DataType::Float16 as i32,
                &d64,
                (0..n).flat_map(|v| (v as u16).to_le_bytes()).collect(),
            ),
            Tensor::from_f32(&d64, &values.iter().map(|&v| v as f32).collect::<Vec<_>>()),
            Tensor::new(pb::TensorProto {
                dims: d64.clone(),
                data_type: Some(DataType::Int64 as i32),
                int64_data: values.clone(),
                ..Default::default()
            }),
        ];
        for t in &tensors {
            let size = crate::ir::tensor::elem_info(t.data_type()).bits.unwrap() as usize / 8;
            let raw = t
                .proto
                .raw_data
                .clone()
                .map(|b| b.to_vec())
                .unwrap_or_else(|| crate::ir::tensor::typed_to_raw(&t.proto).unwrap());
            for perm in perms(dims.len()) {
                let out = transposed(t, &perm).unwrap();
                let od: Vec<usize> = perm.iter().map(|&a| dims[a]).collect();
                assert_eq!(out.dims(), od.iter().map(|&d| d as i64).collect::<Vec<_>>());
                assert_eq!(out.data_type(), t.data_type());
                let got = out.proto.raw_data.as_ref().unwrap();
                assert_eq!(got.len(), raw.len());
                for o in 0..n {
                    // The output multi-index of `o`, then the input one.
                    let mut rest = o;
                    let mut oi = vec![0; od.len()];
                    for a in (0..od.len()).rev() {
                        oi[a] = rest % od[a];
                        rest /= od[a];
                    }
                    let mut ii = vec![0; dims.len()];
                    for (a, &p) in perm.iter().enumerate() {
                        ii[p] = oi[a];
                    }
                    let i = offset(dims, &ii);
                    assert_eq!(
                        got[o * size..(o + 1) * size],
                        raw[i * size..(i + 1) * size],
                        "dims {dims:?} perm {perm:?} element {o}"
                    );
                }
            }
        }
        if dims.len() >= 2 {
            let t = &tensors[2];
            assert!(transposed(t, &vec![0; dims.len()]).is_none());
            assert!(transposed(t, &(0..dims.len() - 1).collect::<Vec<_>>()).is_none());
            assert!(transposed(t, &(1..=dims.len()).collect::<Vec<_>>()).is_none());
        }
    }
}

/// `y = MatMul(x, Transpose(W))`, as exports without constant folding write a Linear layer:
/// the cleanup folds the Transpose into an initializer named like its output (W's doc string
/// kept, W removed), tract computes bit-identical outputs, and weight-only quantization then
/// quantizes that weight (before, it said only "changed nothing").
#[test]
fn a_transposed_weight_becomes_a_weight_the_passes_quantize() {
    let mut w = f32_init("W", &[4, 6], &rand_f32(24, 9, 1.0));
    w.doc_string = Some("fc.weight".into());
    let p = model(
        13,
        graph(
            "g",
            vec![
                node(
                    "Transpose",
                    "t",
                    &["W"],
                    &["Wt"],
                    vec![attr_ints("perm", &[1, 0])],
                ),
                node("MatMul", "mm", &["x", "Wt"], &["y"], vec![]),
            ],
            vec![f32_info("x", &[2, 6])],
            vec![out("y")],
            vec![w],
        ),
    );
    let r = run_passes_with(&p, crate::passes::CLEANUP, &PassOptions::default());
    assert_eq!(count(r.g(), "Transpose"), 0);
    assert_eq!(init_names(r.g()), ["Wt"]);
    let wt = init(r.g(), "Wt").unwrap();
    assert_eq!(wt.dims, [6, 4]);
    assert_eq!(wt.doc_string(), "fc.weight");
    let x = tensor(&[2, 6], &rand_f32(12, 2, 1.0));
    assert_same_in_tract(&p, &r.proto, &[("x", x)]);
    let mut names = crate::passes::CLEANUP.to_vec();
    names.push("quantize_weights");
    let q = run_passes_with(&p, &names, &PassOptions::default());
    assert_eq!(q.records.last().unwrap().changes, 1, "{:?}", q.notes());
    assert!(
        init(q.g(), "Wt_quantized").is_some(),
        "{:?}",
        init_names(q.g())
    );
}

/// Nothing is folded where the weight would be stored twice or the interface would change: a
/// W another node also reads, a W that is a graph output or input, a W read by an If branch,
/// a Transpose whose output is an If branch's output, and an invalid `perm`; a Transpose of
/// an activation is not touched either.
#[test]
fn transposes_are_left_where_folding_would_duplicate_or_change_the_interface() {
    let w = || f32_init("W", &[2, 3], &rand_f32(6, 3, 1.0));
    let t = |perm: &[i64]| {
        node(
            "Transpose",
            "t",
            &["W"],
            &["Wt"],
            vec![attr_ints("perm", perm)],
        )
    };
    // y = MatMul(x, Transpose(W)), with `extra` nodes, graph inputs and outputs.
    let matmul = |extra: Vec<pb::NodeProto>,
                  inputs: Vec<pb::ValueInfoProto>,
                  outputs: Vec<pb::ValueInfoProto>| {
        let mut nodes = vec![
            t(&[1, 0]),
            node("MatMul", "mm", &["x", "Wt"], &["y"], vec![]),
        ];
        nodes.extend(extra);
        let mut ins = vec![f32_info("x", &[2, 2])];
        ins.extend(inputs);
        model(13, graph("g", nodes, ins, outputs, vec![w()]))
    };
    let cases: Vec<(&str, pb::ModelProto)> = vec![
        (
            "W also read by an Add",
            matmul(
                vec![node("Add", "add", &["W", "W"], &["z"], vec![])],
                vec![],
                vec![out("y"), out("z")],
            ),
        ),
        (
            "W a graph output",
            matmul(vec![], vec![], vec![out("y"), out("W")]),
        ),
        (
            "W a graph input",
            matmul(vec![], vec![f32_info("W", &[2, 3])], vec![out("y")]),
        ),
        (
            "invalid perm",
            model(
                13,
                graph(
                    "g",
                    vec![t(&[0, 0]), node("Identity", "id", &["Wt"], &["y"], vec![])],
                    vec![],
                    vec![out("y")],
                    vec![w()],
                ),
            ),
        ),
        (
            "an activation",
            model(
                13,
                graph(
                    "g",
                    vec![node(
                        "Transpose",
                        "t",
                        &["x"],
                        &["y"],
                        vec![attr_ints("perm", &[1, 0])],
                    )],
                    vec![f32_info("x", &[2, 3])],
                    vec![out("y")],
                    vec![],
                ),
            ),
        ),
    ];
    for (what, p) in cases {
        let r = run_pass(&p, "fold_transpose");
        assert_eq!(r.changes(), 0, "{what}");
        assert_eq!(r.proto, p, "{what}");
    }
    // In an If: W read by the branch (an outer name), and a branch output made by Transpose.
    let branch = |name: &str, nodes: Vec<pb::NodeProto>, inits: Vec<pb::TensorProto>| {
        graph(
            name,
            nodes,
            vec![],
            vec![out(&format!("{name}_out"))],
            inits,
        )
    };
    let reads_outer = branch(
        "then",
        vec![node("Transpose", "bt", &["W"], &["then_out"], vec![])],
        vec![],
    );
    let own_output = branch(
        "else",
        vec![node("Transpose", "et", &["V"], &["else_out"], vec![])],
        vec![f32_init("V", &[3, 2], &rand_f32(6, 4, 1.0))],
    );
    let p = model(
        13,
        graph(
            "g",
            vec![node(
                "If",
                "if",
                &["c"],
                &["y"],
                vec![
                    attr_g("then_branch", reads_outer),
                    attr_g("else_branch", own_output),
                ],
            )],
            vec![info("c", DataType::Bool, &[])],
            vec![out("y")],
            vec![w()],
        ),
    );
    let r = run_pass(&p, "fold_transpose");
    assert_eq!(r.changes(), 0);
    assert_eq!(r.proto, p);
}
