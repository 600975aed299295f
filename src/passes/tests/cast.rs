//! `quantize_weights` with `WeightFormat::Cast`: integer weights + Cast + Mul at any opset,
//! which runtimes fold back into float weights when they load the model.

use super::*;
use crate::quant::{Granularity, QType, Scheme, WeightFormat};

const W: &str = "quantize_weights";

fn cast_opts(scheme: Scheme) -> PassOptions {
    PassOptions {
        weight_scheme: Some(scheme),
        weight_format: WeightFormat::Cast,
        ..Default::default()
    }
}

#[test]
fn cast_format_at_opset_13_writes_cast_and_mul_per_channel() {
    let p = conv_model(13);
    let r = run_passes_with(&p, &[W], &cast_opts(Scheme::INT8_CHANNEL));
    let g = r.g();
    assert_eq!(r.proto.opset_import, p.opset_import, "opset unchanged");
    assert_eq!(count(g, "DequantizeLinear"), 0, "{:?}", ops(g));
    let cast = nodes(g, "Cast")[0];
    assert_eq!(count(g, "Cast"), 1, "{:?}", ops(g));
    assert_eq!(
        attr_of(cast, "to").and_then(|a| a.i),
        Some(DataType::Float as i64)
    );
    let q = init(g, &cast.input[0]).unwrap();
    assert_eq!(q.data_type(), DataType::Int8 as i32);
    let mul = nodes(g, "Mul")[0];
    assert_eq!(mul.input[0], cast.output[0]);
    let scale = init(g, &mul.input[1]).unwrap();
    assert_eq!(scale.dims, [4, 1, 1, 1], "one scale per output channel");
    // The Mul output takes the weight's name: the Conv reads it unchanged.
    assert_eq!(node_named(g, "conv").input[1], "W");
    assert_eq!(mul.output[0], "W");
    assert_dequantizes_to(
        &values(init(main(&p), "W").unwrap()),
        &[4, 3, 3, 3],
        0,
        &values(q),
        &values(scale),
    );
    let x = tensor(&[1, 3, 8, 8], &rand_f32(192, 61, 1.0));
    assert_close_in_tract(&p, &r.proto, &[("x", x)], 0.999);
}

#[test]
fn cast_format_asymmetric_uint8_subtracts_the_zero_point() {
    let w = rand_f32(128, 62, 0.5)
        .iter()
        .map(|v| v + 0.3)
        .collect::<Vec<_>>();
    let p = model(
        21,
        graph(
            "g",
            vec![node("MatMul", "mm", &["x", "Wm"], &["y"], vec![])],
            vec![f32_info("x", &[2, 16])],
            vec![out("y")],
            vec![f32_init("Wm", &[16, 8], &w)],
        ),
    );
    let scheme = Scheme {
        qtype: QType::Uint8,
        symmetric: false,
        granularity: Granularity::Tensor,
        pow2: false,
    };
    let r = run_passes_with(&p, &[W], &cast_opts(scheme));
    let g = r.g();
    assert_eq!(
        count(g, "DequantizeLinear"),
        0,
        "even at opset 21: {:?}",
        ops(g)
    );
    let cast = nodes(g, "Cast")[0];
    assert_eq!(
        init(g, &cast.input[0]).unwrap().data_type(),
        DataType::Uint8 as i32
    );
    let sub = nodes(g, "Sub")[0];
    assert_eq!(sub.input[0], cast.output[0]);
    let zp = values(init(g, &sub.input[1]).unwrap());
    assert_eq!(zp.len(), 1);
    assert!(zp[0] > 0.0 && zp[0] < 255.0, "{zp:?}");
    assert_eq!(nodes(g, "Mul")[0].input[0], sub.output[0]);
    let x = tensor(&[2, 16], &rand_f32(32, 63, 1.0));
    assert_close_in_tract(&p, &r.proto, &[("x", x)], 0.999);
}

#[test]
fn cast_format_refuses_4_bit_and_blocks() {
    for scheme in [
        Scheme {
            qtype: QType::Int4,
            ..Scheme::INT8_CHANNEL
        },
        Scheme {
            granularity: Granularity::Block(32),
            ..Scheme::INT8_CHANNEL
        },
    ] {
        let (mut m, _) = crate::onnx::from_proto(conv_model(21), None, "test").unwrap();
        let e = run_pipeline(
            &mut m,
            &[by_name(W).unwrap()],
            &cast_opts(scheme),
            true,
            &crate::report::Silent,
        )
        .unwrap_err();
        let msg = format!("{e:#}");
        assert!(
            msg.contains("8- and 16-bit") && msg.contains("--format qdq"),
            "{msg}"
        );
    }
}

#[test]
fn cast_format_on_fp16_weights_casts_back_to_fp16_at_every_opset() {
    // At opset >= 19 the DequantizeLinear form keeps an fp16 scale; the cast form computes in
    // float32 there too and needs the Cast back, or the Conv reads float32 beside an fp16 x.
    for opset in [13, 19, 21] {
        let p = fp16_conv_model(opset);
        let r = run_passes_with(&p, &[W], &cast_opts(Scheme::INT8_CHANNEL));
        let g = r.g();
        let back = producer(g, &node_named(g, "conv").input[1]).unwrap();
        assert_eq!(back.op_type(), "Cast", "opset {opset}: {:?}", ops(g));
        assert_eq!(
            attr_of(back, "to").and_then(|a| a.i),
            Some(DataType::Float16 as i64),
            "opset {opset}"
        );
        assert_onnx_checker_accepts(&r.proto, &format!("fp16-cast-opset{opset}"));
        assert_close_in_tract(&p, &r.proto, &[("x", fp16_input())], 0.999);
    }
}
