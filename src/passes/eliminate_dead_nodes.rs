//! `eliminate_dead_nodes`: nodes whose outputs nothing reads are removed.
//!
//! A value is needed when it is a graph output, is read by a needed node, or is read by name
//! from a subgraph. Liveness is propagated backwards from the outputs in one sweep.
//!
//! Not done: nodes of domains other than the default ONNX and `ai.onnx.ml` domains are kept
//! even when unused (a custom op may have effects the graph does not show).

use anyhow::Result;

use super::{Pass, PassKind, PassOptions, PassStats};
use crate::ir::Model;
use crate::onnx::export::topo_order;

/// See the module documentation.
pub struct EliminateDeadNodes;

impl Pass for EliminateDeadNodes {
    fn name(&self) -> &'static str {
        "eliminate_dead_nodes"
    }
    fn summary(&self) -> &'static str {
        "nodes whose outputs nothing reads are removed (graph outputs, subgraph reads and custom-domain nodes kept)"
    }
    fn kind(&self) -> PassKind {
        PassKind::Exact
    }
    fn run(&self, model: &mut Model, _opts: &PassOptions) -> Result<PassStats> {
        let mut stats = PassStats::default();
        let mut err = None;
        model.for_each_graph_mut(&mut |g, _names| {
            let order = match topo_order(g) {
                Ok(o) => o,
                Err(e) => {
                    err.get_or_insert(e);
                    return;
                }
            };
            let mut needed = vec![false; g.values.len()];
            for p in &g.outputs {
                needed[p.value.0 as usize] = true;
            }
            for name in g.names_read_by_subgraphs() {
                if let Some(v) = g.find(&name) {
                    needed[v.0 as usize] = true;
                }
            }
            let mut dead = Vec::new();
            for &id in order.iter().rev() {
                let n = g.node(id);
                let keep = !matches!(n.domain(), "" | "ai.onnx.ml")
                    || n.outputs.iter().flatten().any(|v| needed[v.0 as usize]);
                if keep {
                    for v in n.inputs.iter().flatten() {
                        needed[v.0 as usize] = true;
                    }
                } else {
                    dead.push(id);
                }
            }
            stats.changes += dead.len();
            for id in dead {
                g.remove_node(id);
            }
        });
        match err {
            Some(e) => Err(e),
            None => Ok(stats),
        }
    }
}
