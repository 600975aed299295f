//! `quantize_weights`: weight-only quantization of Conv, ConvTranspose, Gemm, MatMul and
//! LSTM/GRU/RNN weights under a [`Scheme`]: int8 / uint8 / int16 / uint16 / int4 / uint4,
//! symmetric or asymmetric, per tensor, per output channel or block-wise along the reduction
//! axis, float or power-of-two scales. `quantize_weights_int8` is its int8 symmetric
//! per-channel preset, the one the default pipeline uses.
//!
//! Before: a float weight initializer `W` read by Conv (input 1), ConvTranspose (input 1), Gemm
//! (input 1), MatMul (input 1) or LSTM/GRU/RNN (inputs 1 = W and 2 = R). After: an integer
//! initializer `W_quantized`, its scale (and zero point when not 0) and a node that turns them
//! back into floats, so the readers are unchanged:
//! - `DequantizeLinear` when the model's opset has the form needed: per tensor from opset 10,
//!   per axis from 13 (DequantizeLinear-13), int16/uint16/int4/uint4 and `block_size` from 21
//!   (DequantizeLinear-21);
//! - otherwise, for 8- and 16-bit types, a form valid at the model's own opset that keeps
//!   per-channel accuracy: `DequantizeLinear(W_quantized, 1.0, zero_point)` then `Mul` by the
//!   scales shaped to broadcast along the axis (int8/uint8, opset 10..12), or `Cast(to=FLOAT)`,
//!   `Sub` zero point, `Mul` scales (older opsets and 16-bit types). The model's opset is never
//!   raised; 4-bit types and blocks below opset 21 are refused with an error (with the
//!   `MatMulNBits` format, the weights it cannot write are left in float with a note instead).
//! - with `WeightFormat::Cast` (`--format cast`), always the `Cast(to=FLOAT)`, `Sub` zero
//!   point, `Mul` scales form, at any opset (8- and 16-bit types, per tensor or per channel;
//!   4-bit types and blocks are refused). Its inputs are all constants, so runtimes fold it
//!   into a float weight at load time (onnxruntime's constant folding skips DequantizeLinear
//!   but folds these): a smaller file that runs at float speed.
//!
//! float16 weights: scales are computed in float32; at opset >= 19 the scale is stored as
//! float16 (DequantizeLinear-19 returns the scale's type) when every scale is a normal float16;
//! below that opset, when a scale is not (a tiny weight range), and in the cast form at any
//! opset, a float32 scale and a `Cast(to=FLOAT16)` follow. float64 and bfloat16 weights are left in float with a note.
//!
//! The output channel axis per op: Conv 0 (`[M, C/g, k..]`), ConvTranspose 1
//! (`[C, M/g, k..]`; with groups, channels of different groups at the same position share a
//! scale), Gemm 0 when `transB=1` (`[N, K]`) else 1 (`[K, N]`), MatMul the last axis
//! (`[.., K, N]`), LSTM/GRU/RNN 1 (`[dirs, gates*H, in]`; directions share a scale). Blocks run
//! along the reduction axis: Conv 1, ConvTranspose 0, Gemm/MatMul K, LSTM/GRU/RNN 2; a K that
//! is not a multiple of the block size gets a shorter last block (no padding, nothing read past
//! the end). Formulas: [`crate::quant::quantize`] (QuantizeLinear-21 rounding and saturation).
//!
//! A weight is stored once: read by several quantizable nodes, it is quantized once (with the
//! first reader's `--config` scheme, noted when readers ask for different ones), and readers
//! of another kind (another op, another axis, a graph output, subgraphs reading it by name)
//! read the dequantized value in its place, with a note. A weight one of whose readers must
//! stay float (a weight op the selection leaves out or the fallback keeps in float, or any
//! reader `--include-nodes`/`--exclude-nodes` leave out by name) stays in float for every
//! reader, with a note: a float copy beside the quantized one would make the file larger. The
//! dequantized value takes the weight's name unless another graph of the model also defines
//! that name (then a fresh one, so that node output names stay unique). Weights inside
//! If/Loop/Scan bodies are quantized, and bodies that read an outer weight by name are served
//! too. With `PassOptions::dequantized_weights` the pass writes the
//! dequantized float values in place instead (the float-equivalent model used to check
//! quantized forms that tract cannot run). Not done: initializers that are graph inputs (a
//! caller may override them), weights already in an integer type, weights holding NaN or
//! infinity, and models with IR < 4 (new initializers would have to become graph inputs).
//!
//! **`MatMulNBits` format** (`PassOptions::weight_format = WeightFormat::MatMulNBits`, with an
//! int4 or uint4 block scheme whose block size is a power of two >= 16): before the regular
//! path, every MatMul (`A [.., K] @ W [K, N]`) and every Gemm with `transA = 0`, `alpha = 1`,
//! `beta = 1` and C absent or a 1-D `[N]` initializer of the weight's type, reading a 2-D
//! float32 or float16 initializer `W`, becomes onnxruntime's `com.microsoft` `MatMulNBits`
//! (version 1; contract in onnxruntime `docs/ContribOperators.md`, layouts in
//! [`crate::quant::nbits`]): `MatMulNBits(A, B, scales[, zero_points][, -, bias])` with
//! attributes `K`, `N`, `bits = 4`, `block_size` (no `accuracy_level`: onnxruntime's default,
//! float compute). B is uint8 `[N, k_blocks, block_size / 2]` (Gemm `transB = 1` weights are
//! already `[N, K]`), scales `[N, k_blocks]` in the weight's type, zero points uint8
//! `[N, ceil(k_blocks / 2)]` for asymmetric schemes only (symmetric = onnxruntime's default
//! zero point 8), Gemm's C the bias (input 5). K that is not a multiple of the block size is
//! padded with the zero point in the last block. The new node keeps the old node's output
//! name, so readers and graph outputs are unchanged; the `com.microsoft` opset import
//! (version 1) is added when one is written and the default opset is never changed. Weights
//! with a reader it cannot take (other ops, Gemm with `transA`, `alpha`/`beta` != 1 or another
//! C, weights that are not 2-D) are not packed at all, since the float weight would stay
//! beside the packed copy: they take the regular `DequantizeLinear` path when the opset allows
//! it and stay float otherwise; each one gets a note. Subgraphs that read an outer weight get
//! their `MatMulNBits` reading the packed initializers of the enclosing graph by name. With
//! `dequantized_weights`, the same readers read the dequantized weight
//! (`(q - zero_point) * scale`, scales rounded to float16 for float16 weights) and stay MatMul
//! or Gemm: tract cannot run `MatMulNBits`, so this float-equivalent model is the one checked.
//! Not done: MatMul + Add folded into the bias (only Gemm's C is used), 2- and 8-bit
//! `MatMulNBits`.

use std::collections::HashSet;

use anyhow::{bail, ensure, Context as _, Result};

use super::{can_add_initializers, Pass, PassKind, PassOptions, PassStats};
use crate::ir::edit::attr_int;
use crate::ir::{Graph, Model, Names, Node, NodeId, Tensor, ValueDef, ValueId};
use crate::pb::tensor_proto::DataType;
use crate::quant::{quantize, scale_dims, Granularity, QType, Scheme, WeightFormat};

/// See the module documentation.
pub struct QuantizeWeights;

/// The reduction axis that blocks run along, for a weight whose output-channel axis is `axis`.
pub fn block_axis(node: &Node, rank: usize, axis: usize) -> usize {
    match node.op_type() {
        "Conv" => 1,
        "ConvTranspose" => 0,
        "LSTM" | "GRU" | "RNN" => 2,
        _ if rank >= 2 && axis == rank - 1 => rank - 2,
        _ => rank - 1 - axis.min(rank - 1),
    }
}

/// Lowest default-domain opset whose DequantizeLinear expresses `scheme` directly.
pub fn dq_opset(scheme: &Scheme) -> i64 {
    let wide = !matches!(scheme.qtype, QType::Int8 | QType::Uint8);
    match scheme.granularity {
        _ if wide => 21,
        Granularity::Block(_) => 21,
        Granularity::Channel => 13,
        Granularity::Tensor => 10,
    }
}

/// The output channel axis of weight input `idx` of `node` for a weight of rank `rank`, or
/// `None` when that input is not a weight this pass quantizes.
pub fn weight_axis(node: &Node, idx: usize, rank: usize) -> Option<usize> {
    weight_axis_any(node, idx, rank)
}

/// The quantization axis of input `idx` (of rank `rank`) of `node` when it is a weight this
/// pass takes and the options select the node, else `None`.
pub(super) fn selected_axis(
    g: &Graph,
    node: &Node,
    idx: usize,
    rank: usize,
    opts: &PassOptions,
) -> Option<usize> {
    match reader_use(g, node, idx, rank, opts) {
        Use::Weight(axis) => Some(axis),
        Use::Excluded | Use::Other => None,
    }
}

/// What one reader (input `idx` of `node`, or a graph output) makes of a weight of rank `rank`.
#[derive(Clone, Copy, PartialEq, Debug)]
enum Use {
    /// A weight input of a selected node, quantized along this axis.
    Weight(usize),
    /// A weight input of a node the selection leaves out (`--op-types`, `--exclude-nodes`,
    /// `--include-nodes`, a config's "float", the fallback's float layers): it keeps the float
    /// weight.
    Excluded,
    /// Any other reader (another op, another input, a graph output).
    Other,
}

fn reader_use(g: &Graph, node: &Node, idx: usize, rank: usize, opts: &PassOptions) -> Use {
    match weight_axis_any(node, idx, rank) {
        Some(a) if opts.selects(g, node) => Use::Weight(a),
        Some(_) => Use::Excluded,
        // Another op reads the dequantized value unless the user's node names leave it out
        // (`--op-types` names the weight ops to quantize, not the other readers).
        None if !opts.selects_by_name(g, node) => Use::Excluded,
        None => Use::Other,
    }
}

/// One reader of a weight: how it uses it, its label for notes and its `--config` scheme.
struct Reader {
    /// The reader in the weight's own graph; `None` in a subgraph or for a graph output.
    local: Option<(NodeId, usize)>,
    use_: Use,
    label: String,
    scheme: Option<Scheme>,
}

impl Reader {
    fn of(g: &Graph, n: NodeId, i: usize, rank: usize, opts: &PassOptions, local: bool) -> Reader {
        let node = g.node(n);
        Reader {
            local: local.then_some((n, i)),
            use_: reader_use(g, node, i, rank, opts),
            label: node.label(n),
            scheme: opts.node_scheme(g, node),
        }
    }
    fn output() -> Reader {
        Reader {
            local: None,
            use_: Use::Other,
            label: "a graph output".into(),
            scheme: None,
        }
    }
}

/// The ops whose weights the pass quantizes.
const WEIGHT_OPS: &[&str] = &[
    "MatMul",
    "Gemm",
    "Conv",
    "ConvTranspose",
    "LSTM",
    "GRU",
    "RNN",
];

fn weight_axis_any(node: &Node, idx: usize, rank: usize) -> Option<usize> {
    if !node.domain().is_empty() {
        return None;
    }
    match (node.op_type(), idx) {
        ("Conv", 1) if rank >= 3 => Some(0),
        ("ConvTranspose", 1) if rank >= 3 => Some(1),
        ("Gemm", 1) if rank == 2 => Some(if node.attr_int("transB", 0) != 0 {
            0
        } else {
            1
        }),
        ("MatMul", 1) if rank >= 2 => Some(rank - 1),
        ("LSTM" | "GRU" | "RNN", 1 | 2) if rank == 3 => Some(1),
        _ => None,
    }
}

/// How the readers of one weight split.
struct Plan {
    weight: ValueId,
    axis: usize,
    /// Readers in this graph: each reads the dequantized value.
    local: Vec<(NodeId, usize)>,
    /// True when a subgraph reads it.
    in_subgraphs: bool,
    /// The reduction axis blocks run along.
    block_axis: usize,
    /// The scheme for this weight (the pass's, or a per-node override).
    scheme: Scheme,
}

impl Pass for QuantizeWeights {
    fn name(&self) -> &'static str {
        "quantize_weights"
    }
    fn summary(&self) -> &'static str {
        "weights of Conv, ConvTranspose, Gemm, MatMul, LSTM/GRU/RNN to int8/uint8/int16/uint16/int4/uint4, per tensor, channel or block (quantize options)"
    }
    fn kind(&self) -> PassKind {
        PassKind::Lossy {
            tolerance: "cosine >= 0.999 per output on typical models",
        }
    }
    fn run(&self, model: &mut Model, opts: &PassOptions) -> Result<PassStats> {
        let scheme = opts.weight_scheme.unwrap_or(Scheme::INT8_CHANNEL);
        let mut stats = run_scheme(model, opts, &scheme)?;
        stats
            .notes
            .extend(super::constant_weights_note(model, opts));
        Ok(stats)
    }
}

/// Bytes of the float initializers of every graph of `model`.
fn float_initializer_bytes(model: &Model) -> usize {
    let mut bytes = 0;
    model.graph.visit(&mut |g| {
        for w in g.initializers() {
            if let Some(t) = g
                .initializer(w)
                .filter(|t| crate::ir::tensor::is_float(t.data_type()))
            {
                bytes += t.byte_size();
            }
        }
    });
    bytes
}

/// Runs the pass with `scheme` (see the module documentation).
///
/// Errors: the scheme needs DequantizeLinear-21 (4-bit types, blocks) and the model's opset is
/// lower.
pub fn run_scheme(model: &mut Model, opts: &PassOptions, scheme: &Scheme) -> Result<PassStats> {
    let before = float_initializer_bytes(model);
    let mut stats = quantize_with(model, opts, scheme)?;
    // The float weights replaced in place (the pass manager notes those left unread).
    let after = float_initializer_bytes(model);
    if before > after {
        stats.notes.push(format!(
            "float initializers went from {} to {} bytes: the weights replaced by their quantized form were removed (scales added)",
            before, after
        ));
    }
    Ok(stats)
}

/// [`run_scheme`] but its note on the bytes freed.
fn quantize_with(model: &mut Model, opts: &PassOptions, scheme: &Scheme) -> Result<PassStats> {
    {
        scheme.check()?;
        for (node, s) in &opts.node_schemes {
            s.check()
                .with_context(|| format!("the scheme given for node \"{node}\""))?;
        }
        let mut stats = PassStats::default();
        if !can_add_initializers(model) {
            stats.notes.push(format!(
                "IR version {} requires initializers to be graph inputs: weights left in float",
                model.header.ir_version()
            ));
            return Ok(stats);
        }
        let opset = model.opset("").unwrap_or(1);
        let four_bit = matches!(scheme.qtype, QType::Int4 | QType::Uint4);
        let blocks = matches!(scheme.granularity, Granularity::Block(_));
        let nbits = opts.weight_format == WeightFormat::MatMulNBits;
        if (four_bit || blocks) && opts.weight_format == WeightFormat::Cast {
            bail!(
                "the cast weight format writes 8- and 16-bit weights per tensor or per channel: \
                 use --dtype int8/uint8/int16/uint16 without blocks, or --format qdq"
            );
        }
        if opts.weight_format == WeightFormat::Cast {
            // The same for the schemes given per node (--config), before the opset's say.
            let cast_cannot: Vec<String> = opts
                .node_schemes
                .iter()
                .filter(|(_, s)| {
                    matches!(s.qtype, QType::Int4 | QType::Uint4)
                        || matches!(s.granularity, Granularity::Block(_))
                })
                .map(|(node, s)| {
                    format!(
                        "node \"{node}\": {}{}",
                        s.qtype.name(),
                        if matches!(s.granularity, Granularity::Block(_)) {
                            " in blocks"
                        } else {
                            ""
                        }
                    )
                })
                .collect();
            ensure!(
                cast_cannot.is_empty(),
                "the cast weight format writes 8- and 16-bit weights per tensor or per channel, which {} node scheme(s) of --config are not: give them int8/uint8/int16/uint16 without blocks, or use --format qdq:\n  {}",
                cast_cannot.len(),
                cast_cannot.join("\n  ")
            );
        }
        if (four_bit || blocks) && opset < 21 && !opts.dequantized_weights && !nbits {
            bail!(
                "{}{} weights need DequantizeLinear-21 (opset 21) but the model is opset {opset}; \
                 onnxopt does not raise a model's opset: use --dtype int8/uint8/int16/uint16 without blocks, \
                 or --format matmulnbits (4-bit blocks for MatMul/Gemm weights, any opset)",
                scheme.qtype.name(),
                if blocks { " block-wise" } else { "" }
            );
        }
        let mut wrote_nbits = false;
        let mut refused = Vec::new();
        let shared_names = names_defined_twice(model);
        let fused_by_onnxruntime = std::cell::Cell::new(0);
        model.for_each_graph_mut(&mut |g, names| {
            let cx = Context {
                opset,
                opts,
                scheme,
                shared_names: &shared_names,
                fused_by_onnxruntime: &fused_by_onnxruntime,
            };
            wrote_nbits |= quantize_graph(g, names, &cx, &mut stats, &mut refused);
        });
        if fused_by_onnxruntime.get() > 0 {
            stats.notes.push(format!(
                "{} MatMul/Gemm weight(s) are 4- or 8-bit DequantizeLinear: onnxruntime (1.32) fuses each pair into com.microsoft MatMulNBits, which at its default accuracy level 4 also quantizes the activations to int8, so it computes with more error than this check in tract shows; the session option session.qdq_matmulnbits_accuracy_level=1 runs it as checked, and --format cast gives float weights at load time",
                fused_by_onnxruntime.get()
            ));
        }
        if !refused.is_empty() {
            bail!(
                "{} weight(s) have a per-node scheme (--config) that needs DequantizeLinear-21 (opset 21), but the model is opset {opset}; onnxopt does not raise a model's opset: give those nodes int8/uint8/int16/uint16 without blocks, or --format matmulnbits for 4-bit MatMul/Gemm weights:\n  {}",
                refused.len(),
                refused.join("\n  ")
            );
        }
        if wrote_nbits && model.opset(NBITS_DOMAIN).is_none() {
            model.set_opset(NBITS_DOMAIN, 1);
        }
        Ok(stats)
    }
}

/// Names that more than one graph of `model` (the main graph and its subgraphs) defines as an
/// initializer, a node output or a graph input: a subgraph may define its own value of an
/// outer value's name.
fn names_defined_twice(model: &Model) -> HashSet<String> {
    let mut seen = HashSet::new();
    let mut twice = HashSet::new();
    model.graph.visit(&mut |g| {
        for v in &g.values {
            if !matches!(v.def, ValueDef::Outer | ValueDef::Undefined)
                && !seen.insert(v.name.clone())
            {
                twice.insert(v.name.clone());
            }
        }
    });
    twice
}

/// What every graph's run shares: the model's opset, the options and scheme of the pass, and
/// [`names_defined_twice`].
struct Context<'a> {
    opset: i64,
    opts: &'a PassOptions,
    scheme: &'a Scheme,
    shared_names: &'a HashSet<String>,
    /// Weights written as a 4- or 8-bit `DequantizeLinear` that a MatMul (or a Gemm without
    /// `transB`) reads as its B input: onnxruntime fuses the pair into `MatMulNBits`.
    fused_by_onnxruntime: &'a std::cell::Cell<usize>,
}

/// Default-domain ops whose output holds their first input's values unchanged, in another
/// shape or order.
const SAME_VALUES: &[&str] = &[
    "Identity",
    "Reshape",
    "Flatten",
    "Squeeze",
    "Unsqueeze",
    "Transpose",
];

/// Whether the values of `w` (a value of `g`, whose uses are `uses`) reach a graph output of
/// `g` unchanged: it is one, or [`SAME_VALUES`] ops lead it to one, or a subgraph returns it
/// (itself or through such ops; onnxruntime wants an Identity there) as an output of the node
/// holding it that leads to one.
/// `holders` are the nodes of `g` that hold subgraphs ([`subgraph_holders`]).
fn reaches_an_output(
    g: &Graph,
    uses: &[Vec<(NodeId, usize)>],
    holders: &[NodeId],
    w: ValueId,
) -> bool {
    !outputs_reached(g, uses, holders, w).is_empty()
}

/// The nodes of `g` that hold subgraphs.
fn subgraph_holders(g: &Graph) -> Vec<NodeId> {
    g.live_nodes()
        .filter(|(_, n)| !n.subgraphs.is_empty())
        .map(|(id, _)| id)
        .collect()
}

/// The positions among `g`'s graph outputs that the values of `v` reach unchanged (see
/// [`reaches_an_output`]).
fn outputs_reached(
    g: &Graph,
    uses: &[Vec<(NodeId, usize)>],
    holders: &[NodeId],
    v: ValueId,
) -> std::collections::BTreeSet<usize> {
    let mut reached = std::collections::BTreeSet::new();
    let mut seen = HashSet::new();
    let mut stack = vec![v];
    while let Some(v) = stack.pop() {
        if !seen.insert(v) {
            continue;
        }
        reached.extend(
            g.outputs
                .iter()
                .enumerate()
                .filter(|(_, o)| o.value == v)
                .map(|(p, _)| p),
        );
        for &(n, i) in &uses[v.0 as usize] {
            let node = g.node(n);
            if i == 0 && node.domain().is_empty() && SAME_VALUES.contains(&node.op_type()) {
                stack.extend(node.outputs.first().copied().flatten());
            }
        }
        // Returned by a subgraph: on to the holding node's output it becomes.
        let name = &g.value(v).name;
        for n in holders.iter().map(|&id| g.node(id)) {
            for sg in n.subgraphs() {
                let Some(sv) = sg
                    .find(name)
                    .filter(|&sv| sg.value(sv).def == ValueDef::Outer)
                else {
                    continue;
                };
                for p in outputs_reached(sg, &sg.uses(), &subgraph_holders(sg), sv) {
                    // Loop's body returns its condition first; If and Scan map one to one;
                    // another op's outputs are all taken to carry it.
                    let k: Vec<usize> = match (n.domain().is_empty(), n.op_type()) {
                        (true, "Loop") => p.checked_sub(1).into_iter().collect(),
                        (true, "If" | "Scan") => vec![p],
                        _ => (0..n.outputs.len()).collect(),
                    };
                    stack.extend(
                        k.into_iter()
                            .filter_map(|k| n.outputs.get(k).copied().flatten()),
                    );
                }
            }
        }
    }
    reached
}

/// Quantizes the weights `g` owns; `refused` collects the weights whose per-node scheme the
/// model's opset cannot express. Returns true when it wrote a `MatMulNBits`.
fn quantize_graph(
    g: &mut Graph,
    names: &mut Names,
    cx: &Context,
    stats: &mut PassStats,
    refused: &mut Vec<String>,
) -> bool {
    let (opset, opts, scheme) = (cx.opset, cx.opts, cx.scheme);
    let mut done = std::collections::HashSet::new();
    let nbits = opts.weight_format == WeightFormat::MatMulNBits;
    let wrote = nbits && nbits_graph(g, names, opts, scheme, stats, &mut done);
    let uses = g.uses();
    let sub_nodes = subgraph_holders(g);
    let by_header = g.names_read_by_header();
    let mut plans = Vec::new();
    for w in g.initializers() {
        if done.contains(&w) {
            continue;
        }
        let Some(t) = g.initializer(w) else { continue };
        let dt = t.data_type();
        if !(dt == DataType::Float as i32
            || dt == DataType::Float16 as i32
            || dt == DataType::Double as i32
            || dt == DataType::Bfloat16 as i32)
        {
            continue;
        }
        let rank = t.dims().len();
        let name = g.value(w).name.clone();
        // Classify every reader, in this graph, in subgraphs and as a graph output.
        let mut readers: Vec<Reader> = uses[w.0 as usize]
            .iter()
            .map(|&(n, i)| Reader::of(g, n, i, rank, opts, true))
            .collect();
        let local_count = readers.len();
        for &id in &sub_nodes {
            for sg in g.node(id).subgraphs() {
                sub_uses(sg, &name, rank, opts, &mut readers);
            }
        }
        let in_subgraphs = readers.len() > local_count;
        // The axis most readers want (ties: the first reader's).
        let mut best: Option<(usize, usize)> = None;
        for r in &readers {
            let Use::Weight(a) = r.use_ else { continue };
            let count = readers.iter().filter(|x| x.use_ == r.use_).count();
            if best.is_none_or(|(_, c)| count > c) {
                best = Some((a, count));
            }
        }
        let Some((axis, _)) = best else {
            // Read by a weight op, but not where or in the shape this pass takes a weight:
            // say which node and input, rather than "changed nothing".
            let odd: Vec<String> = readers
                .iter()
                .filter(|r| r.use_ == Use::Other)
                .filter_map(|r| {
                    let (n, i) = r.local?;
                    let node = g.node(n);
                    // Inputs 0 and 1 (and an RNN's recurrence weight): not biases or states.
                    let slots = if node.is("LSTM") || node.is("GRU") || node.is("RNN") {
                        2
                    } else {
                        1
                    };
                    (node.domain().is_empty() && WEIGHT_OPS.contains(&node.op_type()) && i <= slots)
                        .then(|| format!("{} input {i}", r.label))
                })
                .collect();
            if !odd.is_empty() {
                stats.notes.push(format!(
                    "weight '{name}' (rank {rank}) is read by {}, not as a weight this pass quantizes (input 1 of MatMul and Gemm, 2-D or more for MatMul; the weight input of Conv, ConvTranspose, LSTM, GRU, RNN): left in float",
                    odd.join(", ")
                ));
            }
            continue;
        };
        if dt == DataType::Double as i32 || dt == DataType::Bfloat16 as i32 {
            stats.notes.push(format!(
                "weight '{name}' is {}: left in float",
                t.dtype_name()
            ));
            continue;
        }
        if g.is_graph_input(w) {
            stats.notes.push(format!(
                "weight '{name}' is also a graph input (callers may override it): left in float"
            ));
            continue;
        }
        if by_header.contains(&name) {
            stats.notes.push(format!(
                "weight '{name}' is named by the model's training_info or the graph's quantization_annotation: left in float"
            ));
            continue;
        }
        // Its values are part of the interface, like an input's: they stay exact.
        if reaches_an_output(g, &uses, &sub_nodes, w) {
            stats.notes.push(format!(
                "weight '{name}' reaches a graph output unchanged (itself, through Identity, Reshape-like or Transpose nodes, or returned by a subgraph; its values are part of the interface): left in float"
            ));
            continue;
        }
        // A reader left in float would keep the float weight beside the quantized one: the
        // file would grow and the other readers lose precision for nothing.
        let left_out: Vec<&str> = readers
            .iter()
            .filter(|r| r.use_ == Use::Excluded)
            .map(|r| r.label.as_str())
            .collect();
        if !left_out.is_empty() {
            stats.notes.push(format!(
                "weight '{name}' left in float: {} keep(s) it in float (left out by the selection, or kept by the fallback), and quantizing it for its other readers would store it twice",
                left_out.join(", ")
            ));
            continue;
        }
        let others: Vec<&str> = readers
            .iter()
            .filter(|r| r.use_ != Use::Weight(axis))
            .map(|r| r.label.as_str())
            .collect();
        if !others.is_empty() {
            stats.notes.push(format!(
                "weight '{name}' is also read by {} (another op or axis): they read its dequantized value, so it is stored once",
                others.join(", ")
            ));
        }
        // One copy serves every reader: readers asking for different schemes get the first
        // one's along the stored axis; the note names every weight reader's (those of another
        // op or axis read the same copy).
        let chosen = readers
            .iter()
            .filter(|r| r.use_ == Use::Weight(axis))
            .find_map(|r| r.scheme)
            .unwrap_or(*scheme);
        let mut asked: Vec<(&str, Option<Scheme>)> = readers
            .iter()
            .filter(|r| matches!(r.use_, Use::Weight(_)))
            .map(|r| (r.label.as_str(), r.scheme))
            .collect();
        asked.dedup_by(|a, b| a.1 == b.1);
        if asked.iter().any(|(_, s)| s.unwrap_or(*scheme) != chosen) {
            let describe = |s: &Scheme| format!("{} {:?}", s.qtype.name(), s.granularity);
            stats.notes.push(format!(
                "weight '{name}' is read by nodes given different schemes ({}): it is stored once, {}",
                asked
                    .iter()
                    .map(|(l, s)| match s {
                        Some(s) => format!("{l}: {}", describe(s)),
                        None => format!("{l}: the default {}", describe(scheme)),
                    })
                    .collect::<Vec<_>>()
                    .join(", "),
                describe(&chosen)
            ));
        }
        let block_axis = readers
            .iter()
            .filter(|r| r.use_ == Use::Weight(axis))
            .find_map(|r| r.local)
            .map(|(n, _)| block_axis(g.node(n), rank, axis))
            .unwrap_or(if axis + 1 == rank {
                rank.saturating_sub(2)
            } else {
                rank - 1
            });
        let mut node_scheme = chosen;
        // Blocks along an axis shorter than the block (a depthwise Conv's C/group = 1) would
        // give one scale per `numel / extent` values, up to one per value, and make the file
        // larger: such a weight is quantized per channel instead.
        if let Granularity::Block(bs) = node_scheme.granularity {
            let dims = t.dims();
            let extent = dims.get(block_axis).copied().unwrap_or(0);
            let channels = dims.get(axis).copied().unwrap_or(0);
            let numel: i64 = dims.iter().product();
            // One block per (channel, spatial position): more scales than per channel.
            if extent < bs as i64 && extent * channels > 0 && numel / (extent * channels) > 1 {
                stats.notes.push(format!(
                    "weight '{name}' {:?}: its reduction axis {block_axis} has {extent} value(s), fewer than the block size {bs}: per channel (axis {axis}) instead of one scale per {extent} value(s)",
                    t.dims()
                ));
                node_scheme.granularity = Granularity::Channel;
            }
        }
        plans.push(Plan {
            scheme: node_scheme,
            block_axis,
            weight: w,
            axis,
            local: readers.iter().filter_map(|r| r.local).collect(),
            in_subgraphs,
        });
    }
    for plan in plans {
        let needs21 = matches!(plan.scheme.qtype, QType::Int4 | QType::Uint4)
            || matches!(plan.scheme.granularity, Granularity::Block(_));
        let name = g.value(plan.weight).name.clone();
        // With MatMulNBits the real run writes what it can and notes the rest, so the
        // float-equivalent model must leave the same weights in float.
        if needs21 && opset < 21 && !opts.dequantized_weights && !nbits {
            refused.push(format!(
                "weight '{name}': {} {:?}",
                plan.scheme.qtype.name(),
                plan.scheme.granularity
            ));
            continue;
        }
        if needs21 && opset < 21 && nbits {
            stats.notes.push(format!(
                "weight '{name}': {} {:?} needs opset 21, the model is opset {opset}: left in float",
                plan.scheme.qtype.name(),
                plan.scheme.granularity
            ));
            continue;
        }
        if apply(g, names, cx, &plan, stats) {
            stats.changes += 1;
            stats
                .touched
                .push(format!("{name}: {}", scheme_label(&plan.scheme)));
        }
    }
    wrote
}

/// A scheme as the report's `touched` lines give it: type, symmetry, `pow2` for power-of-two
/// scales, granularity (e.g. `int8 symmetric pow2 Channel`, `int4 asymmetric Block(32)`).
fn scheme_label(s: &Scheme) -> String {
    format!(
        "{} {}{}{:?}",
        s.qtype.name(),
        if s.symmetric {
            "symmetric "
        } else {
            "asymmetric "
        },
        if s.pow2 { "pow2 " } else { "" },
        s.granularity
    )
}

/// Readers of outer value `name` inside subgraph `sg` and deeper, unless shadowed.
fn sub_uses(sg: &Graph, name: &str, rank: usize, opts: &PassOptions, out: &mut Vec<Reader>) {
    if let Some(v) = sg.find(name) {
        if sg.value(v).def != ValueDef::Outer {
            return; // shadowed by a local definition
        }
        for (n, i) in &sg.uses()[v.0 as usize] {
            out.push(Reader::of(sg, *n, *i, rank, opts, false));
        }
        if sg.is_graph_output(v) {
            out.push(Reader::output());
        }
    }
    for (_, n) in sg.live_nodes() {
        for inner in n.subgraphs() {
            sub_uses(inner, name, rank, opts, out);
        }
    }
}

fn scalar_f32(v: f32) -> Tensor {
    Tensor::from_f32(&[], &[v])
}

/// Rewrites one weight; returns false (with a note) when it is left alone.
fn apply(
    g: &mut Graph,
    names: &mut Names,
    cx: &Context,
    plan: &Plan,
    stats: &mut PassStats,
) -> bool {
    let (opset, opts, scheme, shared_names) = (cx.opset, cx.opts, &plan.scheme, cx.shared_names);
    let w = plan.weight;
    let name = g.value(w).name.clone();
    let Some(t) = g.initializer(w) else {
        return false;
    };
    let dt = t.data_type();
    let dims: Vec<usize> = t.dims().iter().map(|&d| d.max(0) as usize).collect();
    let values = match t.to_f32() {
        Ok(v) => v,
        Err(e) => {
            stats
                .notes
                .push(format!("weight '{name}': {e:#}; left in float"));
            return false;
        }
    };
    if values.is_empty() {
        return false;
    }
    if let Some(why) = crate::quant::unquantizable(&values) {
        stats
            .notes
            .push(format!("weight '{name}' {why}: left in float"));
        return false;
    }
    let Some(mut qz) = quantize(&values, &dims, plan.axis, plan.block_axis, scheme) else {
        return false; // `unquantizable` above has noted what `quantize` refuses
    };
    // The float copy is not read again: freed before the integer payload is packed.
    drop(values);
    let dims_i64: Vec<i64> = dims.iter().map(|&d| d as i64).collect();
    let is_f16 = dt == DataType::Float16 as i32;
    let cast_form = opts.weight_format == WeightFormat::Cast;
    // float16 weights at opset >= 19 keep float16 scales (DequantizeLinear-19 then returns
    // float16) when every scale is a normal float16: a tiny weight range gives scales below
    // 6.1e-5, which float16 rounds to a subnormal or to 0 (a column of zeros). Those keep
    // float32 scales and a Cast to float16, as below opset 19. The float16 scales are the
    // values written, so the float-equivalent model is made from them too.
    let half_scales = is_f16
        && opset >= 19
        && opset >= dq_opset(scheme)
        && !cast_form
        && qz
            .scales
            .iter()
            .all(|&s| half::f16::from_f32(s).is_normal());
    if half_scales {
        for s in &mut qz.scales {
            *s = half::f16::from_f32(*s).to_f32();
        }
    }
    if opts.dequantized_weights {
        let d = qz.dequantize(&dims, plan.axis, scheme.granularity, plan.block_axis);
        let t = if is_f16 {
            let raw = d
                .iter()
                .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
                .collect();
            Tensor::from_raw(dt, &dims_i64, raw)
        } else {
            Tensor::from_f32(&dims_i64, &d)
        };
        g.set_initializer(w, t);
        return true;
    }
    let qtype = scheme.qtype;
    let qt = Tensor::from_raw(qtype.onnx_type(), &dims_i64, qtype.pack(&qz.q))
        .described_as(g.initializer(w));
    let q = g.add_initializer(names, &format!("{name}_quantized"), qt);
    let has_zp = qz.zero_points.iter().any(|&z| z != 0);
    // First reader in the node order (a reader of this graph, or a node holding a subgraph
    // that reads the weight): the new nodes go just before it.
    let before = g.order.iter().copied().find(|&id| {
        plan.local.iter().any(|(n, _)| *n == id)
            || (plan.in_subgraphs && !g.node(id).subgraphs.is_empty())
    });
    // The dequantized value replaces the float weight for every reader. It takes the weight's
    // name (readers, subgraphs reading it by name and graph outputs served unchanged) unless
    // another graph of the model defines that name too (a subgraph's own initializer of the
    // same name): two node outputs of one name break the model's single static assignment.
    // Then it gets a fresh name, which this graph's readers and the subgraphs reading the
    // weight are pointed at; a graph output keeps its name in any case.
    let take_name = !shared_names.contains(&name) || g.is_graph_output(w);
    let out_base = if take_name {
        format!("{name}\u{1}tmp")
    } else {
        format!("{name}_dequantized")
    };
    // float16 weights end in a Cast to float16 (except DequantizeLinear-19 with a float16
    // scale): then the Cast's output is the final value and the float32 one before it gets a
    // name of its own.
    let needs_cast = is_f16 && !half_scales;
    let (float_name, final_name) = if needs_cast {
        (format!("{name}_dequantized_float32"), out_base.clone())
    } else {
        (out_base.clone(), out_base.clone())
    };
    let base = format!("{name}_DequantizeLinear");
    let sd: Vec<i64> = scale_dims(&dims, plan.axis, scheme.granularity, plan.block_axis)
        .iter()
        .map(|&d| d as i64)
        .collect();
    let zp_tensor =
        |zdims: &[i64]| Tensor::from_raw(qtype.onnx_type(), zdims, qtype.pack(&qz.zero_points));
    let mut last: ValueId;
    if opset >= dq_opset(scheme) && !cast_form {
        let fusable = plan.local.iter().any(|&(n, i)| {
            let n = g.node(n);
            i == 1
                && n.domain().is_empty()
                && (n.is("MatMul") || (n.is("Gemm") && n.attr_int("transB", 0) == 0))
        });
        if fusable && dims.len() == 2 && !matches!(qtype, QType::Int16 | QType::Uint16) {
            cx.fused_by_onnxruntime
                .set(cx.fused_by_onnxruntime.get() + 1);
        }
        let scale_t = if half_scales {
            let raw: Vec<u8> = qz
                .scales
                .iter()
                .flat_map(|s| half::f16::from_f32(*s).to_le_bytes())
                .collect();
            Tensor::from_raw(DataType::Float16 as i32, &sd, raw)
        } else {
            Tensor::from_f32(&sd, &qz.scales)
        };
        let s = g.add_initializer(names, &format!("{name}_scale"), scale_t);
        let mut inputs = vec![Some(q), Some(s)];
        if has_zp {
            let z = g.add_initializer(names, &format!("{name}_zero_point"), zp_tensor(&sd));
            inputs.push(Some(z));
        }
        let attrs = match scheme.granularity {
            Granularity::Tensor => vec![],
            Granularity::Channel => vec![attr_int("axis", plan.axis as i64)],
            Granularity::Block(bs) => vec![
                attr_int("axis", plan.block_axis as i64),
                attr_int("block_size", bs as i64),
            ],
        };
        let (_, outs) = g.add_node(
            names,
            "DequantizeLinear",
            "",
            &base,
            attrs,
            inputs,
            &[&float_name],
            before,
        );
        last = outs[0];
        if needs_cast {
            last = cast(
                g,
                names,
                last,
                DataType::Float16,
                &name,
                &final_name,
                before,
            );
        }
    } else {
        // Broadcastable scale and zero point shapes: [] per tensor, C along the axis.
        let mut bdims = vec![1i64; dims.len()];
        if scheme.granularity == Granularity::Channel {
            bdims[plan.axis] = dims[plan.axis] as i64;
        } else {
            bdims.clear();
        }
        let eight_bit = matches!(qtype, QType::Int8 | QType::Uint8);
        let (_, outs) = if opset >= 10 && eight_bit && !cast_form {
            let one = g.add_initializer(names, &format!("{name}_unit_scale"), scalar_f32(1.0));
            let mut inputs = vec![Some(q), Some(one)];
            if qtype == QType::Uint8 {
                // DequantizeLinear-10 takes one zero point: fold per-channel ones into a Sub.
                let z = g.add_initializer(
                    names,
                    &format!("{name}_zero_point"),
                    Tensor::from_raw(qtype.onnx_type(), &[], vec![0]),
                );
                inputs.push(Some(z));
            }
            g.add_node(
                names,
                "DequantizeLinear",
                "",
                &base,
                vec![],
                inputs,
                &[&format!("{name}_int_as_float")],
                before,
            )
        } else {
            g.add_node(
                names,
                "Cast",
                "",
                &format!("{name}_Cast"),
                vec![attr_int("to", DataType::Float as i32 as i64)],
                vec![Some(q)],
                &[&format!("{name}_int_as_float")],
                before,
            )
        };
        let mut x = outs[0];
        if has_zp {
            let zf: Vec<f32> = qz.zero_points.iter().map(|&z| z as f32).collect();
            let z = g.add_initializer(
                names,
                &format!("{name}_zero_point"),
                Tensor::from_f32(&bdims, &zf),
            );
            let (_, o) = g.add_node(
                names,
                "Sub",
                "",
                &format!("{name}_zero_point_Sub"),
                vec![],
                vec![Some(x), Some(z)],
                &[&format!("{name}_centered")],
                before,
            );
            x = o[0];
        }
        let s = g.add_initializer(
            names,
            &format!("{name}_scale"),
            Tensor::from_f32(&bdims, &qz.scales),
        );
        let (_, m) = g.add_node(
            names,
            "Mul",
            "",
            &format!("{name}_scale_Mul"),
            vec![],
            vec![Some(x), Some(s)],
            &[&float_name],
            before,
        );
        last = m[0];
        if needs_cast {
            last = cast(
                g,
                names,
                last,
                DataType::Float16,
                &name,
                &final_name,
                before,
            );
        }
    }
    g.replace_uses(w, last);
    g.redirect_outputs(w, last);
    g.remove_initializer(w);
    if take_name {
        g.transfer_name(w, last);
    } else if plan.in_subgraphs {
        let new_name = g.value(last).name.clone();
        g.redirect_subgraph_reads(&name, &new_name);
    }
    true
}

fn cast(
    g: &mut Graph,
    names: &mut Names,
    x: ValueId,
    to: DataType,
    name: &str,
    out_name: &str,
    before: Option<NodeId>,
) -> ValueId {
    let (_, outs) = g.add_node(
        names,
        "Cast",
        "",
        &format!("{name}_Cast"),
        vec![attr_int("to", to as i32 as i64)],
        vec![Some(x)],
        &[out_name],
        before,
    );
    outs[0]
}

// ---------------------------------------------------------------------------------------------
// MatMulNBits (`WeightFormat::MatMulNBits`)

/// Where a graph sits below the graph that owns a weight: (node holding it, index among that
/// node's subgraphs) per level; empty for the owner itself.
type Path = Vec<(NodeId, usize)>;

fn graph_at_mut<'a>(g: &'a mut Graph, path: &[(NodeId, usize)]) -> Option<&'a mut Graph> {
    let mut cur = g;
    for &(id, k) in path {
        cur = cur
            .nodes
            .get_mut(id.0 as usize)?
            .as_mut()?
            .subgraphs_mut()
            .nth(k)?;
    }
    Some(cur)
}

/// A MatMul or Gemm that `MatMulNBits` replaces.
struct NBitsSite {
    /// The graph holding the node.
    path: Path,
    node: NodeId,
    /// The weight is `[N, K]` (Gemm with `transB = 1`) rather than `[K, N]`.
    transposed: bool,
    /// Gemm's C: a 1-D `[N]` initializer of the node's graph, of the weight's type.
    bias: Option<ValueId>,
    /// The node's scheme (the pass's, or its `--config` override).
    scheme: Scheme,
}

/// What one reader of a weight is to the `MatMulNBits` rewrite.
enum NBitsReader {
    Site(NBitsSite),
    /// A MatMul or Gemm with a 4-bit block scheme that `MatMulNBits` cannot express: the note.
    Skip(String),
    /// Anything else (other ops and inputs, unselected nodes, other schemes).
    Other,
}

#[allow(clippy::too_many_arguments)] // the reader, its weight and the options that select it
fn nbits_reader(
    gr: &Graph,
    id: NodeId,
    idx: usize,
    dims: &[i64],
    dt: i32,
    opts: &PassOptions,
    scheme: &Scheme,
    path: &[(NodeId, usize)],
) -> NBitsReader {
    let node = gr.node(id);
    if !node.domain().is_empty() || idx != 1 || !matches!(node.op_type(), "MatMul" | "Gemm") {
        return NBitsReader::Other;
    }
    if !opts.selects(gr, node)
        || node.inputs.first().copied().flatten().is_none()
        || node.outputs.first().copied().flatten().is_none()
    {
        return NBitsReader::Other;
    }
    let sc = opts.node_scheme(gr, node).unwrap_or(*scheme);
    let Granularity::Block(bs) = sc.granularity else {
        return NBitsReader::Other;
    };
    if !matches!(sc.qtype, QType::Int4 | QType::Uint4) {
        return NBitsReader::Other;
    }
    let label = node.label(id);
    let skip =
        |why: String| NBitsReader::Skip(format!("{label}: {why}; not written as MatMulNBits"));
    if !crate::quant::nbits::valid_block_size(bs) {
        return skip(format!("block size {bs} is not a power of two >= 16"));
    }
    if dims.len() != 2 || dims.iter().any(|&d| d <= 0) {
        return skip(format!(
            "weight of shape {dims:?}; MatMulNBits takes a 2-D weight"
        ));
    }
    let mut site = NBitsSite {
        path: path.to_vec(),
        node: id,
        transposed: false,
        bias: None,
        scheme: sc,
    };
    if node.op_type() == "Gemm" {
        let c = node.inputs.get(2).copied().flatten();
        let (alpha, beta) = (node.attr_float("alpha", 1.0), node.attr_float("beta", 1.0));
        if node.attr_int("transA", 0) != 0 {
            return skip("transA = 1".into());
        }
        if alpha != 1.0 || (c.is_some() && beta != 1.0) {
            return skip(format!("alpha = {alpha}, beta = {beta}"));
        }
        site.transposed = node.attr_int("transB", 0) != 0;
        let n = if site.transposed { dims[0] } else { dims[1] };
        if let Some(c) = c {
            match gr.initializer(c) {
                Some(t) if t.dims() == [n] && t.data_type() == dt => site.bias = Some(c),
                _ => {
                    return skip(format!(
                        "C is not a 1-D [{n}] initializer of the weight's type"
                    ))
                }
            }
        }
    }
    NBitsReader::Site(site)
}

/// Every reader of weight `name` (owned by `g`): the `MatMulNBits` sites, the notes of readers
/// it cannot take, and the number of all readers (graph outputs included), in `g` and in the
/// subgraphs that read it by name.
#[allow(clippy::too_many_arguments)] // one weight's readers under the pass options
fn nbits_readers(
    gr: &Graph,
    path: &mut Path,
    name: &str,
    dims: &[i64],
    dt: i32,
    opts: &PassOptions,
    scheme: &Scheme,
    out: &mut (Vec<NBitsSite>, Vec<String>, usize),
) {
    if let Some(v) = gr.find(name) {
        let owner = path.is_empty();
        if !owner && gr.value(v).def != ValueDef::Outer {
            return; // shadowed by a local definition
        }
        for &(n, i) in &gr.uses()[v.0 as usize] {
            out.2 += 1;
            match nbits_reader(gr, n, i, dims, dt, opts, scheme, path) {
                NBitsReader::Site(s) => out.0.push(s),
                NBitsReader::Skip(note) => out.1.push(note),
                NBitsReader::Other => {}
            }
        }
        if gr.is_graph_output(v) {
            out.2 += 1;
        }
    }
    for (id, node) in gr.live_nodes() {
        for (k, sg) in node.subgraphs().enumerate() {
            path.push((id, k));
            nbits_readers(sg, path, name, dims, dt, opts, scheme, out);
            path.pop();
        }
    }
}

/// Forgets the outer value `name` in `sg` and deeper (unless shadowed) once nothing reads it:
/// the enclosing graph no longer defines it.
fn drop_outer(sg: &mut Graph, name: &str) {
    if let Some(v) = sg.find(name) {
        if sg.value(v).def != ValueDef::Outer {
            return;
        }
        if sg.uses()[v.0 as usize].is_empty() && !sg.is_graph_output(v) {
            sg.value_mut(v).def = ValueDef::Undefined;
        }
    }
    let ids: Vec<NodeId> = sg.order.clone();
    for id in ids {
        for inner in sg.node_mut(id).subgraphs_mut() {
            drop_outer(inner, name);
        }
    }
}

/// The initializers written for one weight under one (orientation, scheme).
struct NBitsMade {
    /// Packed B, scales, zero points; or, for the float-equivalent model, the dequantized
    /// weight alone.
    values: Vec<Option<ValueId>>,
    nb: crate::quant::nbits::NBits,
}

/// Replaces every MatMul and Gemm that reads a 4-bit block weight of `g` (here or in a
/// subgraph) and that `MatMulNBits` can express by a `com.microsoft` `MatMulNBits` with the
/// same output name. Other readers keep the float weight, which goes when nothing reads it
/// any more. With `dequantized_weights`, the readers read the dequantized weight instead and
/// stay as they are (the float-equivalent model). Initializers it writes are added to `done`.
/// Returns true when it wrote a `MatMulNBits`.
fn nbits_graph(
    g: &mut Graph,
    names: &mut Names,
    opts: &PassOptions,
    scheme: &Scheme,
    stats: &mut PassStats,
    done: &mut std::collections::HashSet<ValueId>,
) -> bool {
    let mut wrote = false;
    let by_header = g.names_read_by_header();
    for w in g.initializers() {
        let Some(t) = g.initializer(w) else { continue };
        let dt = t.data_type();
        if dt != DataType::Float as i32 && dt != DataType::Float16 as i32 {
            continue;
        }
        let dims = t.dims().to_vec();
        let name = g.value(w).name.clone();
        let mut found = (Vec::new(), Vec::new(), 0);
        nbits_readers(
            g,
            &mut Vec::new(),
            &name,
            &dims,
            dt,
            opts,
            scheme,
            &mut found,
        );
        let (sites, notes, readers) = found;
        stats
            .notes
            .extend(notes.into_iter().map(|n| format!("weight '{name}': {n}")));
        // Graph inputs and weights the header names are left to the regular path, which says
        // why they stay float.
        if sites.is_empty() || g.is_graph_input(w) || by_header.contains(&name) {
            continue;
        }
        // Readers MatMulNBits cannot take would keep the float weight beside the packed one:
        // the weight is left to the regular path, which stores it once.
        if sites.len() < readers {
            stats.notes.push(format!(
                "weight '{name}': {} of its {readers} readers can be MatMulNBits; the float weight would stay for the others beside the packed copy, so it takes the regular path (one DequantizeLinear copy for every reader at opset >= 21, else float)",
                sites.len()
            ));
            continue;
        }
        let values = match t.to_f32() {
            Ok(v) => v,
            Err(e) => {
                stats
                    .notes
                    .push(format!("weight '{name}': {e:#}; left in float"));
                continue;
            }
        };
        if let Some(why) = crate::quant::unquantizable(&values) {
            stats
                .notes
                .push(format!("weight '{name}' {why}: left in float"));
            continue;
        }
        let is_f16 = dt == DataType::Float16 as i32;
        let d2 = [dims[0] as usize, dims[1] as usize];
        let mut made: Vec<((bool, Scheme), Option<NBitsMade>)> = Vec::new();
        let mut converted = Vec::new();
        for site in sites {
            let key = (site.transposed, site.scheme);
            let pos = match made.iter().position(|(k, _)| *k == key) {
                Some(p) => p,
                None => {
                    let m = crate::quant::nbits::quantize_nbits(
                        &values,
                        d2,
                        site.transposed,
                        &site.scheme,
                        is_f16,
                    )
                    .map(|nb| nbits_initializers(g, names, &name, &dims, dt, nb, opts));
                    if m.is_none() {
                        stats.notes.push(format!(
                            "weight '{name}' holds NaN or infinity: left in float"
                        ));
                    }
                    for v in m.iter().flat_map(|m| m.values.iter().flatten()) {
                        done.insert(*v);
                    }
                    made.push((key, m));
                    made.len() - 1
                }
            };
            let Some(m) = &made[pos].1 else { continue };
            let names_of: Vec<Option<String>> = m
                .values
                .iter()
                .map(|v| v.map(|v| g.value(v).name.clone()))
                .collect();
            let Some(gr) = graph_at_mut(g, &site.path) else {
                continue;
            };
            // In a subgraph, the new initializers are outer values read by name.
            let vals: Vec<Option<ValueId>> = if site.path.is_empty() {
                m.values.clone()
            } else {
                names_of
                    .iter()
                    .map(|n| n.as_ref().map(|n| gr.outer_value(n)))
                    .collect()
            };
            let label = gr.node(site.node).label(site.node);
            if opts.dequantized_weights {
                gr.set_input(site.node, 1, vals[0]);
            } else if !rewrite_as_nbits(gr, names, &site, &m.nb, &vals) {
                continue;
            } else {
                wrote = true;
            }
            converted.push(label);
        }
        if converted.is_empty() {
            continue;
        }
        if converted.len() == readers {
            g.remove_initializer(w);
            let ids: Vec<NodeId> = g.order.clone();
            for id in ids {
                for sg in g.node_mut(id).subgraphs_mut() {
                    drop_outer(sg, &name);
                }
            }
        }
        stats.changes += 1;
        let sc = made
            .iter()
            .find_map(|(k, m)| m.as_ref().map(|_| k.1))
            .unwrap_or(*scheme);
        stats.touched.push(format!(
            "{name}: {} as MatMulNBits for {}{}",
            scheme_label(&sc),
            converted.join(", "),
            if converted.len() < readers {
                "; float copy kept for its other readers"
            } else {
                ""
            }
        ));
    }
    wrote
}

/// Writes the initializers of one packed weight into `g`: `B` uint8 `[N, k_blocks,
/// blob_size]`, `scales` `[N, k_blocks]` in the weight's float type, `zero_points` uint8
/// `[N, ceil(k_blocks / 2)]` when asymmetric; or, with `dequantized_weights`, the
/// dequantized weight in the original shape and type.
fn nbits_initializers(
    g: &mut Graph,
    names: &mut Names,
    name: &str,
    dims: &[i64],
    dt: i32,
    nb: crate::quant::nbits::NBits,
    opts: &PassOptions,
) -> NBitsMade {
    let f16 = dt == DataType::Float16 as i32;
    let float = |d: &[i64], v: &[f32]| {
        if f16 {
            let raw = v
                .iter()
                .flat_map(|x| half::f16::from_f32(*x).to_le_bytes())
                .collect();
            Tensor::from_raw(dt, d, raw)
        } else {
            Tensor::from_f32(d, v)
        }
    };
    let i64s = |d: &[usize]| d.iter().map(|&x| x as i64).collect::<Vec<i64>>();
    let values = if opts.dequantized_weights {
        let t = float(dims, &nb.dequantized);
        vec![Some(g.add_initializer(
            names,
            &format!("{name}_dequantized"),
            t,
        ))]
    } else {
        let u8t = DataType::Uint8 as i32;
        let bt = Tensor::from_raw(u8t, &i64s(&nb.b_dims()), nb.b.clone())
            .described_as(g.find(name).and_then(|w| g.initializer(w)));
        let b = g.add_initializer(names, &format!("{name}_quantized"), bt);
        let s = g.add_initializer(
            names,
            &format!("{name}_scale"),
            float(&i64s(&nb.scale_dims()), &nb.scales),
        );
        let z = nb.zero_points.as_ref().map(|z| {
            g.add_initializer(
                names,
                &format!("{name}_zero_point"),
                Tensor::from_raw(u8t, &i64s(&nb.zero_point_dims()), z.clone()),
            )
        });
        vec![Some(b), Some(s), z]
    };
    NBitsMade { values, nb }
}

/// Replaces the MatMul or Gemm of `site` in `gr` by `MatMulNBits(A, B, scales, zero_points,
/// -, bias)` whose output takes the node's output name. `vals` are B, scales and zero points
/// as values of `gr`.
fn rewrite_as_nbits(
    gr: &mut Graph,
    names: &mut Names,
    site: &NBitsSite,
    nb: &crate::quant::nbits::NBits,
    vals: &[Option<ValueId>],
) -> bool {
    let node = gr.node(site.node);
    let (Some(a), Some(Some(y))) = (
        node.inputs.first().copied().flatten(),
        node.outputs.first().copied(),
    ) else {
        return false;
    };
    let yname = gr.value(y).name.clone();
    let base = if node.name().is_empty() {
        yname.clone()
    } else {
        node.name().to_string()
    };
    let mut inputs = vec![Some(a), vals[0], vals[1], vals.get(2).copied().flatten()];
    match site.bias {
        Some(b) => {
            inputs.push(None); // g_idx
            inputs.push(Some(b));
        }
        None => {
            while inputs.last() == Some(&None) {
                inputs.pop();
            }
        }
    }
    let attrs = vec![
        attr_int("K", nb.k as i64),
        attr_int("N", nb.n as i64),
        attr_int("bits", 4),
        attr_int("block_size", nb.block_size as i64),
    ];
    let (_, out) = gr.add_node(
        names,
        "MatMulNBits",
        NBITS_DOMAIN,
        &format!("{base}_MatMulNBits"),
        attrs,
        inputs,
        &[&format!("{yname}_MatMulNBits")],
        Some(site.node),
    );
    gr.remove_node(site.node);
    gr.transfer_name(y, out[0]);
    gr.redirect_outputs(y, out[0]);
    gr.replace_uses(y, out[0]);
    true
}

/// Domain of `MatMulNBits` (imported at version 1 when the pass writes one).
pub const NBITS_DOMAIN: &str = "com.microsoft";
