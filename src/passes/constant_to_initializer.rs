//! `constant_to_initializer`: Constant nodes become initializers.
//!
//! Before: `y = Constant()` with one of `value` (tensor), `value_float(s)`, `value_int(s)`,
//! `value_string(s)` (ONNX Constant-1..21). After: an initializer named `y` with the same
//! tensor, so weights held in Constant nodes are weights like any other (PaddlePaddle and
//! tf2onnx exports keep all weights this way).
//!
//! A Constant whose output is a main graph output becomes an initializer too (the output
//! keeps its name; onnxruntime and tract run such outputs).
//!
//! Not done: `sparse_value` constants (kept as nodes); Constants whose output is an output of
//! an If/Loop/Scan body (not every runtime takes an initializer as a subgraph's output);
//! models with IR < 4, where every initializer would also have to become a graph input.

use anyhow::Result;

use super::{can_add_initializers, Pass, PassKind, PassOptions, PassStats};
use crate::ir::{Model, Tensor};
use crate::pb::{self, tensor_proto::DataType};

/// See the module documentation.
pub struct ConstantToInitializer;

/// The tensor a Constant node produces, from whichever `value*` attribute it has.
pub fn constant_tensor(node: &crate::ir::Node) -> Option<pb::TensorProto> {
    for a in &node.proto.attribute {
        let t = match a.name() {
            "value" => a.t.clone(),
            "value_float" => a.f.map(|v| Tensor::from_f32(&[], &[v]).proto),
            "value_floats" => Some(Tensor::from_f32(&[a.floats.len() as i64], &a.floats).proto),
            "value_int" => a.i.map(|v| Tensor::from_i64(&[], &[v]).proto),
            "value_ints" => Some(Tensor::from_i64(&[a.ints.len() as i64], &a.ints).proto),
            "value_string" => a.s.clone().map(|s| pb::TensorProto {
                data_type: Some(DataType::String as i32),
                string_data: vec![s],
                ..Default::default()
            }),
            "value_strings" => Some(pb::TensorProto {
                dims: vec![a.strings.len() as i64],
                data_type: Some(DataType::String as i32),
                string_data: a.strings.clone(),
                ..Default::default()
            }),
            _ => None,
        };
        if t.is_some() {
            return t;
        }
    }
    None
}

impl Pass for ConstantToInitializer {
    fn name(&self) -> &'static str {
        "constant_to_initializer"
    }
    fn summary(&self) -> &'static str {
        "Constant nodes (every value* form) become initializers"
    }
    fn kind(&self) -> PassKind {
        PassKind::Exact
    }
    fn run(&self, model: &mut Model, _opts: &PassOptions) -> Result<PassStats> {
        let mut stats = PassStats::default();
        if !can_add_initializers(model) {
            stats.notes.push(format!(
                "IR version {} requires initializers to be graph inputs: Constant nodes kept",
                model.header.ir_version()
            ));
            return Ok(stats);
        }
        // The main graph comes first. A main graph output may be an initializer; a subgraph's
        // output stays a Constant node (not every runtime takes an initializer there).
        let mut main = true;
        model.for_each_graph_mut(&mut |g, _names| {
            let outputs_ok = std::mem::take(&mut main);
            let found: Vec<_> = g
                .live_nodes()
                .filter(|(_, n)| n.is("Constant") && n.outputs.len() == 1)
                .filter_map(|(id, n)| {
                    let out = n.outputs[0]?;
                    if g.is_graph_output(out) && !outputs_ok {
                        return None;
                    }
                    constant_tensor(n).map(|t| (id, out, t))
                })
                .collect();
            for (id, out, mut t) in found {
                t.name = Some(g.value(out).name.clone());
                g.remove_node(id);
                g.make_initializer(out, Tensor::new(t));
                stats.changes += 1;
            }
        });
        Ok(stats)
    }
}
