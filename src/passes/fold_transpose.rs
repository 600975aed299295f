//! `fold_transpose`: a Transpose of an initializer becomes the transposed initializer.
//!
//! Before: `y = Transpose(W, perm)` with `W` an initializer that nothing else reads (exports
//! without constant folding write a Linear layer as `MatMul(x, Transpose(W))`). After: an
//! initializer named `y` holding `W` with its axes permuted (Transpose-1/13/21: output axis
//! `i` is input axis `perm[i]`, `perm` reversing the axes when absent), so the weight passes
//! see a weight where they saw an activation. The values are moved, not computed: the pass is
//! exact. The new initializer keeps `W`'s doc string and metadata; `W`, read by nothing
//! after it, is removed by `eliminate_unused_initializers`.
//!
//! Not done: a `W` that another node, a subgraph, a graph output or the model's header
//! (training_info, quantization_annotation) also reads (folding would store the weight
//! twice); a `W` that is a graph input (callers may feed it); a `y` that is an If/Loop/Scan
//! body's output (not every runtime takes an initializer there); strings and sub-byte types;
//! models with IR < 4, where every initializer must also be a graph input.

use std::collections::HashSet;

use anyhow::Result;

use super::{can_add_initializers, Pass, PassKind, PassOptions, PassStats};
use crate::ir::tensor::{elem_info, typed_to_raw};
use crate::ir::{Graph, Model, NodeId, Tensor, ValueId};

/// See the module documentation.
pub struct FoldTranspose;

impl Pass for FoldTranspose {
    fn name(&self) -> &'static str {
        "fold_transpose"
    }
    fn summary(&self) -> &'static str {
        "a Transpose of an initializer nothing else reads becomes the transposed initializer (weights exported as Transpose(W))"
    }
    fn kind(&self) -> PassKind {
        PassKind::Exact
    }
    fn run(&self, model: &mut Model, _opts: &PassOptions) -> Result<PassStats> {
        let mut stats = PassStats::default();
        if !can_add_initializers(model) {
            return Ok(stats);
        }
        let mut main = true;
        model.for_each_graph_mut(&mut |g, _names| {
            let outputs_ok = std::mem::take(&mut main);
            let outside = g.names_read_by_subgraphs();
            for (id, out, folded) in foldable(g, outputs_ok, &outside) {
                g.remove_node(id);
                g.make_initializer(out, folded);
                stats.changes += 1;
            }
        });
        Ok(stats)
    }
}

/// The Transposes of `g` to fold: the node, its output and the initializer that replaces it.
/// `outputs_ok`: the graph's outputs may be initializers (the main graph). `outside`: names
/// read other than by `g`'s nodes (subgraphs, the model's header), left alone.
fn foldable(
    g: &Graph,
    outputs_ok: bool,
    outside: &HashSet<String>,
) -> Vec<(NodeId, ValueId, Tensor)> {
    let uses = g.uses();
    g.live_nodes()
        .filter(|(_, n)| n.is("Transpose") && n.domain().is_empty())
        .filter_map(|(id, n)| {
            let (Some(Some(w)), Some(Some(out))) = (n.inputs.first(), n.outputs.first()) else {
                return None;
            };
            let (w, out) = (*w, *out);
            let t = g.initializer(w)?;
            let alone = uses[w.0 as usize].len() == 1
                && !g.is_graph_input(w)
                && !g.is_graph_output(w)
                && !outside.contains(&g.value(w).name);
            if !alone || n.inputs.len() != 1 || n.outputs.len() != 1 {
                return None;
            }
            if g.is_graph_output(out) && !outputs_ok {
                return None;
            }
            let rank = t.dims().len();
            let perm: Vec<usize> = match n.attr_ints("perm") {
                Some(p) => p
                    .iter()
                    .map(|&a| usize::try_from(a).ok())
                    .collect::<Option<_>>()?,
                None => (0..rank).rev().collect(),
            };
            let mut folded = transposed(t, &perm)?;
            folded.proto.name = Some(g.value(out).name.clone());
            Some((id, out, folded.described_as(Some(t))))
        })
        .collect()
}

/// `t` with its axes permuted by `perm` (output axis `i` is input axis `perm[i]`), or `None`
/// when `perm` is not a permutation of its axes, its data cannot be read as whole bytes per
/// element (strings, sub-byte types) or does not match its shape.
pub fn transposed(t: &Tensor, perm: &[usize]) -> Option<Tensor> {
    let dims: Vec<usize> = t
        .dims()
        .iter()
        .map(|&d| usize::try_from(d).ok())
        .collect::<Option<_>>()?;
    let rank = dims.len();
    let mut seen = vec![false; rank];
    if perm.len() != rank
        || perm
            .iter()
            .any(|&a| a >= rank || std::mem::replace(&mut seen[a], true))
    {
        return None;
    }
    let bits = elem_info(t.data_type()).bits?;
    if bits % 8 != 0 {
        return None;
    }
    let size = (bits / 8) as usize;
    let owned;
    let raw: &[u8] = match &t.proto.raw_data {
        Some(r) => r,
        None => {
            owned = typed_to_raw(&t.proto)?;
            &owned
        }
    };
    let n: usize = dims.iter().product();
    if raw.len() != n.checked_mul(size)? {
        return None;
    }
    // Row-major strides of the input, taken in the output's axis order.
    let mut strides = vec![1usize; rank];
    for a in (0..rank.saturating_sub(1)).rev() {
        strides[a] = strides[a + 1] * dims[a + 1];
    }
    let out_dims: Vec<usize> = perm.iter().map(|&a| dims[a]).collect();
    let out_strides: Vec<usize> = perm.iter().map(|&a| strides[a]).collect();
    let mut out = Vec::with_capacity(raw.len());
    let mut index = vec![0usize; rank];
    let mut at = 0usize; // input element of the current output index
    for _ in 0..n {
        out.extend_from_slice(&raw[at * size..(at + 1) * size]);
        // Next output index (odometer, last axis fastest), keeping `at` in step.
        for a in (0..rank).rev() {
            index[a] += 1;
            at += out_strides[a];
            if index[a] < out_dims[a] {
                break;
            }
            at -= out_strides[a] * out_dims[a];
            index[a] = 0;
        }
    }
    let out_dims: Vec<i64> = out_dims.iter().map(|&d| d as i64).collect();
    Some(Tensor::from_raw(t.data_type(), &out_dims, out))
}
