//! Weight-only schemes the model's shapes do not suit, and user selections that name nothing:
//! a block-wise scheme on a depthwise Conv (blocks along an axis of one value), and
//! `--op-types` / node regexes / config names that match no node of the model.

use super::*;
use crate::passes::{unmatched_selectors, Selector};
use crate::quant::{Granularity, QType, Scheme};

/// `y = Conv(Conv(x, Wd[16, 1, 3, 3], group 16), Wp[32, 16, 1, 1])` at opset 21: a depthwise
/// Conv (C/group = 1) and a pointwise one (C/group = 16).
fn depthwise_then_pointwise() -> pb::ModelProto {
    model(
        21,
        graph(
            "g",
            vec![
                node(
                    "Conv",
                    "dw",
                    &["x", "Wd"],
                    &["d"],
                    vec![attr_i("group", 16), attr_ints("pads", &[1, 1, 1, 1])],
                ),
                node("Conv", "pw", &["d", "Wp"], &["y"], vec![]),
            ],
            vec![f32_info("x", &[1, 16, 8, 8])],
            vec![out("y")],
            vec![
                f32_init("Wd", &[16, 1, 3, 3], &rand_f32(144, 31, 0.5)),
                f32_init("Wp", &[32, 16, 1, 1], &rand_f32(512, 32, 0.5)),
            ],
        ),
    )
}

fn int4_blocks(bs: usize) -> PassOptions {
    PassOptions {
        weight_scheme: Some(Scheme {
            qtype: QType::Int4,
            symmetric: true,
            granularity: Granularity::Block(bs),
            pow2: false,
        }),
        ..Default::default()
    }
}

/// The DequantizeLinear reading the quantized form of `weight`, and its scale initializer.
fn dq_and_scale<'a>(g: &'a pb::GraphProto, weight: &str) -> (&'a pb::NodeProto, Vec<i64>) {
    let prefix = format!("{weight}_quantized");
    let n = nodes(g, "DequantizeLinear")
        .into_iter()
        .find(|n| n.input[0].starts_with(&prefix))
        .unwrap_or_else(|| panic!("no DequantizeLinear of {weight}: {:?}", ops(g)));
    let scale = init(g, &n.input[1]).unwrap();
    (n, scale.dims.clone())
}

/// Blocks of 32 along the depthwise weight's axis 1 (one value) would store one scale per
/// weight value (144 scales for 144 int4 values: a larger file than float). That weight is
/// quantized per output channel instead (16 scales), with a note naming it; the pointwise
/// weight, whose 16 input channels fill one short block per output channel, keeps its blocks.
#[test]
fn block_scheme_on_a_depthwise_conv_weight_is_quantized_per_channel() {
    let r = run_passes_with(
        &depthwise_then_pointwise(),
        &["quantize_weights"],
        &int4_blocks(32),
    );
    let g = r.g();
    let (dw, dw_scale) = dq_and_scale(g, "Wd");
    assert_eq!(dw_scale, [16], "one scale per output channel");
    assert_eq!(attr_of(dw, "axis").and_then(|a| a.i), Some(0));
    assert!(attr_of(dw, "block_size").is_none(), "{dw:?}");
    let (pw, pw_scale) = dq_and_scale(g, "Wp");
    assert_eq!(pw_scale, [32, 1, 1, 1]);
    assert_eq!(attr_of(pw, "block_size").and_then(|a| a.i), Some(32));
    assert_eq!(attr_of(pw, "axis").and_then(|a| a.i), Some(1));
    let notes = r.notes();
    let about: Vec<&String> = notes.iter().filter(|n| n.contains("'Wd'")).collect();
    assert_eq!(about.len(), 1, "{notes:?}");
    assert!(about[0].contains("per channel"), "{about:?}");
    assert!(!notes.iter().any(|n| n.contains("'Wp'")), "{notes:?}");
    // Both weights are 4-bit now: 656 values in 328 bytes, against 2624 bytes of float32.
    for w in ["Wd", "Wp"] {
        let (n, _) = dq_and_scale(g, w);
        assert_eq!(
            init(g, &n.input[0]).unwrap().data_type(),
            DataType::Int4 as i32
        );
    }
}

/// Every selection that names nothing is reported, each with what was given and what the
/// model has; selections that match (in the main graph or in an If branch) are not.
#[test]
fn selections_that_name_nothing_in_the_model_are_each_reported() {
    // Nodes: "if" (If) in the main graph; "k_node" (Constant) and "then_add" (Add) in the
    // then branch; "else_neg" (Neg) in the else branch.
    let (m, _) = crate::onnx::from_proto(if_with_constant_in_branch(), None, "t").unwrap();
    let re = |r: &str| regex::Regex::new(r).unwrap();
    let good = [
        Selector::OpTypes(vec!["Neg".into(), "If".into()]),
        Selector::NodeRegex {
            flag: "--include-nodes".into(),
            re: re("^then_"),
        },
        Selector::NodeNames {
            origin: "--config c.json".into(),
            names: vec!["else_neg".into(), "if".into()],
        },
    ];
    assert_eq!(unmatched_selectors(&m, &good), Vec::<String>::new());
    let bad = [
        Selector::OpTypes(vec!["neg".into(), "Add".into(), "Conv".into()]),
        Selector::NodeRegex {
            flag: "--exclude-nodes".into(),
            re: re("^no such node$"),
        },
        Selector::NodeNames {
            origin: "--config c.json".into(),
            names: vec!["then_add".into(), "typo".into()],
        },
    ];
    let p = unmatched_selectors(&m, &bad);
    assert_eq!(
        p,
        [
            "--op-types neg,Conv: no node has that op type (op types are case-sensitive; the model has Add, Constant, If, Neg)",
            "--exclude-nodes ^no such node$: matches none of the model's 4 node names",
            "--config c.json: no node is named \"typo\" (names are matched exactly)",
        ]
    );
}

/// A weight pass run without `constant_to_initializer` before it cannot see weights held in
/// Constant nodes: it changes nothing and its note says why and what to run.
#[test]
fn a_weight_pass_notes_the_weights_constant_nodes_hold() {
    let p = model(
        13,
        graph(
            "g",
            vec![
                node(
                    "Constant",
                    "w_node",
                    &[],
                    &["W"],
                    vec![attr_t(
                        "value",
                        f32_init("W", &[4, 2], &rand_f32(8, 41, 1.0)),
                    )],
                ),
                node("MatMul", "mm", &["x", "W"], &["y"], vec![]),
            ],
            vec![f32_info("x", &[1, 4])],
            vec![out("y")],
            vec![],
        ),
    );
    for pass in [
        "quantize_weights",
        "quantize_weights_int8",
        "quantize_dynamic",
    ] {
        let r = run_pass(&p, pass);
        assert_eq!(r.changes(), 0, "{pass}");
        assert!(
            r.notes().iter().any(|n| n.starts_with("1 weight(s) come from Constant nodes, which this pass does not read: run constant_to_initializer")),
            "{pass}: {:?}",
            r.notes()
        );
        // With the Constant made an initializer first, the weight is quantized.
        let r = run_passes(&p, &["constant_to_initializer", pass]);
        assert!(r.changes() >= 2, "{pass}: {:?}", r.notes());
        assert!(
            !r.notes().iter().any(|n| n.contains("Constant nodes")),
            "{pass}"
        );
    }
}

/// An unnamed node is addressed by its first output's name, by `--config` and by the node
/// regexes alike (it could not be addressed at all).
#[test]
fn an_unnamed_node_is_addressed_by_its_first_output() {
    let mut p = depthwise_then_pointwise();
    for n in &mut p.graph.as_mut().unwrap().node {
        n.name = Some(String::new());
    }
    let (m, _) = crate::onnx::from_proto(p.clone(), None, "t").unwrap();
    let names = Selector::NodeNames {
        origin: "--config c.json".into(),
        names: vec!["y".into()],
    };
    assert_eq!(unmatched_selectors(&m, &[names]), Vec::<String>::new());
    let int16 = Scheme {
        qtype: QType::Int16,
        ..Scheme::INT8_CHANNEL
    };
    let opts = PassOptions {
        node_schemes: [("y".to_string(), int16)].into_iter().collect(),
        exclude_nodes: Some(regex::Regex::new("^d$").unwrap()),
        ..Default::default()
    };
    let r = run_passes_with(&p, &["quantize_weights"], &opts);
    let g = r.g();
    assert_eq!(
        init(g, "Wp_quantized").map(|t| t.data_type()),
        Some(DataType::Int16 as i32),
        "{:?}",
        init_names(g)
    );
    assert!(
        init(g, "Wd_quantized").is_none(),
        "the excluded Conv keeps its float weight"
    );
    assert!(init(g, "Wd").is_some());
}

/// An unnamed node whose first output is omitted (an LSTM writing only `Y_h`) is addressed by
/// its first present output.
#[test]
fn an_unnamed_node_without_its_first_output_is_addressed_by_the_next() {
    let (h, inp) = (3i64, 2i64);
    let p = model(
        13,
        graph(
            "g",
            vec![node(
                "LSTM",
                "",
                &["x", "W", "R"],
                &["", "Y_h"],
                vec![attr_i("hidden_size", h)],
            )],
            vec![f32_info("x", &[4, 1, inp])],
            vec![out("Y_h")],
            vec![
                f32_init(
                    "W",
                    &[1, 4 * h, inp],
                    &rand_f32((4 * h * inp) as usize, 51, 0.5),
                ),
                f32_init(
                    "R",
                    &[1, 4 * h, h],
                    &rand_f32((4 * h * h) as usize, 52, 0.5),
                ),
            ],
        ),
    );
    let (m, _) = crate::onnx::from_proto(p, None, "t").unwrap();
    let sel = Selector::NodeRegex {
        flag: "--include-nodes".into(),
        re: regex::Regex::new("^Y_h$").unwrap(),
    };
    assert_eq!(unmatched_selectors(&m, &[sel]), Vec::<String>::new());
    let opts = PassOptions {
        include_nodes: Some(regex::Regex::new("^Y_h$").unwrap()),
        ..Default::default()
    };
    assert!(opts.selects_any(&m));
}
