//! `eliminate_identity`: Identity nodes removed, their readers read the input directly.
//!
//! Before: `y = Identity(x)`; after: readers of `y` read `x`. When `y` is a graph output, `x`
//! takes the name `y` instead (outputs keep their names), which is only done when `x` is a
//! node output of this graph that is neither a graph output nor read by a subgraph.
//!
//! Not done: an Identity whose output a subgraph reads by name, or whose output is a graph
//! output that cannot take over its input (graph input, initializer, outer-scope value):
//! those stay. Identity on sequences and optionals is treated the same way (it is a no-op).

use anyhow::Result;

use super::{Pass, PassKind, PassOptions, PassStats};
use crate::ir::{Model, ValueDef};

/// See the module documentation.
pub struct EliminateIdentity;

impl Pass for EliminateIdentity {
    fn name(&self) -> &'static str {
        "eliminate_identity"
    }
    fn summary(&self) -> &'static str {
        "Identity nodes removed; graph outputs keep their names"
    }
    fn kind(&self) -> PassKind {
        PassKind::Exact
    }
    fn run(&self, model: &mut Model, _opts: &PassOptions) -> Result<PassStats> {
        let mut stats = PassStats::default();
        model.for_each_graph_mut(&mut |g, _names| {
            let sub_reads = g.names_read_by_subgraphs();
            let ids: Vec<_> = g
                .live_nodes()
                .filter(|(_, n)| n.is("Identity") && n.inputs.len() == 1 && n.outputs.len() == 1)
                .map(|(id, _)| id)
                .collect();
            for id in ids {
                let n = g.node(id);
                let (Some(x), Some(y)) = (n.inputs[0], n.outputs[0]) else {
                    continue;
                };
                if sub_reads.contains(&g.value(y).name) {
                    continue;
                }
                if g.is_graph_output(y) {
                    let x_is_plain_node_output = matches!(g.value(x).def, ValueDef::Node(..))
                        && !g.is_graph_output(x)
                        && !sub_reads.contains(&g.value(x).name);
                    if !x_is_plain_node_output {
                        continue;
                    }
                    // x takes y's name, so the graph output keeps it.
                    g.remove_node(id);
                    g.transfer_name(y, x);
                    g.redirect_outputs(y, x);
                    g.replace_uses(y, x);
                } else {
                    g.remove_node(id);
                    g.replace_uses(y, x);
                }
                stats.changes += 1;
            }
        });
        Ok(stats)
    }
}
