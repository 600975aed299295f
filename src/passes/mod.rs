//! Passes over the IR: one file per pass, the file name is the pass name.
//!
//! A pass reads the graph first (collects its matches from `&Graph`), then applies them
//! through the edit API ([`crate::ir::edit`]). Every pass recurses into subgraphs (If/Loop/Scan
//! bodies): weights inside subgraphs are weights like any other. What a pass does not
//! understand it leaves unchanged.

pub mod constant_to_initializer;
pub mod convert_fp16;
pub mod dedupe_initializers;
pub mod eliminate_dead_nodes;
pub mod eliminate_identity;
pub mod eliminate_unused_initializers;
pub mod fold_batchnorm;
pub mod fold_transpose;
pub mod manager;
pub mod quantize_dynamic;
pub mod quantize_static;
pub mod quantize_weights;
pub mod quantize_weights_int8;
pub mod upgrade_opset;

use anyhow::{bail, Result};
use serde::Serialize;

use crate::ir::Model;

/// What a pass promises about the model's outputs.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum PassKind {
    /// Outputs are bit-identical (graph cleanup).
    Exact,
    /// Outputs equal up to float rounding (fusions: a few ulp).
    ExactUpToRounding,
    /// Outputs change within the stated tolerance (quantization).
    Lossy {
        /// The tolerance promised, in words (e.g. "cosine >= 0.999 per output").
        tolerance: &'static str,
    },
}

impl PassKind {
    /// Short label for tables.
    pub fn label(&self) -> &'static str {
        match self {
            PassKind::Exact => "exact",
            PassKind::ExactUpToRounding => "exact up to rounding",
            PassKind::Lossy { .. } => "lossy",
        }
    }
}

/// What one run of a pass did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PassStats {
    /// Number of changes (nodes removed, tensors rewritten, ...); 0 means nothing changed.
    pub changes: usize,
    /// What the pass chose not to do and why (e.g. "fp64 weight 'w' left in float").
    pub notes: Vec<String>,
    /// What it changed, one line each (e.g. "conv1.weight: int8 symmetric Channel"), for
    /// the report of lossy passes.
    pub touched: Vec<String>,
}

/// Options that passes read (set from the command line). The default is the CLI's: every
/// field empty, off or `None`, except `keep_io_types`, on (graph inputs and outputs are the
/// model's contract).
#[derive(Debug, Clone)]
pub struct PassOptions {
    /// Lossy passes only touch nodes of these op types (empty = every op type they handle).
    pub op_types: Vec<String>,
    /// Lossy passes leave nodes whose name matches this alone.
    pub exclude_nodes: Option<regex::Regex>,
    /// Lossy passes only touch nodes whose name matches this.
    pub include_nodes: Option<regex::Regex>,
    /// Lossy passes leave nodes whose first output has one of these names alone (chosen by
    /// the accuracy-gated fallback).
    pub keep_float: std::collections::BTreeSet<String>,
    /// Weight quantization scheme of `quantize_weights` (`None` = int8 symmetric per channel).
    pub weight_scheme: Option<crate::quant::Scheme>,
    /// How `quantize_weights` writes 4-bit block weights: `DequantizeLinear` (the default) or
    /// onnxruntime's `com.microsoft` `MatMulNBits` for MatMul and Gemm (`--format`).
    pub weight_format: crate::quant::WeightFormat,
    /// Weight quantization writes the dequantized float values instead of integer weights
    /// (the float-equivalent model used to check forms tract cannot run).
    pub dequantized_weights: bool,
    /// Float conversion: keep graph inputs and outputs in their original float type, with
    /// Casts at the border (`--keep-io-types`, on by default).
    pub keep_io_types: bool,
    /// Float conversion: target type, float16 (false) or bfloat16 (true).
    pub bf16: bool,
    /// Static quantization: where the calibration data comes from and how ranges are
    /// estimated (`quantize_static`).
    pub calibration: Option<crate::quant::CalibrationOptions>,
    /// Per-node weight schemes from a config file (`--config`), by node name.
    pub node_schemes: std::collections::BTreeMap<String, crate::quant::Scheme>,
    /// Dynamic quantization: also quantize Conv as ConvInteger (slow on common CPU runtimes,
    /// so off unless asked).
    pub conv_integer: bool,
    /// Static quantization: also quantize the layers onnxruntime's CPU int8 kernels run
    /// slower than float (`--all-layers`, for integer-only targets).
    pub all_layers: bool,
    /// Static quantization: int8 weights use all of `[-127, 127]` even where onnxruntime's
    /// u8 x s8 kernels on x86 CPUs without VNNI can saturate (see
    /// [`crate::quant::REDUCED_INT8_MAX`]); by default those weights use `[-64, 64]`.
    pub full_range_weights: bool,
    /// Static quantization: every layer's int8 weights in `[-64, 64]` (onnxruntime's
    /// `reduce_range`): no u8 x s8 product pair can saturate, whatever the activations.
    pub reduce_range: bool,
}

impl Default for PassOptions {
    fn default() -> Self {
        PassOptions {
            op_types: Vec::new(),
            exclude_nodes: None,
            include_nodes: None,
            keep_float: Default::default(),
            weight_scheme: None,
            weight_format: Default::default(),
            dequantized_weights: false,
            keep_io_types: true,
            bf16: false,
            calibration: None,
            node_schemes: Default::default(),
            conv_integer: false,
            all_layers: false,
            full_range_weights: false,
            reduce_range: false,
        }
    }
}

impl PassOptions {
    /// May a lossy pass change `node` of graph `g`?
    /// True when `--op-types`, `--include-nodes` or `--exclude-nodes` (or a config's "float"
    /// nodes) narrow the nodes lossy passes touch.
    pub fn selection_given(&self) -> bool {
        !self.op_types.is_empty() || self.include_nodes.is_some() || self.exclude_nodes.is_some()
    }

    /// True when some node of `model` (any graph) is selected (see [`PassOptions::selects`]).
    pub fn selects_any(&self, model: &crate::ir::Model) -> bool {
        let mut any = false;
        model.graph.visit(&mut |g| {
            any = any || g.live_nodes().any(|(_, n)| self.selects(g, n));
        });
        any
    }

    pub fn selects(&self, g: &crate::ir::Graph, node: &crate::ir::Node) -> bool {
        (self.op_types.is_empty() || self.op_types.iter().any(|o| o == node.op_type()))
            && self.selects_by_name(g, node)
    }

    /// The part of [`PassOptions::selects`] that names nodes: `--include-nodes`,
    /// `--exclude-nodes` (a config's "float" nodes among them) and the layers the fallback
    /// keeps in float, not `--op-types`.
    pub fn selects_by_name(&self, g: &crate::ir::Graph, node: &crate::ir::Node) -> bool {
        let first_output = node.outputs.first().copied().flatten();
        if first_output.is_some_and(|v| self.keep_float.contains(&g.value(v).name)) {
            return false;
        }
        let key = node_key(g, node);
        !self.exclude_nodes.as_ref().is_some_and(|r| r.is_match(key))
            && self.include_nodes.as_ref().is_none_or(|r| r.is_match(key))
    }

    /// The per-node scheme (`--config`) of `node` of `g`, if any.
    pub fn node_scheme(
        &self,
        g: &crate::ir::Graph,
        node: &crate::ir::Node,
    ) -> Option<crate::quant::Scheme> {
        self.node_schemes.get(node_key(g, node)).copied()
    }
}

/// The name selections address `node` of `g` by (`--include-nodes`, `--exclude-nodes`,
/// `--config`): its name, or the name of its first present output when it has none (exporters
/// leave some nodes unnamed; an output name is unique in a valid model).
pub fn node_key<'a>(g: &'a crate::ir::Graph, node: &'a crate::ir::Node) -> &'a str {
    if !node.name().is_empty() {
        return node.name();
    }
    node.outputs
        .iter()
        .flatten()
        .map(|v| g.value(*v).name.as_str())
        .find(|n| !n.is_empty())
        .unwrap_or("")
}

/// [`node_key`] of a protobuf node: its name, or its first present output when it has none.
pub fn proto_node_key(n: &crate::pb::NodeProto) -> &str {
    if !n.name().is_empty() {
        return n.name();
    }
    n.output
        .iter()
        .map(String::as_str)
        .find(|o| !o.is_empty())
        .unwrap_or("")
}

/// A selection the user made that must name something in the model. A misspelt op type,
/// node regex or config node name would otherwise select nothing (or, for an exclusion,
/// exclude nothing), and the run would succeed while doing something else than asked.
#[derive(Debug, Clone)]
pub enum Selector {
    /// `--op-types`: every op type must be that of some node (op types are case-sensitive).
    OpTypes(Vec<String>),
    /// `--include-nodes` / `--exclude-nodes`: the regex must match some node's name.
    NodeRegex {
        /// The flag, for the message.
        flag: String,
        /// The regex.
        re: regex::Regex,
    },
    /// A config file's node names: each must be the name of some node.
    NodeNames {
        /// Where the names come from (e.g. `--config q.json`), for the message.
        origin: String,
        /// The names.
        names: Vec<String>,
    },
}

/// A reader of weight `w` of `g` other than the node inputs in `taken` (the inputs a pass
/// rewrites), for a note: another node input (with its index), a graph output, or a subgraph
/// reading it by name (`sub_reads`, from [`crate::ir::Graph::names_read_by_subgraphs`]).
/// `uses` is `g.uses()`.
pub(super) fn other_reader(
    g: &crate::ir::Graph,
    uses: &[Vec<(crate::ir::NodeId, usize)>],
    sub_reads: &std::collections::HashSet<String>,
    w: crate::ir::ValueId,
    taken: &std::collections::HashSet<(crate::ir::NodeId, usize)>,
) -> Option<String> {
    uses[w.0 as usize]
        .iter()
        .find(|u| !taken.contains(u))
        .map(|&(n, i)| format!("{} (input {i})", g.node(n).label(n)))
        .or_else(|| g.is_graph_output(w).then(|| "a graph output".to_string()))
        .or_else(|| {
            let name = &g.value(w).name;
            sub_reads.contains(name).then(|| {
                if g.names_read_by_header().contains(name) {
                    "the model's training_info or the graph's quantization_annotation (it names it)"
                        .to_string()
                } else {
                    "a subgraph".to_string()
                }
            })
        })
}

impl Selector {
    /// The selector as given, e.g. `--op-types Conv,MatMul` or `--include-nodes ^conv`.
    pub fn describe(&self) -> String {
        match self {
            Selector::OpTypes(ops) => format!("--op-types {}", ops.join(",")),
            Selector::NodeRegex { flag, re } => format!("{flag} {}", re.as_str()),
            Selector::NodeNames { origin, .. } => format!("the nodes of {origin}"),
        }
    }
}

/// Every selector of `selectors` that names nothing in `model` (its graph and every
/// subgraph), one message each, naming the flag, what was given and what the model has.
pub fn unmatched_selectors(model: &Model, selectors: &[Selector]) -> Vec<String> {
    let mut names = std::collections::BTreeSet::new();
    let mut ops = std::collections::BTreeSet::new();
    model.graph.visit(&mut |g| {
        for (_, n) in g.live_nodes() {
            names.insert(node_key(g, n).to_string());
            ops.insert(n.op_type().to_string());
        }
    });
    let mut problems = Vec::new();
    for s in selectors {
        match s {
            Selector::OpTypes(wanted) => {
                let missing: Vec<&str> = wanted
                    .iter()
                    .filter(|o| !ops.contains(o.as_str()))
                    .map(String::as_str)
                    .collect();
                if !missing.is_empty() {
                    problems.push(format!(
                        "--op-types {}: no node has that op type (op types are case-sensitive; the model has {})",
                        missing.join(","),
                        ops.iter().map(String::as_str).collect::<Vec<_>>().join(", ")
                    ));
                }
            }
            Selector::NodeRegex { flag, re } => {
                if !names.iter().any(|n| re.is_match(n)) {
                    problems.push(format!(
                        "{flag} {}: matches none of the model's {} node names",
                        re.as_str(),
                        names.iter().filter(|n| !n.is_empty()).count()
                    ));
                }
            }
            Selector::NodeNames {
                origin,
                names: given,
            } => {
                let missing: Vec<String> = given
                    .iter()
                    .filter(|n| !names.contains(n.as_str()))
                    .map(|n| format!("\"{n}\""))
                    .collect();
                if !missing.is_empty() {
                    problems.push(format!(
                        "{origin}: no node is named {} (names are matched exactly)",
                        missing.join(", ")
                    ));
                }
            }
        }
    }
    problems
}

/// Per-node schemes (`--config`) no pass could use, one line each: the node has no weight
/// input `quantize_weights` takes (its op is not Conv, ConvTranspose, Gemm, MatMul, LSTM, GRU
/// or RNN of the default domain), or `--op-types` leaves it out. Such a scheme would be
/// dropped without a word.
pub fn unusable_node_schemes(model: &Model, opts: &PassOptions) -> Vec<String> {
    let mut problems = Vec::new();
    model.graph.visit(&mut |g| {
        for (_, n) in g.live_nodes() {
            let key = node_key(g, n);
            if !opts.node_schemes.contains_key(key) {
                continue;
            }
            let weight_op = n.domain().is_empty()
                && matches!(
                    n.op_type(),
                    "Conv" | "ConvTranspose" | "Gemm" | "MatMul" | "LSTM" | "GRU" | "RNN"
                );
            if !weight_op {
                problems.push(format!(
                    "\"{key}\" ({}) has no weight a scheme applies to (Conv, ConvTranspose, Gemm, MatMul, LSTM, GRU, RNN)",
                    n.op_type()
                ));
            } else if !opts.op_types.is_empty() && !opts.op_types.iter().any(|o| o == n.op_type()) {
                problems.push(format!(
                    "\"{key}\" ({}) is left out by --op-types {}",
                    n.op_type(),
                    opts.op_types.join(",")
                ));
            }
        }
    });
    problems
}

/// The note of a weight pass on a model whose selected weight readers read their weight from
/// a `Constant` node (the readers and weight inputs `quantize_weights` takes), which weight
/// passes do not read: `constant_to_initializer` (in the cleanup preset, and always run by
/// the quantize command) turns them into initializers first. `None` when there are none.
pub fn constant_weights_note(model: &Model, opts: &PassOptions) -> Option<String> {
    if !can_add_initializers(model) {
        // Before IR 4 constant_to_initializer cannot help, and the pass says why it left the
        // weights in float.
        return None;
    }
    let mut count = 0;
    model.graph.visit(&mut |g| {
        for (_, n) in g.live_nodes() {
            for (i, v) in n.inputs.iter().enumerate() {
                let Some(p) = v.and_then(|v| g.producer(v)).map(|p| g.node(p)) else {
                    continue;
                };
                let rank = p
                    .attr("value")
                    .and_then(|a| a.t.as_ref())
                    .map(|t| t.dims.len());
                // A subgraph output stays a Constant (see constant_to_initializer).
                let stays = v.is_some_and(|v| g.is_graph_output(v));
                if p.is("Constant")
                    && !stays
                    && rank.is_some_and(|r| {
                        quantize_weights::selected_axis(g, n, i, r, opts).is_some()
                    })
                {
                    count += 1;
                }
            }
        }
    });
    (count > 0).then(|| {
        format!(
            "{count} weight(s) come from Constant nodes, which this pass does not read: run constant_to_initializer before it (the cleanup preset does)"
        )
    })
}

/// A pass over the IR.
pub trait Pass: Sync {
    /// The pass name: its file name under `src/passes/`.
    fn name(&self) -> &'static str;
    /// One-line summary.
    fn summary(&self) -> &'static str;
    /// What it promises about the model's outputs.
    fn kind(&self) -> PassKind;
    /// Runs the pass on every graph of `model`.
    fn run(&self, model: &mut Model, opts: &PassOptions) -> Result<PassStats>;
}

/// Every pass, in the order `list-passes` shows them.
pub fn registry() -> Vec<&'static dyn Pass> {
    vec![
        &constant_to_initializer::ConstantToInitializer,
        &fold_transpose::FoldTranspose,
        &eliminate_identity::EliminateIdentity,
        &eliminate_dead_nodes::EliminateDeadNodes,
        &eliminate_unused_initializers::EliminateUnusedInitializers,
        &dedupe_initializers::DedupeInitializers,
        &fold_batchnorm::FoldBatchnorm,
        &upgrade_opset::UpgradeOpset,
        &quantize_weights_int8::QuantizeWeightsInt8,
        &quantize_weights::QuantizeWeights,
        &quantize_dynamic::QuantizeDynamic,
        &quantize_static::QuantizeStatic,
        &convert_fp16::ConvertFp16,
    ]
}

/// The pass called `name`.
pub fn by_name(name: &str) -> Option<&'static dyn Pass> {
    registry().into_iter().find(|p| p.name() == name)
}

/// Graph cleanup, all exact.
pub const CLEANUP: &[&str] = &[
    "constant_to_initializer",
    "fold_transpose",
    "eliminate_identity",
    "eliminate_dead_nodes",
    "eliminate_unused_initializers",
    "dedupe_initializers",
];

/// Expands a pipeline spec: `none`, `default`, `cleanup`, or comma-separated pass names and
/// presets. `default` = cleanup, `fold_batchnorm`, `quantize_weights_int8`, cleanup.
///
/// Errors: an unknown pass (named, with the known ones listed), or a spec naming nothing
/// (`""`, `","`).
pub fn parse_pipeline(spec: &str) -> Result<Vec<&'static dyn Pass>> {
    let mut out = Vec::new();
    if spec.split(',').all(|s| s.trim().is_empty()) {
        bail!("--passes names no pass (`none` loads and saves only)");
    }
    for item in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        match item {
            "none" => {}
            "cleanup" => out.extend(CLEANUP.iter().filter_map(|n| by_name(n))),
            "default" => {
                out.extend(CLEANUP.iter().filter_map(|n| by_name(n)));
                out.extend(by_name("fold_batchnorm"));
                out.extend(by_name("quantize_weights_int8"));
                out.extend(CLEANUP.iter().filter_map(|n| by_name(n)));
            }
            name => match by_name(name) {
                Some(p) => out.push(p),
                None => {
                    let known: Vec<&str> = registry().iter().map(|p| p.name()).collect();
                    bail!(
                        "unknown pass '{name}'; known passes: {}; presets: none, cleanup, default",
                        known.join(", ")
                    )
                }
            },
        }
    }
    Ok(out)
}

/// True when the model's format allows initializers that are not graph inputs (IR >= 4).
/// Passes that add initializers leave older models alone and say so.
pub fn can_add_initializers(model: &Model) -> bool {
    model.header.ir_version() >= 4
}

#[cfg(test)]
mod tests;
