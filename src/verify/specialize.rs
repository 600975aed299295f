//! Resolving a model's If nodes for one input set, so that tract can run it.
//!
//! tract translates an If node to one op whose outputs must have the same type and shape in
//! both branches, whatever the condition; exporters write Ifs whose branches differ (silero-vad
//! at opset 15: a `Squeeze` in one branch, an `Identity` in the other, on a condition computed
//! from the input shapes), and tract refuses them. For one input set the condition is one value:
//! [`IfResolver`] computes the conditions tract can compute (the cone of main-graph nodes that
//! computes them, run as a model of its own) and puts the nodes of the branch taken in the
//! If's place, round after round for nested Ifs. The result computes what the model computes
//! on those inputs; the caller runs it on exactly those inputs. A condition tract would fold
//! from a dim it does not know (a comparison on the shape of a NonZero output) is not taken.
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

/// A model resolved for one input set, and the outcome of every round (per decided If of
/// each round, in node order, the branch taken or `None` when it stayed).
pub type Resolved = (Arc<pb::ModelProto>, Vec<Option<bool>>);

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
    let (resolved, _) = IfResolver::new(model, model_dir)?.changed(inputs)?;
    // The resolver is gone: `resolved` is the only copy.
    Some(Arc::unwrap_or_clone(resolved))
}

/// Resolves the If nodes of one model for many input sets: each If whose condition tract can
/// compute from the inputs is replaced by the nodes and initializers of the branch it takes,
/// followed by one `Identity` per If output (`<if name>/taken_<i>`) from the branch's output;
/// nested Ifs are resolved in later rounds. The conditions' cones (the main-graph nodes that
/// compute them) are planned once per round outcome and input shapes, the cones of one round
/// together, and each outcome's model is made once. From the second round on, a cone is cut
/// at the values earlier cones typed (fed as zeros of their type and shape) and trusted only
/// when tract folds its conditions to constants, as it does for conditions on shapes; on
/// silero-vad op15 this halves the time resolving takes (15 to 8 ms; 22 to 10 ms once
/// quantized, where each whole cone dequantized the encoder's weights again).
///
/// A name the taken branch defines that the main graph already has (sibling branches may
/// reuse names) is renamed `<name>/<if name>` in the branch, and a node name likewise.
///
/// An If stays when its condition depends on another If, Loop or Scan node, when tract cannot
/// compute it (the message is dropped: running the model then fails with tract's own error on
/// the If), when tract folds a comparison in its cone from a dim that depends on the data
/// (see [`crate::verify::tract_run::misfolded_comparisons`]; [`IfResolver::misfolded`]
/// says which), when it is not one bool, or when the If is malformed (a branch missing, or outputs
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

/// Types and shapes of main-graph values, by name, as tract typed the cones of the rounds so
/// far for one input set.
type Shapes = HashMap<String, (DatumType, Vec<usize>)>;

/// The Ifs one round decides and the runners of their conditions' cones.
struct Round {
    /// The conditions of the Ifs this round decides, in node order (one per If).
    conditions: Vec<String>,
    /// The distinct conditions, sorted.
    unique: Vec<String>,
    /// Their cones cut at the values whose type and shape earlier rounds' cones gave (the
    /// names cut at, fed as zeros): the conditions exporters write on shapes need no value
    /// upstream, and tract then types only the nodes after the cut. Its conditions are used
    /// only when tract folds every one to a constant, which then depends on no value fed.
    cut: Option<(Runner, Vec<String>)>,
    /// One runner of all the cones, whole (`None` where tract cannot load it), made when there
    /// is no cut or tract does not fold it: the cones of one round share most of their nodes,
    /// which tract then types once.
    joint: Option<Option<Runner>>,
    /// Per distinct condition, the runner of its cone alone (`None` where tract cannot load
    /// it); made when the joint runner fails, so that one condition tract cannot compute
    /// does not hold the others back.
    alone: Option<Vec<Option<Runner>>>,
    /// Why a condition was not taken from tract: it folded a comparison from a dim it does not
    /// know (see [`crate::verify::tract_run::misfolded_comparisons`]).
    misfolded: Option<String>,
}

/// Most outcomes a resolver keeps (each holds a copy of the model); past it, all but the
/// original are dropped and made again when needed.
const MAX_STEPS: usize = 64;

impl Step {
    /// The step of `model`, its cones cut at the values of `shapes` (see [`Round::cut`]).
    fn new(model: pb::ModelProto, shapes: &Shapes, dir: Option<&Path>) -> Step {
        let conditions = model
            .graph
            .as_ref()
            .map(decidable_conditions)
            .unwrap_or_default();
        let next = (!conditions.is_empty()).then(|| {
            let mut unique = conditions.clone();
            unique.sort();
            unique.dedup();
            let cut = (!shapes.is_empty())
                .then(|| cone_model(&model, &unique, Some(shapes)))
                .filter(|(_, names)| !names.is_empty())
                .and_then(|(cone, names)| {
                    let runner = Runner::new_in(&cone, false, dir).ok()?;
                    Some((runner, names.into_iter().collect()))
                });
            Round {
                conditions,
                unique,
                cut,
                joint: None,
                alone: None,
                misfolded: None,
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
    /// Adds the types and shapes of the values of the cones typed to `shapes`.
    fn outcome(
        &mut self,
        inputs: &[(String, Tensor)],
        model: &pb::ModelProto,
        dir: Option<&Path>,
        shapes: &mut Shapes,
    ) -> Vec<Option<bool>> {
        let folded = self
            .cut
            .as_mut()
            .and_then(|(r, names)| folded_conditions(r, names, inputs, model, shapes));
        let values: Vec<Option<bool>> = match folded {
            Some(values) => values.iter().map(single_bool).collect(),
            None => self.whole(inputs, model, dir, shapes),
        };
        self.conditions
            .iter()
            .map(|c| {
                let i = self.unique.binary_search(c).ok()?;
                values[i]
            })
            .collect()
    }

    /// The distinct conditions computed by their whole cones: together, or each alone when
    /// that fails.
    fn whole(
        &mut self,
        inputs: &[(String, Tensor)],
        model: &pb::ModelProto,
        dir: Option<&Path>,
        shapes: &mut Shapes,
    ) -> Vec<Option<bool>> {
        let unique = &self.unique;
        let misfolded = &mut self.misfolded;
        let joint = self
            .joint
            .get_or_insert_with(|| {
                Runner::new_in(&cone_model(model, unique, None).0, false, dir).ok()
            })
            .as_mut()
            .and_then(|r| {
                let (outs, plan) = r.run_planned(inputs).ok()?;
                if let Some(why) = misfolds(&plan, model) {
                    *misfolded = Some(why);
                    return None;
                }
                record_shapes(plan.model(), shapes);
                Some(outs)
            })
            .filter(|outs| outs.len() == unique.len());
        if let Some(outs) = joint {
            return outs.iter().map(|t| single_bool(t)).collect();
        }
        let alone = self.alone.get_or_insert_with(|| {
            unique
                .iter()
                .map(|c| {
                    Runner::new_in(
                        &cone_model(model, std::slice::from_ref(c), None).0,
                        false,
                        dir,
                    )
                    .ok()
                })
                .collect()
        });
        alone
            .iter_mut()
            .map(|r| {
                let (outs, plan) = r.as_mut()?.run_planned(inputs).ok()?;
                if let Some(why) = misfolds(&plan, model) {
                    *misfolded = Some(why);
                    return None;
                }
                single_bool(outs.first()?)
            })
            .collect()
    }
}

/// The conditions of a cut cone (`r`, cut at `names`, of the step's `model`), when tract folds
/// every one to a constant with `inputs` and a zero tensor of the type and shape `shapes`
/// gives for each cut value; adds the cone's types and shapes to `shapes`. `None` when a cut
/// value's shape is unknown for these inputs, tract fails, a condition is not a constant, or
/// tract folded a comparison from a dim it does not know.
fn folded_conditions(
    r: &mut Runner,
    names: &[String],
    inputs: &[(String, Tensor)],
    model: &pb::ModelProto,
    shapes: &mut Shapes,
) -> Option<Vec<Tensor>> {
    let mut fed: Vec<(String, Tensor)> = inputs.to_vec();
    for n in names {
        let (dt, shape) = shapes.get(n)?;
        fed.push((n.clone(), Tensor::zero_dt(*dt, shape).ok()?));
    }
    let plan = r.plan(&fed).ok()?;
    if misfolds(&plan, model).is_some() {
        return None;
    }
    let model = plan.model();
    let folded = model
        .output_outlets()
        .ok()?
        .iter()
        .map(|o| Some(model.outlet_fact(*o).ok()?.konst.as_ref()?.as_ref().clone()))
        .collect::<Option<Vec<Tensor>>>()?;
    record_shapes(model, shapes);
    Some(folded)
}

/// Why the conditions tract gives in `plan` are not the model's, when it folded a comparison
/// of `model`'s main graph from a dim it does not know (see
/// [`crate::verify::tract_run::misfolded_comparisons`]).
fn misfolds(plan: &crate::quant::calibrate::Plan, model: &pb::ModelProto) -> Option<String> {
    let g = model.graph.as_ref()?;
    crate::verify::tract_run::misfolded_comparisons(plan.model(), g)
        .into_iter()
        .next()
}

/// Adds the type and concrete shape of every labelled value of `model` (named as in the
/// ONNX graph) to `shapes`; tract's dims (`TDim`) as int64, the type ONNX gives shapes.
fn record_shapes(model: &TypedModel, shapes: &mut Shapes) {
    for node in model.nodes() {
        for (ix, out) in node.outputs.iter().enumerate() {
            let Some(label) = model.outlet_label(OutletId::new(node.id, ix)) else {
                continue;
            };
            let Some(dims) = out.fact.shape.as_concrete() else {
                continue;
            };
            let dt = match out.fact.datum_type {
                DatumType::TDim => DatumType::I64,
                dt if crate::verify::inputs::onnx_of_datum_type(dt).is_some() => dt,
                _ => continue,
            };
            shapes.insert(label.to_string(), (dt, dims.to_vec()));
        }
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
        steps.insert(
            Vec::new(),
            Step::new(model.clone(), &Shapes::new(), model_dir),
        );
        Some(IfResolver {
            dir: model_dir.map(Path::to_path_buf),
            steps,
        })
    }

    /// Why an If condition was not taken from tract, when one was not because tract folded a
    /// comparison from a dim it does not know (see
    /// [`crate::verify::tract_run::misfolded_comparisons`]).
    pub fn misfolded(&self) -> Option<&str> {
        self.steps
            .values()
            .filter_map(|s| s.next.as_ref()?.misfolded.as_deref())
            .min()
    }

    /// How many rounds computed their conditions by the whole cones (see [`Round::cut`]).
    #[cfg(test)]
    pub(crate) fn whole_cones(&self) -> usize {
        self.steps
            .values()
            .filter_map(|s| s.next.as_ref())
            .filter(|r| r.joint.is_some())
            .count()
    }

    /// [`IfResolver::resolve`], or `None` when no If could be resolved (the model is the
    /// original).
    pub fn changed(&mut self, inputs: &[(String, Tensor)]) -> Option<Resolved> {
        let (resolved, outcome) = self.resolve(inputs);
        let original = &self.steps.get(&Vec::new())?.model;
        (!Arc::ptr_eq(original, &resolved)).then_some((resolved, outcome))
    }

    /// The model resolved for `inputs` (one tensor per graph input, by name) and the outcome
    /// of every round: two input sets with the same outcome get the same model.
    pub fn resolve(&mut self, inputs: &[(String, Tensor)]) -> Resolved {
        let mut key: Vec<Option<bool>> = Vec::new();
        let mut shapes = Shapes::new();
        for _ in 0..MAX_ROUNDS {
            // This round's outcome, and what a new step would be made from.
            let (outcome, conditions, model) = {
                let Some(step) = self.steps.get_mut(&key) else {
                    break;
                };
                let Some(round) = step.next.as_mut() else {
                    break;
                };
                let outcome = round.outcome(inputs, &step.model, self.dir.as_deref(), &mut shapes);
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
                    Step::new(changed, &shapes, self.dir.as_deref())
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

/// The nodes (indexes, in graph order) that compute `target`, going up no further than the
/// names `stop` accepts (added to `cut`), or `None` when one of them holds a subgraph.
fn cone_of(
    g: &pb::GraphProto,
    produced: &HashMap<&str, usize>,
    target: &str,
    stop: &dyn Fn(&str) -> bool,
    cut: &mut BTreeSet<String>,
) -> Option<Vec<usize>> {
    let mut seen = BTreeSet::new();
    let mut stack = vec![target];
    while let Some(name) = stack.pop() {
        if stop(name) {
            cut.insert(name.to_string());
            continue;
        }
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
        if cone_of(g, &produced, cond, &|_| false, &mut BTreeSet::new()).is_some() {
            out.push(cond.clone());
        }
    }
    out
}

/// A model computing only `targets` (its graph outputs): their cones' nodes, the initializers
/// and graph inputs those read, and the rest of `model` (opsets, functions) as it is; with
/// `cut_at`, the cones are cut at the node outputs it gives a type and shape for (a target
/// itself is not cut at), which become graph inputs of that element type. Returns the model
/// and the names cut at.
fn cone_model(
    model: &pb::ModelProto,
    targets: &[String],
    cut_at: Option<&Shapes>,
) -> (pb::ModelProto, BTreeSet<String>) {
    let mut out = pb::ModelProto {
        ir_version: model.ir_version,
        opset_import: model.opset_import.clone(),
        functions: model.functions.clone(),
        ..Default::default()
    };
    let mut cut = BTreeSet::new();
    let Some(g) = model.graph.as_ref() else {
        return (out, cut);
    };
    let produced = producers(g);
    // Graph inputs are fed as they are; node outputs are cut at.
    let stop = |name: &str| {
        cut_at.is_some_and(|shapes| {
            produced.contains_key(name)
                && !targets.iter().any(|t| t == name)
                && shapes.contains_key(name)
        })
    };
    let nodes: BTreeSet<usize> = targets
        .iter()
        .filter_map(|t| cone_of(g, &produced, t, &stop, &mut cut))
        .flatten()
        .collect();
    let read: HashSet<&str> = nodes
        .iter()
        .flat_map(|&i| g.node[i].input.iter().map(String::as_str))
        .chain(targets.iter().map(String::as_str))
        .collect();
    let value = |name: &str, elem_type: Option<i32>| pb::ValueInfoProto {
        name: Some(name.to_string()),
        r#type: elem_type.map(|e| pb::TypeProto {
            value: Some(pb::type_proto::Value::TensorType(pb::type_proto::Tensor {
                elem_type: Some(e),
                shape: None,
            })),
            ..Default::default()
        }),
        ..Default::default()
    };
    let cut_inputs = cut.iter().filter_map(|name| {
        let (dt, _) = cut_at?.get(name)?;
        Some(value(name, crate::verify::inputs::onnx_of_datum_type(*dt)))
    });
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
            .chain(cut_inputs)
            .collect(),
        output: targets.iter().map(|t| value(t, None)).collect(),
        ..Default::default()
    };
    out.graph = Some(graph);
    (out, cut)
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
