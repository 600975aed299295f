//! Resolving a model's If nodes for one input set, so that tract can run it.
//!
//! tract translates an If node to one op whose outputs must have the same type and shape in
//! both branches, whatever the condition; exporters write Ifs whose branches differ (silero-vad
//! at opset 15: a `Squeeze` in one branch, an `Identity` in the other, on a condition computed
//! from the input shapes), and tract refuses them. For one input set the condition is one value:
//! [`IfResolver`] computes the conditions tract can compute (their cone of main-graph nodes,
//! run alone) and puts the nodes of the branch taken in the If's place, round after round for
//! nested Ifs. The result computes what the model computes on those inputs; the caller runs
//! it on exactly those inputs.
//!
//! Semantics (ONNX `If`, opset 1 to 23): `cond` is a single-element bool tensor; the node's
//! outputs are the taken branch's graph outputs, in order. A branch reads outer values by name,
//! and names in a branch do not shadow outer names, so its nodes can move to the main graph; a
//! name a sibling branch also defined, or a repeated node name, is renamed on the way.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tract_onnx::prelude::*;

use crate::pb;
use crate::quant::calibrate::Runner;

/// Most rounds of inlining (one per level of nesting).
const MAX_ROUNDS: usize = 16;

/// Whether the main graph of `model` has an If node.
pub fn has_if(model: &pb::ModelProto) -> bool {
    model
        .graph
        .as_ref()
        .is_some_and(|g| g.node.iter().any(|n| n.op_type() == "If"))
}

/// `model` with the main graph's If nodes resolved for `inputs` (one tensor per graph input, by
/// name; external data read from `model_dir`), as [`IfResolver::resolve`] does; `None` when
/// nothing was resolved.
pub fn inline_ifs(
    model: &pb::ModelProto,
    model_dir: Option<&Path>,
    inputs: &[(String, Tensor)],
) -> Option<pb::ModelProto> {
    let mut r = IfResolver::new(model, model_dir)?;
    let original = r.steps[&Vec::new()].model.clone();
    let (resolved, _) = r.resolve(inputs);
    let changed = !Arc::ptr_eq(&original, &resolved);
    drop((r, original)); // `resolved` is then the only copy
    changed.then(|| Arc::unwrap_or_clone(resolved))
}

/// Resolves the If nodes of one model for many input sets: each If whose condition tract can
/// compute from the inputs is replaced by the nodes and initializers of the branch it takes,
/// followed by one `Identity` per If output (`<if name>/taken_<i>`) from the branch's output;
/// nested Ifs are resolved in later rounds. The conditions' cones (the main-graph nodes that
/// compute them) are planned once per round outcome and input shapes, the cones of one round
/// together, and each outcome's model is made once.
///
/// A name the taken branch defines that the main graph already has (sibling branches may
/// reuse names) is renamed `<name>/<if name>` in the branch, and a node name likewise.
///
/// An If stays when its condition depends on another If, Loop or Scan node, when tract cannot
/// compute it (the message is dropped: running the model then fails with tract's own error on
/// the If), when it is not one bool, or when the If is malformed (a branch missing, or outputs
/// that do not match the branch's); when the conditions of a round cannot be computed together,
/// each is computed on its own, so one that cannot be does not hold the others back.
pub struct IfResolver {
    dir: Option<PathBuf>,
    /// By the outcomes so far (per decided If of each round, in node order, the branch taken
    /// or `None` when it stayed): the model they make and what the next round decides.
    steps: HashMap<Vec<Option<bool>>, Step>,
}

struct Step {
    model: Arc<pb::ModelProto>,
    /// What the next round decides; `None` when nothing more can be.
    next: Option<Round>,
}

/// The Ifs one round decides and the runners of their conditions' cones.
struct Round {
    /// The conditions of the Ifs this round decides, in node order (one per If).
    conditions: Vec<String>,
    /// The distinct conditions, sorted.
    unique: Vec<String>,
    /// One runner of all their cones together (`None` where tract cannot load it): the cones
    /// of one round share most of their nodes, which tract then types once.
    joint: Option<Runner>,
    /// Per distinct condition, the runner of its cone alone (`None` where tract cannot load
    /// it); made when the joint runner fails, so that one condition tract cannot compute
    /// does not hold the others back.
    alone: Option<Vec<Option<Runner>>>,
}

/// Most outcomes a resolver keeps (each holds a copy of the model); past it, all but the
/// original are dropped and made again when needed.
const MAX_STEPS: usize = 64;

impl Step {
    fn new(model: pb::ModelProto, dir: Option<&Path>) -> Step {
        let conditions = model
            .graph
            .as_ref()
            .map(decidable_conditions)
            .unwrap_or_default();
        let next = (!conditions.is_empty()).then(|| {
            let mut unique = conditions.clone();
            unique.sort();
            unique.dedup();
            let joint = Runner::new_in(&cone_model(&model, &unique), false, dir).ok();
            Round {
                conditions,
                unique,
                joint,
                alone: None,
            }
        });
        Step {
            model: Arc::new(model),
            next,
        }
    }
}

impl Round {
    /// Each If's branch for `inputs` (`None` where its condition could not be computed), in
    /// the order of `conditions`; `model` is the step's model, its external data in `dir`.
    fn outcome(
        &mut self,
        inputs: &[(String, Tensor)],
        model: &pb::ModelProto,
        dir: Option<&Path>,
    ) -> Vec<Option<bool>> {
        let joint = self
            .joint
            .as_mut()
            .and_then(|r| r.run(inputs).ok())
            .filter(|outs| outs.len() == self.unique.len());
        let values: Vec<Option<bool>> = match joint {
            Some(outs) => outs.iter().map(|t| single_bool(t)).collect(),
            None => {
                let unique = &self.unique;
                let alone = self.alone.get_or_insert_with(|| {
                    unique
                        .iter()
                        .map(|c| {
                            Runner::new_in(&cone_model(model, std::slice::from_ref(c)), false, dir)
                                .ok()
                        })
                        .collect()
                });
                alone
                    .iter_mut()
                    .map(|r| {
                        let outs = r.as_mut()?.run(inputs).ok()?;
                        single_bool(outs.first()?)
                    })
                    .collect()
            }
        };
        self.conditions
            .iter()
            .map(|c| {
                let i = self.unique.binary_search(c).ok()?;
                values[i]
            })
            .collect()
    }
}

impl IfResolver {
    /// A resolver for `model` (external data read from `model_dir`), or `None` when its main
    /// graph has no If node.
    pub fn new(model: &pb::ModelProto, model_dir: Option<&Path>) -> Option<IfResolver> {
        if !has_if(model) {
            return None;
        }
        let mut steps = HashMap::new();
        steps.insert(Vec::new(), Step::new(model.clone(), model_dir));
        Some(IfResolver {
            dir: model_dir.map(Path::to_path_buf),
            steps,
        })
    }

    /// The model resolved for `inputs` (one tensor per graph input, by name) and the outcome
    /// of every round: two input sets with the same outcome get the same model.
    pub fn resolve(
        &mut self,
        inputs: &[(String, Tensor)],
    ) -> (Arc<pb::ModelProto>, Vec<Option<bool>>) {
        let mut key: Vec<Option<bool>> = Vec::new();
        for _ in 0..MAX_ROUNDS {
            // This round's outcome, and what a new step would be made from.
            let (outcome, conditions, model) = {
                let Some(step) = self.steps.get_mut(&key) else {
                    break;
                };
                let Some(round) = step.next.as_mut() else {
                    break;
                };
                let outcome = round.outcome(inputs, &step.model, self.dir.as_deref());
                (outcome, round.conditions.clone(), step.model.clone())
            };
            if outcome.iter().all(Option::is_none) {
                break;
            }
            let mut next = key.clone();
            next.extend(&outcome);
            if !self.steps.contains_key(&next) {
                let mut changed = (*model).clone();
                let inlined = match changed.graph.as_mut() {
                    Some(g) => inline_round(g, &conditions, &outcome),
                    None => false,
                };
                let step = if inlined {
                    Step::new(changed, self.dir.as_deref())
                } else {
                    // Nothing could go in (malformed Ifs): the same model, shared.
                    Step { model, next: None }
                };
                if self.steps.len() >= MAX_STEPS {
                    self.steps.retain(|k, _| k.is_empty());
                }
                self.steps.insert(next.clone(), step);
            }
            key = next;
        }
        let model = match self.steps.get(&key) {
            Some(s) => s.model.clone(),
            None => self.steps[&Vec::new()].model.clone(),
        };
        (model, key)
    }
}

/// The value of a one-element bool tensor (ONNX `If`'s `cond`).
fn single_bool(t: &Tensor) -> Option<bool> {
    if t.len() != 1 || t.datum_type() != DatumType::Bool {
        return None;
    }
    t.nth(0).ok()?.cast_to_scalar::<bool>().ok()
}

/// Producers of the main graph's values: node index by output name.
fn producers(g: &pb::GraphProto) -> HashMap<&str, usize> {
    g.node
        .iter()
        .enumerate()
        .flat_map(|(i, n)| n.output.iter().map(move |o| (o.as_str(), i)))
        .filter(|(o, _)| !o.is_empty())
        .collect()
}

/// The nodes (indexes, in graph order) that compute `target`, or `None` when one of them holds
/// a subgraph.
fn cone_of(
    g: &pb::GraphProto,
    produced: &HashMap<&str, usize>,
    target: &str,
) -> Option<Vec<usize>> {
    let mut seen = BTreeSet::new();
    let mut stack = vec![target];
    while let Some(name) = stack.pop() {
        let Some(&i) = produced.get(name) else {
            continue; // graph input or initializer
        };
        if !seen.insert(i) {
            continue;
        }
        let n = &g.node[i];
        if n.attribute
            .iter()
            .any(|a| a.g.is_some() || !a.graphs.is_empty())
        {
            return None;
        }
        stack.extend(n.input.iter().map(String::as_str).filter(|s| !s.is_empty()));
    }
    Some(seen.into_iter().collect())
}

/// The conditions of the main graph's If nodes whose cone holds no subgraph, one per If, in
/// node order.
fn decidable_conditions(g: &pb::GraphProto) -> Vec<String> {
    let produced = producers(g);
    let mut out: Vec<String> = Vec::new();
    for n in g.node.iter().filter(|n| n.op_type() == "If") {
        let Some(cond) = n.input.first().filter(|c| !c.is_empty()) else {
            continue;
        };
        if cone_of(g, &produced, cond).is_some() {
            out.push(cond.clone());
        }
    }
    out
}

/// A model computing only `targets` (its graph outputs): their cones' nodes, the initializers
/// and graph inputs those read, and the rest of `model` (opsets, functions) as it is.
fn cone_model(model: &pb::ModelProto, targets: &[String]) -> pb::ModelProto {
    let mut out = pb::ModelProto {
        ir_version: model.ir_version,
        opset_import: model.opset_import.clone(),
        functions: model.functions.clone(),
        ..Default::default()
    };
    let Some(g) = model.graph.as_ref() else {
        return out;
    };
    let produced = producers(g);
    let nodes: BTreeSet<usize> = targets
        .iter()
        .filter_map(|t| cone_of(g, &produced, t))
        .flatten()
        .collect();
    let read: HashSet<&str> = nodes
        .iter()
        .flat_map(|&i| g.node[i].input.iter().map(String::as_str))
        .chain(targets.iter().map(String::as_str))
        .collect();
    let graph = pb::GraphProto {
        name: g.name.clone(),
        node: nodes.iter().map(|&i| g.node[i].clone()).collect(),
        initializer: g
            .initializer
            .iter()
            .filter(|t| read.contains(t.name()))
            .cloned()
            .collect(),
        sparse_initializer: g
            .sparse_initializer
            .iter()
            .filter(|t| t.values.as_ref().is_some_and(|v| read.contains(v.name())))
            .cloned()
            .collect(),
        input: g
            .input
            .iter()
            .filter(|i| read.contains(i.name()))
            .cloned()
            .collect(),
        output: targets
            .iter()
            .map(|t| pb::ValueInfoProto {
                name: Some(t.clone()),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    };
    out.graph = Some(graph);
    out
}

/// Replaces the Ifs of `g` decided this round (the Ifs whose condition is in `conditions`, in
/// node order, one per If) by the branch `outcome` says they take; returns whether any was.
fn inline_round(g: &mut pb::GraphProto, conditions: &[String], outcome: &[Option<bool>]) -> bool {
    let mut names: HashSet<String> = g
        .node
        .iter()
        .flat_map(|n| n.output.iter().cloned())
        .chain(g.initializer.iter().map(|t| t.name().to_string()))
        .chain(g.input.iter().map(|i| i.name().to_string()))
        .collect();
    let mut node_names: HashSet<String> = g.node.iter().map(|n| n.name().to_string()).collect();
    let old = std::mem::take(&mut g.node);
    let mut extra_inits = Vec::new();
    let mut extra_sparse = Vec::new();
    let mut decided = conditions.iter().zip(outcome);
    let mut inlined = false;
    for n in old {
        let is_decided =
            n.op_type() == "If" && n.input.first().is_some_and(|c| conditions.contains(c));
        let branch = match is_decided.then(|| decided.next()).flatten() {
            Some((_, Some(c))) => taken_branch(&n, *c),
            _ => None,
        };
        let Some(mut b) = branch else {
            g.node.push(n);
            continue;
        };
        inlined = true;
        rename_clashes(&mut b, n.name(), &mut names, &mut node_names);
        g.node.extend(b.node);
        for (i, (to, from)) in n.output.iter().zip(&b.output).enumerate() {
            if to.is_empty() {
                continue;
            }
            let name = fresh(&format!("{}/taken_{i}", n.name()), &mut node_names);
            g.node.push(pb::NodeProto {
                name: Some(name),
                op_type: Some("Identity".to_string()),
                input: vec![from.name().to_string()],
                output: vec![to.clone()],
                ..Default::default()
            });
        }
        extra_inits.extend(b.initializer);
        extra_sparse.extend(b.sparse_initializer);
    }
    g.initializer.extend(extra_inits);
    g.sparse_initializer.extend(extra_sparse);
    inlined
}

/// A copy of If node `n`'s `then_branch` (`cond`) or `else_branch`, or `None` when the If is
/// malformed: a branch missing, or the taken one has another number of outputs than the If.
fn taken_branch(n: &pb::NodeProto, cond: bool) -> Option<pb::GraphProto> {
    let branch = |name: &str| {
        n.attribute
            .iter()
            .find(|a| a.name() == name)
            .and_then(|a| a.g.as_ref())
    };
    let (then_b, else_b) = (branch("then_branch")?, branch("else_branch")?);
    let b = if cond { then_b } else { else_b };
    (b.output.len() == n.output.len()).then(|| b.clone())
}

/// `base`, or `base` followed by `_`s, whichever `taken` does not hold yet; added to `taken`.
fn fresh(base: &str, taken: &mut HashSet<String>) -> String {
    let mut name = base.to_string();
    while taken.contains(&name) {
        name.push('_');
    }
    taken.insert(name.clone());
    name
}

/// Renames what branch `b` (of If `if_name`) defines that `names` already holds (node outputs,
/// initializers; node names against `node_names`), through the whole branch, nested subgraphs
/// included; adds what it defines to both sets.
fn rename_clashes(
    b: &mut pb::GraphProto,
    if_name: &str,
    names: &mut HashSet<String>,
    node_names: &mut HashSet<String>,
) {
    let defined: Vec<String> = b
        .node
        .iter()
        .flat_map(|n| n.output.iter().filter(|o| !o.is_empty()).cloned())
        .chain(b.initializer.iter().map(|t| t.name().to_string()))
        .chain(
            b.sparse_initializer
                .iter()
                .filter_map(|t| t.values.as_ref().map(|v| v.name().to_string())),
        )
        .collect();
    let mut map: HashMap<String, String> = HashMap::new();
    for d in defined {
        if names.contains(&d) {
            let new = fresh(&format!("{d}/{if_name}"), names);
            map.insert(d, new);
        } else {
            names.insert(d);
        }
    }
    if !map.is_empty() {
        rename_in_graph(b, &map);
        for t in &mut b.initializer {
            if let Some(new) = map.get(t.name()) {
                t.name = Some(new.clone());
            }
        }
        for t in &mut b.sparse_initializer {
            if let Some(v) = t.values.as_mut() {
                if let Some(new) = map.get(v.name()) {
                    v.name = Some(new.clone());
                }
            }
        }
    }
    for n in &mut b.node {
        if !n.name().is_empty() {
            n.name = Some(fresh(n.name(), node_names));
        }
    }
}

/// Renames, by `map`, the node inputs and outputs and the graph outputs of `g` and of every
/// subgraph in it.
fn rename_in_graph(g: &mut pb::GraphProto, map: &HashMap<String, String>) {
    for n in &mut g.node {
        for v in n.input.iter_mut().chain(n.output.iter_mut()) {
            if let Some(new) = map.get(v.as_str()) {
                *v = new.clone();
            }
        }
        for a in &mut n.attribute {
            for sub in a.g.iter_mut().chain(a.graphs.iter_mut()) {
                rename_in_graph(sub, map);
            }
        }
    }
    for o in &mut g.output {
        if let Some(new) = map.get(o.name()) {
            o.name = Some(new.clone());
        }
    }
}
