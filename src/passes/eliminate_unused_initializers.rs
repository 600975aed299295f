//! `eliminate_unused_initializers`: initializers that nothing reads are removed.
//!
//! Kept: initializers that are graph outputs, that are also listed as graph inputs (a caller
//! may feed them: they are part of the interface), and those read by name from a subgraph.

use anyhow::Result;

use super::{Pass, PassKind, PassOptions, PassStats};
use crate::ir::Model;

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
        let mut stats = PassStats::default();
        model.for_each_graph_mut(&mut |g, _names| {
            let uses = g.uses();
            let sub_reads = g.names_read_by_subgraphs();
            let unused: Vec<_> = g
                .initializers()
                .into_iter()
                .filter(|&v| {
                    uses[v.0 as usize].is_empty()
                        && !g.is_graph_output(v)
                        && !g.is_graph_input(v)
                        && !sub_reads.contains(&g.value(v).name)
                })
                .collect();
            stats.changes += unused.len();
            for v in unused {
                g.remove_initializer(v);
            }
        });
        Ok(stats)
    }
}
