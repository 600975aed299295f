//! Builders of tiny models for the verify tests.

use crate::pb;
use pb::tensor_proto::DataType;

pub fn dims_info(name: &str, elem: DataType, dims: &[Dim]) -> pb::ValueInfoProto {
    let dim = dims
        .iter()
        .map(|d| pb::tensor_shape_proto::Dimension {
            value: Some(match d {
                Dim::N(n) => pb::tensor_shape_proto::dimension::Value::DimValue(*n),
                Dim::P(p) => pb::tensor_shape_proto::dimension::Value::DimParam(p.to_string()),
            }),
            ..Default::default()
        })
        .collect();
    pb::ValueInfoProto {
        name: Some(name.into()),
        r#type: Some(pb::TypeProto {
            value: Some(pb::type_proto::Value::TensorType(pb::type_proto::Tensor {
                elem_type: Some(elem as i32),
                shape: Some(pb::TensorShapeProto { dim }),
            })),
            ..Default::default()
        }),
        ..Default::default()
    }
}

#[derive(Clone, Copy, Debug)]
pub enum Dim {
    N(i64),
    P(&'static str),
}

pub fn info(name: &str, elem: DataType, dims: &[i64]) -> pb::ValueInfoProto {
    let dims: Vec<Dim> = dims.iter().map(|&d| Dim::N(d)).collect();
    dims_info(name, elem, &dims)
}

/// An output with only a name (no type), as tract is told to ignore output shapes anyway.
pub fn out(name: &str) -> pb::ValueInfoProto {
    pb::ValueInfoProto {
        name: Some(name.into()),
        ..Default::default()
    }
}

pub fn node(
    op: &str,
    name: &str,
    inputs: &[&str],
    outputs: &[&str],
    attrs: Vec<pb::AttributeProto>,
) -> pb::NodeProto {
    pb::NodeProto {
        op_type: Some(op.into()),
        name: Some(name.into()),
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: outputs.iter().map(|s| s.to_string()).collect(),
        attribute: attrs,
        ..Default::default()
    }
}

pub fn attr_i(name: &str, v: i64) -> pb::AttributeProto {
    pb::AttributeProto {
        name: Some(name.into()),
        r#type: Some(pb::attribute_proto::AttributeType::Int as i32),
        i: Some(v),
        ..Default::default()
    }
}

pub fn attr_ints(name: &str, v: &[i64]) -> pb::AttributeProto {
    pb::AttributeProto {
        name: Some(name.into()),
        r#type: Some(pb::attribute_proto::AttributeType::Ints as i32),
        ints: v.to_vec(),
        ..Default::default()
    }
}

pub fn init_f32(name: &str, dims: &[i64], data: &[f32]) -> pb::TensorProto {
    pb::TensorProto {
        name: Some(name.into()),
        dims: dims.to_vec(),
        data_type: Some(DataType::Float as i32),
        float_data: data.to_vec(),
        ..Default::default()
    }
}

pub fn init_i64(name: &str, dims: &[i64], data: &[i64]) -> pb::TensorProto {
    pb::TensorProto {
        name: Some(name.into()),
        dims: dims.to_vec(),
        data_type: Some(DataType::Int64 as i32),
        int64_data: data.to_vec(),
        ..Default::default()
    }
}

pub fn model(
    nodes: Vec<pb::NodeProto>,
    inputs: Vec<pb::ValueInfoProto>,
    outputs: Vec<pb::ValueInfoProto>,
    initializers: Vec<pb::TensorProto>,
) -> pb::ModelProto {
    pb::ModelProto {
        ir_version: Some(8),
        opset_import: vec![pb::OperatorSetIdProto {
            domain: Some(String::new()),
            version: Some(17),
        }],
        producer_name: Some("verify-tests".into()),
        graph: Some(pb::GraphProto {
            name: Some("g".into()),
            node: nodes,
            input: inputs,
            output: outputs,
            initializer: initializers,
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// y = x + c, x f32 [2, 3], c an initializer.
pub fn add_model(c: &[f32; 6]) -> pb::ModelProto {
    model(
        vec![node("Add", "add", &["x", "c"], &["y"], vec![])],
        vec![info("x", DataType::Float, &[2, 3])],
        vec![out("y")],
        vec![init_f32("c", &[2, 3], c)],
    )
}

/// emb = Gather(table[vocab, 4], Cast(ids, int32), axis 0), ids int64 [batch, 5].
pub fn gather_model(vocab: i64) -> pb::ModelProto {
    let table: Vec<f32> = (0..vocab * 4).map(|v| v as f32).collect();
    model(
        vec![
            node(
                "Cast",
                "cast",
                &["ids"],
                &["ids32"],
                vec![attr_i("to", DataType::Int32 as i64)],
            ),
            node(
                "Gather",
                "gather",
                &["table", "ids32"],
                &["emb"],
                vec![attr_i("axis", 0)],
            ),
        ],
        vec![dims_info(
            "ids",
            DataType::Int64,
            &[Dim::P("batch"), Dim::N(5)],
        )],
        vec![out("emb")],
        vec![init_f32("table", &[vocab, 4], &table)],
    )
}
