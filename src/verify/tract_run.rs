//! Running a model in tract, exactly as written.
//!
//! The model is encoded to bytes and decoded by tract's own protobuf types (ours and tract's
//! are different generated types; bytes are the common ground). Loading ignores the stored
//! `value_info` and output shapes (most real models load only so), every input's fact is set
//! from the tensor fed, and the model is typed and planned without tract's optimizer, so the
//! run computes the graph as written, not a rewrite of it.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::sync::OnceLock;

use prost::Message;
use regex::Regex;
use serde::Serialize;
use tract_onnx::prelude::*;

use crate::pb;

/// Whether `model` holds weight forms that are valid ONNX but that tract cannot run:
/// `DequantizeLinear` of an initializer other than int8/uint8/int32 (4- and 16-bit types; the
/// int32 biases of static quantization run), or with
/// a non-zero `block_size` (opset-21 blocks), or with a scale other than float32 (float16
/// weights at opset >= 19), and `com.microsoft` `MatMulNBits`. A quantized
/// model with these is checked on its float-equivalent model (dequantized weights in place).
pub fn tract_lacks_weight_forms(model: &crate::ir::Model) -> bool {
    let mut found = false;
    model.graph.visit(&mut |g| {
        found |= g.live_nodes().any(|(_, n)| {
            if n.domain() == "com.microsoft" && n.op_type() == "MatMulNBits" {
                return true;
            }
            if !n.is("DequantizeLinear") {
                return false;
            }
            let narrow = n
                .inputs
                .first()
                .copied()
                .flatten()
                .and_then(|x| g.initializer(x))
                .is_some_and(|t| {
                    t.data_type() != pb::tensor_proto::DataType::Int8 as i32
                        && t.data_type() != pb::tensor_proto::DataType::Uint8 as i32
                        && t.data_type() != pb::tensor_proto::DataType::Int32 as i32
                });
            // A float16 (or bfloat16) scale: opset 19 lets DequantizeLinear output the
            // weights' own float16 type, which tract 0.23 types as float32 ("Impossible to
            // unify F16 with F32").
            let half_scale = n
                .inputs
                .get(1)
                .copied()
                .flatten()
                .and_then(|s| g.initializer(s))
                .is_some_and(|t| t.data_type() != pb::tensor_proto::DataType::Float as i32);
            narrow || half_scale || n.attr_int("block_size", 0) != 0
        });
    });
    found
}

/// Whether `model` computes in bfloat16 (an initializer of that type or a `Cast` to it):
/// tract cannot load such a model.
pub fn holds_bfloat16(model: &crate::ir::Model) -> bool {
    let bf16 = pb::tensor_proto::DataType::Bfloat16 as i32;
    let mut found = false;
    model.graph.visit(&mut |g| {
        found |= g.live_nodes().any(|(_, n)| {
            n.is("Cast") && n.attr_int("to", 0) == i64::from(bf16)
                || n.inputs
                    .iter()
                    .flatten()
                    .any(|&v| g.initializer(v).is_some_and(|t| t.data_type() == bf16))
        });
    });
    found
}

/// The step at which tract gave up.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RunStage {
    /// Decoding the protobuf, parsing the graph and building its nodes.
    Load,
    /// Matching the tensors fed to the model's inputs.
    Inputs,
    /// Shape and type analysis, and translation to a typed model.
    Type,
    /// Building the execution plan.
    Plan,
    /// Evaluating the plan on the inputs.
    Run,
}

impl fmt::Display for RunStage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RunStage::Load => "load",
            RunStage::Inputs => "feed the inputs of",
            RunStage::Type => "type",
            RunStage::Plan => "plan",
            RunStage::Run => "run",
        })
    }
}

/// Why tract could not run a model.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RunError {
    /// The step that failed.
    pub stage: RunStage,
    /// The node tract names in its error, as our graph names it when it can be found there
    /// (tract calls unnamed nodes after their first output, and suffixes nodes it expands).
    pub node: Option<String>,
    /// The node's ONNX op type, from our graph when the node is found there, else tract's op
    /// description.
    pub op: Option<String>,
    /// tract's full error chain, outermost context first, joined by `: `; for a panic, the
    /// panic message.
    pub message: String,
    /// Whether tract panicked (caught) rather than returned an error.
    pub panicked: bool,
}

impl fmt::Display for RunError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "tract could not {} the model", self.stage)?;
        match (&self.node, &self.op) {
            // tract's load errors name a node by its (empty) name, not by its first output.
            (Some(node), Some(op)) if node.is_empty() => write!(f, " at an unnamed {op} node")?,
            (Some(node), Some(op)) => write!(f, " at node `{node}` ({op})")?,
            (Some(node), None) => write!(f, " at node `{node}`")?,
            _ => {}
        }
        if self.panicked {
            write!(f, " (tract panicked)")?;
        }
        write!(f, ": {}", self.message)
    }
}

impl std::error::Error for RunError {}

/// Runs `model` in tract on `inputs` and returns its outputs in graph output order, each with
/// its graph output name.
///
/// `model_dir` is where external data files are looked up (the model file's directory).
/// If nodes of the main graph are first resolved for `inputs` (see
/// [`super::specialize::inline_ifs`]), so the run is the model's on exactly these inputs.
/// `inputs` are matched to the graph's real inputs by name; tensors for names the graph does
/// not have are ignored (so one input set can feed a reference and a candidate that dropped an
/// unused input). tract `TDim` outputs are returned as int64.
///
/// # Errors
/// A [`RunError`] saying at which stage tract failed, on which node and why. A panic inside
/// tract is caught and returned as a `RunError` with `panicked` set; the process's panic hook
/// still reports it on stderr.
pub fn run(
    model: &pb::ModelProto,
    model_dir: Option<&Path>,
    inputs: &[(String, Tensor)],
) -> Result<Vec<(String, Tensor)>, RunError> {
    run_resolving(model, model_dir, inputs).0
}

/// [`run`], and whether If nodes were resolved for the inputs.
pub fn run_resolving(
    model: &pb::ModelProto,
    model_dir: Option<&Path>,
    inputs: &[(String, Tensor)],
) -> (Result<Vec<(String, Tensor)>, RunError>, bool) {
    // tract refuses If nodes whose branches differ in type or shape: resolved for these inputs.
    let mut ran = run_sets(model, model_dir, &[inputs]);
    ran.pop().unwrap_or_else(|| (Err(not_run()), false))
}

/// The error of an input set that was not run.
fn not_run() -> RunError {
    RunError {
        stage: RunStage::Load,
        node: None,
        op: None,
        message: "input set not run".to_string(),
        panicked: false,
    }
}

/// A model's outputs by graph output name, or why tract could not run it.
pub type Ran = Result<Vec<(String, Tensor)>, RunError>;

/// [`run_resolving`] on several input sets, one result per set in order. One resolver serves
/// every set, so a second set whose shapes a first one had resolves without planning; sets
/// whose If nodes resolve the same way and whose tensors have the same types and shapes share
/// one load, typing and plan, and the sets run in parallel: N sets of one shape cost one plan
/// and N runs instead of N of each. Each set's outputs are those [`run_resolving`] gives.
pub fn run_sets(
    model: &pb::ModelProto,
    model_dir: Option<&Path>,
    sets: &[&[(String, Tensor)]],
) -> Vec<(Ran, bool)> {
    use rayon::prelude::*;
    // Per set, the resolved model and its outcome (`None`: nothing was resolved).
    let mut resolver = super::specialize::IfResolver::new(model, model_dir);
    let specialized: Vec<Option<super::specialize::Resolved>> = sets
        .iter()
        .map(|inputs| resolver.as_mut()?.changed(inputs))
        .collect();
    // Groups of sets that one plan serves: same outcome, same types and shapes fed.
    type Key = (
        Option<Vec<Option<bool>>>,
        Vec<(String, DatumType, Vec<usize>)>,
    );
    let mut groups: Vec<(Key, Vec<usize>)> = vec![];
    for (i, inputs) in sets.iter().enumerate() {
        let key: Key = (
            specialized[i].as_ref().map(|(_, o)| o.clone()),
            inputs
                .iter()
                .map(|(n, t)| (n.clone(), t.datum_type(), t.shape().to_vec()))
                .collect(),
        );
        match groups.iter_mut().find(|(k, _)| *k == key) {
            Some((_, members)) => members.push(i),
            None => groups.push((key, vec![i])),
        }
    }
    let mut results: Vec<Option<Ran>> = (0..sets.len()).map(|_| None).collect();
    for (_, members) in groups {
        let m = specialized[members[0]]
            .as_ref()
            .map_or(model, |(m, _)| m.as_ref());
        match guarded(m, || plan_for(m, model_dir, sets[members[0]])) {
            Err(e) => {
                for &i in &members {
                    results[i] = Some(Err(e.clone()));
                }
            }
            Ok((plan, names)) => {
                let ran: Vec<_> = members
                    .par_iter()
                    .map(|&i| guarded(m, || execute(&plan, &names, m, sets[i])))
                    .collect();
                for (&i, r) in members.iter().zip(ran) {
                    results[i] = Some(r);
                }
            }
        }
    }
    // An If left because its condition could not be trusted: the failure it causes says why.
    let misfolded = resolver.as_ref().and_then(|r| r.misfolded());
    results
        .into_iter()
        .zip(specialized)
        .map(|(r, s)| {
            let r = r.unwrap_or_else(|| Err(not_run())).map_err(|mut e| {
                if let Some(why) = misfolded {
                    e.message = format!("{}; an If condition was left: {why}", e.message);
                }
                e
            });
            (r, s.is_some())
        })
        .collect()
}

thread_local! {
    /// How many [`caught`] calls this thread is inside.
    static CAUGHT: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// `catch_unwind` for tract's panics, which the caller reports as errors: while `f` runs, the
/// panic hook prints nothing on this thread (the default hook printed the panic and, with
/// `RUST_BACKTRACE` set, some 90 lines of backtrace before the error said the same). Panics
/// elsewhere still print as before.
pub(crate) fn caught<T>(f: impl FnOnce() -> T) -> std::thread::Result<T> {
    static HOOK: OnceLock<()> = OnceLock::new();
    HOOK.get_or_init(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if CAUGHT.with(|c| c.get()) == 0 {
                previous(info);
            }
        }));
    });
    CAUGHT.with(|c| c.set(c.get() + 1));
    let result = catch_unwind(AssertUnwindSafe(f));
    CAUGHT.with(|c| c.set(c.get() - 1));
    result
}

/// Runs `f`, one step of running `model` in tract, turning its failure, or a panic inside
/// tract (with the stage and node it happened at), into a [`RunError`].
fn guarded<T>(
    model: &pb::ModelProto,
    f: impl FnOnce() -> Result<T, Failure>,
) -> Result<T, RunError> {
    let result = caught(f);
    let failed = match result {
        Ok(Ok(outputs)) => return Ok(outputs),
        Ok(Err(failed)) => failed,
        Err(payload) => {
            let message = if let Some(s) = payload.downcast_ref::<&str>() {
                (*s).to_string()
            } else if let Some(s) = payload.downcast_ref::<String>() {
                s.clone()
            } else {
                "tract panicked with a non-text payload".to_string()
            };
            let stage = PANIC_STAGE.with(|s| s.get());
            let message = match CURRENT_NODE.with(|c| c.borrow_mut().take()) {
                Some(node) if stage == RunStage::Run => format!("Evaluating {node}: {message}"),
                _ => message,
            };
            Failure {
                stage,
                message,
                panicked: true,
            }
        }
    };
    Err(failed.into_run_error(model))
}

thread_local! {
    /// The stage the current thread's run is in, read when tract panics.
    static PANIC_STAGE: std::cell::Cell<RunStage> = const { std::cell::Cell::new(RunStage::Load) };
    /// The node being evaluated (`#id "name" op`), read when tract panics.
    static CURRENT_NODE: std::cell::RefCell<Option<String>> = const { std::cell::RefCell::new(None) };
}

struct Failure {
    stage: RunStage,
    message: String,
    panicked: bool,
}

impl Failure {
    fn at(stage: RunStage) -> impl Fn(anyhow::Error) -> Failure {
        move |e| Failure {
            stage,
            message: chain(&e),
            panicked: false,
        }
    }

    fn into_run_error(self, model: &pb::ModelProto) -> RunError {
        let (node, op) = match locate_node(&self.message) {
            Some((tract_name, tract_op)) => match find_in_graph(model, &tract_name) {
                Some((name, op_type)) => (Some(name), Some(op_type)),
                None => (Some(tract_name), tract_op),
            },
            None => (None, None),
        };
        RunError {
            stage: self.stage,
            node,
            op,
            message: self.message,
            panicked: self.panicked,
        }
    }
}

/// The whole anyhow chain, outermost first.
fn chain(e: &anyhow::Error) -> String {
    e.chain()
        .map(|c| c.to_string())
        .collect::<Vec<_>>()
        .join(": ")
}

/// `model` read by tract (external data from `model_dir`), ignoring its stored value_info and
/// output shapes, as every tract run here reads a model.
///
/// Errors: tract cannot decode or load it (tract's message), the folder is not UTF-8, or the
/// graph reads values nothing defines.
pub(crate) fn load(
    model: &pb::ModelProto,
    model_dir: Option<&Path>,
) -> anyhow::Result<InferenceModel> {
    // tract does not read local functions: their calls are inlined into its copy.
    let inlined;
    let model = if super::inline::calls_local_functions(model) {
        let mut copy = model.clone();
        let (_, left) = super::inline::inline_local_functions(&mut copy);
        // A call left as it is cannot run in tract, which does not read functions.
        anyhow::ensure!(left.is_empty(), "{}", left.join("; "));
        inlined = copy;
        &inlined
    } else {
        model
    };
    let bytes = model.encode_to_vec();
    let onnx = tract_onnx::onnx()
        .with_ignore_value_info(true)
        .with_ignore_output_shapes(true);
    let mut proto = onnx.proto_model_for_read(&mut bytes.as_slice())?;
    if let Some(g) = proto.graph.as_mut() {
        // Seeds from the node names as the model has them (before any renaming here).
        seed_random_ops(g);
        split_float16_gemm_bias(g);
        unique_node_names(g, &HashSet::new());
        densify_sparse_initializers(g);
        drop_empty_optionals(g);
    }
    let dir = match model_dir {
        Some(d) => Some(d.to_str().ok_or_else(|| {
            anyhow::anyhow!("model directory {} is not valid UTF-8", d.display())
        })?),
        None => None,
    };
    let parsed = onnx.parse(&proto, dir)?;
    anyhow::ensure!(
        parsed.unresolved_inputs.is_empty(),
        "values used but never defined: {:?}",
        parsed.unresolved_inputs
    );
    Ok(parsed.model)
}

/// Default-domain ops that draw random numbers, seeded by their `seed` attribute.
const RANDOM_OPS: &[&str] = &[
    "RandomNormal",
    "RandomUniform",
    "RandomNormalLike",
    "RandomUniformLike",
    "Multinomial",
    "Bernoulli",
];

/// Gives each random op of tract's copy of a graph and its subgraphs that has no `seed` one
/// made from its node name (which the passes keep; its output may be renamed, e.g. by
/// `eliminate_identity`), or from its op type when it has no name, so that the reference and
/// the candidate draw the same numbers: unseeded, they drew different ones, and a model
/// compared with itself failed (cosine 0.76). Unnamed random ops of one type and shape draw
/// the same numbers in tract's copies.
fn seed_random_ops(g: &mut tract_onnx::pb::GraphProto) {
    for n in &mut g.node {
        let random = crate::ir::normal_domain(&n.domain).is_empty()
            && RANDOM_OPS.contains(&n.op_type.as_str());
        if !random || n.attribute.iter().any(|a| a.name == "seed") {
            continue;
        }
        // FNV-1a of the name, to 24 bits: exact as a float32.
        let name = if n.name.is_empty() {
            &n.op_type
        } else {
            &n.name
        };
        let hash = name.bytes().fold(0x811c_9dc5_u32, |h, b| {
            (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
        });
        n.attribute.push(tract_onnx::pb::AttributeProto {
            name: "seed".to_string(),
            r#type: tract_onnx::pb::attribute_proto::AttributeType::Float as i32,
            f: (hash & 0x00ff_ffff) as f32,
            ..Default::default()
        });
    }
    subgraphs_mut(g).for_each(seed_random_ops);
}

/// Default-domain ops whose trailing outputs are optional, so that a `""` one is the same as
/// leaving it out. Others count theirs: a Split without split sizes makes as many parts as it
/// has outputs, `""` ones included.
const OPTIONAL_TRAILING_OUTPUTS: &[&str] = &[
    "MaxPool",
    "Dropout",
    "BatchNormalization",
    "LayerNormalization",
    "LSTM",
    "GRU",
    "RNN",
    "Unique",
];

/// Drops, in tract's copy of a graph and its subgraphs, what the ONNX spec makes equivalent to
/// leaving it out and tract reads otherwise:
/// - the empty names (`""`, an optional input or output left out) at the end of default-domain
///   nodes' inputs and of the outputs of [`OPTIONAL_TRAILING_OUTPUTS`] ops: tract counts them
///   and fails on some (a Conv whose bias is `""` panicked, "index out of bounds"; a MaxPool or
///   Dropout whose second output is `""` gave "Wrong number of outputs");
/// - an empty `axes` attribute of a `Reduce*` node (every axis, as an absent one): tract
///   reduced no axis, so an opset-12 ReduceSum with `axes = []` and its opset-13 form gave
///   different shapes.
fn drop_empty_optionals(g: &mut tract_onnx::pb::GraphProto) {
    for n in &mut g.node {
        let default_domain = crate::ir::normal_domain(&n.domain).is_empty();
        while default_domain && n.input.last().is_some_and(String::is_empty) {
            n.input.pop();
        }
        let optional = default_domain && OPTIONAL_TRAILING_OUTPUTS.contains(&n.op_type.as_str());
        while optional && n.output.len() > 1 && n.output.last().is_some_and(String::is_empty) {
            n.output.pop();
        }
        if default_domain && n.op_type.starts_with("Reduce") {
            n.attribute.retain(|a| {
                a.name != "axes"
                    || a.r#type() != tract_onnx::pb::attribute_proto::AttributeType::Ints
                    || !a.ints.is_empty()
            });
        }
    }
    subgraphs_mut(g).for_each(drop_empty_optionals);
}

/// The subgraphs (If branches, Loop and Scan bodies) the nodes of `g` hold, one level down.
fn subgraphs_mut(
    g: &mut tract_onnx::pb::GraphProto,
) -> impl Iterator<Item = &mut tract_onnx::pb::GraphProto> {
    g.node
        .iter_mut()
        .flat_map(|n| n.attribute.iter_mut())
        .flat_map(|a| a.g.iter_mut().chain(a.graphs.iter_mut()))
}

/// Replaces, in tract's copy of a graph and its subgraphs, each sparse initializer (which
/// tract does not read: "values used but never defined") by the dense initializer it stands
/// for: zeros, with the values at their indices (ONNX `SparseTensorProto`: indices of shape
/// `[NNZ]`, linear, or `[NNZ, rank]`, coordinates; the loader checked them). Fixed-size element
/// types whose values are in `raw_data` or their typed field (`int32_data` for the narrow
/// types); any other stays sparse (and tract fails on it).
fn densify_sparse_initializers(g: &mut tract_onnx::pb::GraphProto) {
    for s in std::mem::take(&mut g.sparse_initializer) {
        match densify(&s) {
            Some(t) => g.initializer.push(t),
            None => g.sparse_initializer.push(s),
        }
    }
    subgraphs_mut(g).for_each(densify_sparse_initializers);
}

/// The dense form of `s` (see [`densify_sparse_initializers`]), or `None`.
fn densify(s: &tract_onnx::pb::SparseTensorProto) -> Option<tract_onnx::pb::TensorProto> {
    let values = s.values.as_ref()?;
    let indices = s.indices.as_ref()?;
    // Bytes per element: whole-byte types only (sub-byte ones are packed).
    let size = match crate::ir::tensor::elem_info(values.data_type).bits {
        Some(b) if b >= 8 && b % 8 == 0 => b as usize / 8,
        _ => return None,
    };
    // The values as little-endian bytes.
    let raw: Vec<u8> = if !values.raw_data.is_empty() {
        values.raw_data.clone()
    } else {
        match values.data_type {
            1 => values
                .float_data
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect(),
            6 => values
                .int32_data
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect(),
            // Narrower types are stored one per int32 (float16 and bfloat16 as their bits):
            // the low bytes.
            2 | 3 | 4 | 5 | 9 | 10 | 16 => values
                .int32_data
                .iter()
                .flat_map(|v| v.to_le_bytes().into_iter().take(size))
                .collect(),
            7 => values
                .int64_data
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect(),
            11 => values
                .double_data
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect(),
            _ => return None,
        }
    };
    let idx: Vec<i64> = if !indices.raw_data.is_empty() {
        indices
            .raw_data
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
            .collect()
    } else {
        indices.int64_data.clone()
    };
    let dims: Vec<usize> = s
        .dims
        .iter()
        .map(|&d| usize::try_from(d).ok())
        .collect::<Option<_>>()?;
    let total: usize = dims.iter().try_fold(1usize, |a, &d| a.checked_mul(d))?;
    let nnz = raw.len() / size;
    if raw.len() != nnz * size || total.checked_mul(size)? > 1 << 31 {
        return None;
    }
    // Linear positions: [NNZ] as given, or [NNZ, rank] coordinates in row-major order.
    let linear: Vec<usize> = if idx.len() == nnz {
        idx.iter()
            .map(|&i| usize::try_from(i).ok())
            .collect::<Option<_>>()?
    } else if !dims.is_empty() && idx.len() == nnz * dims.len() {
        idx.chunks_exact(dims.len())
            .map(|c| {
                c.iter().zip(&dims).try_fold(0usize, |acc, (&i, &d)| {
                    let i = usize::try_from(i).ok().filter(|&i| i < d)?;
                    acc.checked_mul(d)?.checked_add(i)
                })
            })
            .collect::<Option<_>>()?
    } else {
        return None;
    };
    let mut dense = vec![0u8; total * size];
    for (k, &at) in linear.iter().enumerate() {
        if at >= total {
            return None;
        }
        dense[at * size..(at + 1) * size].copy_from_slice(&raw[k * size..(k + 1) * size]);
    }
    Some(tract_onnx::pb::TensorProto {
        name: values.name.clone(),
        dims: s.dims.clone(),
        data_type: values.data_type,
        raw_data: dense,
        ..Default::default()
    })
}

/// Renames, in tract's copy of a graph and its subgraphs, each node whose name in tract
/// would repeat another name of its graph: tract names a graph input's node, an initializer's
/// and a node (by its name, else its first output) in one namespace and refuses a repeat
/// ("Duplicate node name"), where ONNX keeps node names apart from value names (a node named
/// like the graph input it reads, an unnamed node whose output is another node's name). A
/// renamed node becomes `NAME.K`, the first such name that is free. A subgraph's names also
/// avoid the outer values it reads (`outer`), which tract makes inputs of the subgraph.
fn unique_node_names(g: &mut tract_onnx::pb::GraphProto, outer: &HashSet<String>) {
    let tract_name = |n: &tract_onnx::pb::NodeProto| -> Option<String> {
        if !n.name.is_empty() {
            Some(n.name.clone())
        } else {
            n.output.first().filter(|o| !o.is_empty()).cloned()
        }
    };
    let mut taken: HashSet<String> = g
        .input
        .iter()
        .map(|i| i.name.clone())
        .chain(g.initializer.iter().map(|t| t.name.clone()))
        .collect();
    let produced: HashSet<&str> = g
        .node
        .iter()
        .flat_map(|n| n.output.iter().map(String::as_str))
        .collect();
    // Outer values this graph reads.
    taken.extend(
        g.node
            .iter()
            .flat_map(|n| n.input.iter())
            .filter(|i| outer.contains(*i) && !produced.contains(i.as_str()))
            .cloned(),
    );
    let mut later: HashMap<String, usize> = HashMap::new();
    for n in &g.node {
        if let Some(t) = tract_name(n) {
            *later.entry(t).or_default() += 1;
        }
    }
    for k in 0..g.node.len() {
        let Some(name) = tract_name(&g.node[k]) else {
            continue;
        };
        if let Some(c) = later.get_mut(&name) {
            *c -= 1;
        }
        if taken.contains(&name) {
            let free = (1..)
                .map(|i| format!("{name}.{i}"))
                .find(|c| !taken.contains(c) && later.get(c).is_none_or(|&n| n == 0))
                .unwrap_or_default();
            g.node[k].name = free.clone();
            taken.insert(free);
        } else {
            taken.insert(name);
        }
    }
    // Subgraphs see this graph's values (and what it sees) as outer values.
    let mut visible: HashSet<String> = outer.clone();
    visible.extend(g.input.iter().map(|i| i.name.clone()));
    visible.extend(g.initializer.iter().map(|t| t.name.clone()));
    visible.extend(g.node.iter().flat_map(|n| n.output.iter().cloned()));
    for sub in subgraphs_mut(g) {
        unique_node_names(sub, &visible);
    }
}

/// Rewrites, in tract's copy of a graph and its subgraphs, each float16 `Gemm` (its A, B or C
/// a float16 initializer or the output of a `Cast` to float16) with `alpha != 1` or a bias C
/// into `Gemm(A, B)` (same `transA`/`transB`), then `Mul` by a float16 `alpha`, then
/// `Add(_, C)` or `Add(_, Mul(C, beta))` with a float16 `beta` (ONNX Gemm-13:
/// `Y = alpha * A' * B' + beta * C`). tract 0.23 wires Gemm's `alpha` and `beta` as float32
/// constants, so such a float16 Gemm yields float32 and fails to type ("expected F16 got
/// F32"), although the model is valid and onnxruntime runs it. The new nodes compute what
/// tract's own wiring computes (the same einsum, then the same products in float16); the last
/// one keeps the Gemm's name and output.
fn split_float16_gemm_bias(g: &mut tract_onnx::pb::GraphProto) {
    use tract_onnx::pb;
    const F16: i32 = 10;
    let mut f16: HashSet<String> = g
        .initializer
        .iter()
        .filter(|t| t.data_type == F16)
        .map(|t| t.name.clone())
        .collect();
    for n in &g.node {
        let to = n.attribute.iter().find(|a| a.name == "to").map(|a| a.i);
        if n.op_type == "Cast" && n.domain.is_empty() && to == Some(i64::from(F16)) {
            f16.extend(n.output.iter().cloned());
        }
    }
    let float = |n: &pb::NodeProto, name: &str| {
        n.attribute
            .iter()
            .find(|a| a.name == name)
            .map_or(1.0, |a| a.f)
    };
    let scalar = |name: String, v: f32| pb::TensorProto {
        name,
        data_type: F16,
        raw_data: half::f16::from_f32(v).to_le_bytes().to_vec(),
        ..Default::default()
    };
    let mut out = Vec::with_capacity(g.node.len());
    let mut constants = Vec::new();
    for mut n in std::mem::take(&mut g.node) {
        for a in &mut n.attribute {
            if let Some(sub) = a.g.as_mut() {
                split_float16_gemm_bias(sub);
            }
            for sub in &mut a.graphs {
                split_float16_gemm_bias(sub);
            }
        }
        let (alpha, beta) = (float(&n, "alpha"), float(&n, "beta"));
        let has_c = n.input.len() == 3 && !n.input[2].is_empty();
        let splits = n.op_type == "Gemm"
            && n.domain.is_empty()
            && n.output.len() == 1
            && n.input.iter().any(|i| f16.contains(i))
            && (alpha != 1.0 || has_c);
        if !splits {
            out.push(n);
            continue;
        }
        let c = if n.input.len() == 3 {
            n.input.pop().filter(|c| !c.is_empty())
        } else {
            None
        };
        let y = std::mem::take(&mut n.output[0]);
        let name = std::mem::take(&mut n.name);
        n.attribute
            .retain(|a| a.name != "alpha" && a.name != "beta");
        let mut wire = format!("{y}/tract_ab");
        n.output[0] = wire.clone();
        n.name = format!("{name}/tract_ab");
        let mut steps = vec![n];
        let mut mul = |x: String, k: f32, tag: &str, steps: &mut Vec<pb::NodeProto>| {
            let k_name = format!("{y}/tract_{tag}");
            constants.push(scalar(k_name.clone(), k));
            let o = format!("{y}/tract_{tag}_product");
            steps.push(pb::NodeProto {
                input: vec![x, k_name],
                output: vec![o.clone()],
                name: format!("{name}/tract_{tag}"),
                op_type: "Mul".into(),
                ..Default::default()
            });
            o
        };
        if alpha != 1.0 {
            wire = mul(wire, alpha, "alpha", &mut steps);
        }
        if let Some(c) = c.filter(|_| beta != 0.0) {
            let c = if beta == 1.0 {
                c
            } else {
                mul(c, beta, "beta", &mut steps)
            };
            steps.push(pb::NodeProto {
                input: vec![wire, c],
                output: vec![format!("{y}/tract_sum")],
                name: format!("{name}/tract_sum"),
                op_type: "Add".into(),
                ..Default::default()
            });
        }
        // The last step takes the Gemm's name and output.
        if let Some(last) = steps.last_mut() {
            last.output[0] = y;
            last.name = name;
        }
        out.extend(steps);
    }
    g.node = out;
    g.initializer.extend(constants);
}

fn set_stage(stage: RunStage) {
    PANIC_STAGE.with(|s| s.set(stage));
}

/// A plan built for one set of input types and shapes, and its graph input names in order.
type Planned = (Arc<TypedRunnableModel>, Vec<String>);

/// Loads `model`, sets every input's fact from the tensor of `inputs` of its name, types it
/// and builds the plan (no tract optimizer).
fn plan_for(
    model: &pb::ModelProto,
    model_dir: Option<&Path>,
    inputs: &[(String, Tensor)],
) -> Result<Planned, Failure> {
    set_stage(RunStage::Load);
    let mut inference_model = load(model, model_dir).map_err(Failure::at(RunStage::Load))?;

    set_stage(RunStage::Inputs);
    let outlets = inference_model
        .input_outlets()
        .map_err(Failure::at(RunStage::Inputs))?
        .to_vec();
    let mut names = Vec::with_capacity(outlets.len());
    for (ix, outlet) in outlets.iter().enumerate() {
        let name = inference_model.node(outlet.node).name.clone();
        let tensor = fed_tensor(inputs, &name)?;
        inference_model
            .set_input_fact(ix, InferenceFact::dt_shape_from_tensor(tensor))
            .map_err(|e| {
                Failure::at(RunStage::Inputs)(
                    e.context(format!("setting the fact of input `{name}`")),
                )
            })?;
        names.push(name);
    }

    set_stage(RunStage::Type);
    let typed = inference_model
        .into_typed()
        .map_err(Failure::at(RunStage::Type))?;
    if let Some(g) = model.graph.as_ref() {
        let misfolded = misfolded_comparisons(&typed, g);
        if !misfolded.is_empty() {
            return Err(Failure {
                stage: RunStage::Type,
                message: misfolded.join("; "),
                panicked: false,
            });
        }
    }
    set_stage(RunStage::Plan);
    let plan = typed.into_runnable().map_err(Failure::at(RunStage::Plan))?;
    Ok((plan, names))
}

/// How [`misfolded_comparisons`] messages begin after the node: the mark of a run tract
/// cannot vouch for, whoever's model it is.
pub(crate) const MISFOLDED: &str = "tract cannot compute this comparison";

/// ONNX comparison ops (opset 1 to 23).
const COMPARISONS: [&str; 5] = ["Equal", "Greater", "Less", "GreaterOrEqual", "LessOrEqual"];

/// Why tract cannot be trusted with the comparison nodes of `g` (the main graph) that it
/// folded to a constant in `typed` (`g` typed with concrete input shapes) although an operand
/// is a dim it knows only as a symbol, one that depends on the data (the shape of a NonZero
/// output, or of a TopK output whose k is computed): tract 0.23 compares the symbol with the
/// other operand as an expression, so `Equal(Shape(TopK(x, k))[0], 2)` is false even where k
/// is 2 at run time, and the model then computes another value than onnxruntime does (an If on
/// it takes the other branch). One message per such node, naming it, its op and the operand.
pub fn misfolded_comparisons(typed: &TypedModel, g: &pb::GraphProto) -> Vec<String> {
    let by_label: std::collections::HashMap<&str, OutletId> = typed
        .outlet_labels
        .iter()
        .map(|(o, l)| (l.as_str(), *o))
        .collect();
    g.node
        .iter()
        .enumerate()
        .filter(|(_, n)| n.domain().is_empty() && COMPARISONS.contains(&n.op_type()))
        .filter_map(|(i, n)| {
            let operand = n.input.iter().find_map(|name| {
                let fact = typed.outlet_fact(*by_label.get(name.as_str())?).ok()?;
                let k = fact.konst.as_ref()?;
                let plain = k.try_as_plain_ram().ok()?;
                let dims = plain.as_slice::<TDim>().ok()?;
                dims.iter()
                    .any(|d| d.to_i64().is_err())
                    .then(|| format!("`{name}` = {dims:?}"))
            })?;
            let label = crate::passes::proto_node_key(n);
            Some(format!(
                "#{i} \"{label}\" {}: {MISFOLDED}: its operand {operand} is a dim that depends on the data (the shape of a NonZero output, or of a TopK output with a computed k), which tract 0.23 compares as a symbol when it plans the model, so the value it gives (and any If on it) can differ from the model's",
                n.op_type()
            ))
        })
        .collect()
}

/// The tensor of `inputs` fed to the graph input `name`.
fn fed_tensor<'a>(inputs: &'a [(String, Tensor)], name: &str) -> Result<&'a Tensor, Failure> {
    inputs
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, t)| t)
        .ok_or_else(|| Failure {
            stage: RunStage::Inputs,
            message: format!(
                "no tensor fed for graph input `{name}`; fed: {:?}",
                inputs.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>()
            ),
            panicked: false,
        })
}

/// Runs `plan` (graph inputs `names`) of `model` on `inputs` and returns the outputs by graph
/// output name.
fn execute(
    plan: &Arc<TypedRunnableModel>,
    names: &[String],
    model: &pb::ModelProto,
    inputs: &[(String, Tensor)],
) -> Result<Vec<(String, Tensor)>, Failure> {
    set_stage(RunStage::Inputs);
    let fed: TVec<TValue> = names
        .iter()
        .map(|n| fed_tensor(inputs, n).map(|t| t.clone().into_tvalue()))
        .collect::<Result<_, _>>()?;
    set_stage(RunStage::Run);
    let mut state = plan.spawn().map_err(Failure::at(RunStage::Run))?;
    let outputs = state
        .run_plan_with_eval(fed, |ctx, op_state, node, node_inputs| {
            // Remembered so that a panic inside the op can still name the node.
            CURRENT_NODE.with(|c| {
                *c.borrow_mut() = Some(format!("#{} \"{}\" {}", node.id, node.name, node.op))
            });
            let result = tract_onnx::tract_core::plan::eval(ctx, op_state, node, node_inputs);
            CURRENT_NODE.with(|c| *c.borrow_mut() = None);
            result
        })
        .map_err(Failure::at(RunStage::Run))?;

    let graph_outputs: Vec<&str> = model
        .graph
        .as_ref()
        .map(|g| g.output.iter().map(|o| o.name()).collect())
        .unwrap_or_default();
    if graph_outputs.len() != outputs.len() {
        return Err(Failure {
            stage: RunStage::Run,
            message: format!(
                "tract returned {} outputs, the graph declares {}",
                outputs.len(),
                graph_outputs.len()
            ),
            panicked: false,
        });
    }
    graph_outputs
        .iter()
        .zip(outputs)
        .map(|(name, value)| {
            let tensor = value.into_tensor();
            let tensor = if tensor.datum_type() == DatumType::TDim {
                tensor
                    .cast_to::<i64>()
                    .map_err(|e| {
                        Failure::at(RunStage::Run)(e.context(format!("output `{name}` as int64")))
                    })?
                    .into_owned()
            } else {
                tensor
            };
            Ok((name.to_string(), tensor))
        })
        .collect()
}

/// Finds the node tract's message is about: `#12 "name" Op` (analysis, translation,
/// evaluation) or `Building node name (Op)` (loading). The first, outermost, mention wins.
fn locate_node(message: &str) -> Option<(String, Option<String>)> {
    static NODE_REF: OnceLock<Option<Regex>> = OnceLock::new();
    static BUILDING: OnceLock<Option<Regex>> = OnceLock::new();
    let node_ref =
        NODE_REF.get_or_init(|| Regex::new(r#"#\d+ "([^"]*)" ([A-Za-z_][A-Za-z0-9_:.]*)"#).ok());
    let building = BUILDING.get_or_init(|| Regex::new(r"Building node (\S*) \(([^)]*)\)").ok());
    let first = |re: &Option<Regex>| {
        re.as_ref()?.captures(message).map(|c| {
            let start = c.get(0).map(|m| m.start()).unwrap_or(usize::MAX);
            let name = c.get(1).map(|m| m.as_str().to_string()).unwrap_or_default();
            let op = c.get(2).map(|m| m.as_str().to_string());
            (start, name, op)
        })
    };
    let mut found: Vec<(usize, String, Option<String>)> = [first(node_ref), first(building)]
        .into_iter()
        .flatten()
        .collect();
    found.sort_by_key(|(start, _, _)| *start);
    found.into_iter().next().map(|(_, name, op)| (name, op))
}

/// Looks `tract_name` up in our graph (and subgraphs): tract names a node by its name, or by
/// its first output when it has none, and suffixes nodes it derives (`name.0`, `name.expanded`).
/// Returns our node's display name and op type.
fn find_in_graph(model: &pb::ModelProto, tract_name: &str) -> Option<(String, String)> {
    let graph = model.graph.as_ref()?;
    let mut candidate = tract_name;
    loop {
        if let Some(found) = find_node(graph, candidate) {
            return Some(found);
        }
        candidate = &candidate[..candidate.rfind('.')?];
    }
}

fn find_node(graph: &pb::GraphProto, name: &str) -> Option<(String, String)> {
    for node in &graph.node {
        let tract_name = if !node.name().is_empty() {
            node.name()
        } else {
            node.output.first().map(String::as_str).unwrap_or("")
        };
        if tract_name == name && !name.is_empty() {
            return Some((tract_name.to_string(), node.op_type().to_string()));
        }
    }
    for node in &graph.node {
        for attr in &node.attribute {
            for g in attr.g.iter().chain(attr.graphs.iter()) {
                if let Some(found) = find_node(g, name) {
                    return Some(found);
                }
            }
        }
    }
    None
}
