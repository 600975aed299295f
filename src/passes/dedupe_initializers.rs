//! `dedupe_initializers`: identical initializers (same dtype, same dims, same bytes) are
//! stored once; readers of a duplicate read the first one.
//!
//! Content is hashed in parallel (rayon), then candidates are compared byte for byte.
//!
//! Not done: initializers that are graph inputs or outputs, or that a subgraph reads by name,
//! are never merged away; duplicates across different graphs are not merged.

use std::collections::hash_map::DefaultHasher;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};

use anyhow::Result;
use rayon::prelude::*;

use super::{Pass, PassKind, PassOptions, PassStats};
use crate::ir::{Model, ValueId};

/// See the module documentation.
pub struct DedupeInitializers;

impl Pass for DedupeInitializers {
    fn name(&self) -> &'static str {
        "dedupe_initializers"
    }
    fn summary(&self) -> &'static str {
        "identical initializers (dtype, shape, bytes) stored once"
    }
    fn kind(&self) -> PassKind {
        PassKind::Exact
    }
    fn run(&self, model: &mut Model, _opts: &PassOptions) -> Result<PassStats> {
        let mut stats = PassStats::default();
        model.for_each_graph_mut(&mut |g, _names| {
            let sub_reads = g.names_read_by_subgraphs();
            let cands: Vec<ValueId> = g
                .initializers()
                .into_iter()
                .filter(|&v| {
                    !g.is_graph_input(v)
                        && !g.is_graph_output(v)
                        && !sub_reads.contains(&g.value(v).name)
                })
                .collect();
            let keyed: Vec<(u64, ValueId, bytes::Bytes)> = cands
                .par_iter()
                .filter_map(|&v| {
                    let t = g.initializer(v)?;
                    let content = t.content_key();
                    let mut h = DefaultHasher::new();
                    t.data_type().hash(&mut h);
                    t.dims().hash(&mut h);
                    content.hash(&mut h);
                    Some((h.finish(), v, content))
                })
                .collect();
            let mut first: HashMap<u64, Vec<(ValueId, bytes::Bytes)>> = HashMap::new();
            let mut replace = Vec::new();
            for (h, v, content) in keyed {
                let t = g.initializer(v);
                let bucket = first.entry(h).or_default();
                let same = bucket.iter().find(|(w, c)| {
                    let tw = g.initializer(*w);
                    match (t, tw) {
                        (Some(a), Some(b)) => {
                            a.data_type() == b.data_type() && a.dims() == b.dims() && *c == content
                        }
                        _ => false,
                    }
                });
                match same {
                    Some((w, _)) => replace.push((v, *w)),
                    None => bucket.push((v, content)),
                }
            }
            stats.changes += replace.len();
            for (dup, keep) in replace {
                g.replace_uses(dup, keep);
                g.remove_initializer(dup);
            }
        });
        Ok(stats)
    }
}
