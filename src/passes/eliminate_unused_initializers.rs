//! `eliminate_unused_initializers`: initializers that nothing reads are removed.
//!
//! Kept: initializers that are graph outputs, that are also listed as graph inputs (a caller
//! may feed them: they are part of the interface), and those read by name from a subgraph.
//! [`remove_unused`] also serves the pass manager, which after each lossy pass removes the
//! float weights that pass replaced (read before it, read by nothing after it).

use anyhow::Result;

use super::{Pass, PassKind, PassOptions, PassStats};
use crate::ir::{Graph, Model, NodeId, ValueId};

/// See the module documentation.
pub struct EliminateUnusedInitializers;

impl Pass for EliminateUnusedInitializers {
    fn name(&self) -> &'static str {
        "eliminate_unused_initializers"
    }
    fn summary(&self) -> &'static str {
        "initializers that no node, output or subgraph reads are removed"
    }
    fn kind(&self) -> PassKind {
        PassKind::Exact
    }
    fn run(&self, model: &mut Model, _opts: &PassOptions) -> Result<PassStats> {
        Ok(PassStats {
            changes: remove_unused(model, |_| true).0,
            ..Default::default()
        })
    }
}

/// Removes the unused initializers (as the module documentation says) whose name `among`
/// accepts, in every graph; returns how many were removed and their bytes.
pub fn remove_unused(model: &mut Model, among: impl Fn(&str) -> bool) -> (usize, u64) {
    let (mut count, mut bytes) = (0, 0);
    model.for_each_graph_mut(&mut |g, _names| {
        let uses = g.uses();
        let sub_reads = g.names_read_by_subgraphs();
        let unused: Vec<_> = g
            .initializers()
            .into_iter()
            .filter(|&v| {
                !is_read(g, &uses, &sub_reads, v) && !g.is_graph_input(v) && among(&g.value(v).name)
            })
            .collect();
        count += unused.len();
        for v in unused {
            bytes += g.initializer(v).map_or(0, |t| t.byte_size() as u64);
            g.remove_initializer(v);
        }
    });
    (count, bytes)
}

/// The names of the initializers that something reads (a node, a graph output, a subgraph),
/// in every graph: what [`remove_unused`] must not take from a model before a pass runs.
pub fn read_initializers(model: &Model) -> std::collections::HashSet<String> {
    let mut out = std::collections::HashSet::new();
    model.graph.visit(&mut |g| {
        let uses = g.uses();
        let sub_reads = g.names_read_by_subgraphs();
        for v in g.initializers() {
            if is_read(g, &uses, &sub_reads, v) {
                out.insert(g.value(v).name.clone());
            }
        }
    });
    out
}

/// Whether value `v` of `g` is read: by a node (`uses` from [`Graph::uses`]), as a graph
/// output, or by name from a subgraph or the model's header (`sub_reads`, from
/// [`Graph::names_read_by_subgraphs`]).
pub(crate) fn is_read(
    g: &Graph,
    uses: &[Vec<(NodeId, usize)>],
    sub_reads: &std::collections::HashSet<String>,
    v: ValueId,
) -> bool {
    !uses[v.0 as usize].is_empty() || g.is_graph_output(v) || sub_reads.contains(&g.value(v).name)
}
