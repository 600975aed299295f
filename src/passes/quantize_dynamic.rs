//! `quantize_dynamic`: dynamic quantization, the scheme of onnxruntime's `quantize_dynamic`.
//!
//! Weights are quantized ahead of time to int8 (symmetric, per output channel); activations
//! are quantized at run time from their own range.
//!
//! Before: `Y = MatMul(A, B)` with `B` a float32 initializer `[K, N]`. After:
//! ```text
//! A_q, A_scale, A_zp = DynamicQuantizeLinear(A)            (uint8, DynamicQuantizeLinear-11)
//! Y_i = MatMulInteger(A_q, B_quantized, A_zp)              (int32, MatMulInteger-10)
//! Y   = Mul(Cast(Y_i, to=FLOAT), Mul(A_scale, B_scale))    (B_scale: [N])
//! ```
//! which onnxruntime fuses into its DynamicQuantizeMatMul kernel. With
//! `PassOptions::reduce_range` the weights lie in `[-64, 64]` (onnxruntime's `reduce_range`):
//! x86 CPUs without VNNI sum pairs of uint8 x int8 products in int16, which full-range
//! weights can saturate. `Gemm(A, B, C)` with
//! `transA = 0` and `alpha = beta = 1` takes the same form on `B` (transposed ahead of time when
//! `transB = 1`) followed by `Add(C)`. With `PassOptions::conv_integer`, `Conv(X, W, b)` becomes
//! `ConvInteger(X_q, W_quantized, X_zp)` (ConvInteger-10) with the same rescaling (the scale
//! product reshaped to `[1, M, 1, ...]`) and the bias added after; it is opt-in because
//! ConvInteger is slower than float Conv on common CPU runtimes.
//!
//! `Y` keeps its name and type, so readers and graph outputs are unchanged. A dynamic range is
//! measured per call over the whole activation tensor (per tensor, asymmetric uint8: the only
//! form DynamicQuantizeLinear has), so one outlier costs the whole tensor's precision; static
//! quantization avoids that.
//!
//! Not done (left float, with a note): MatMul with a weight of rank other than 2 or a float
//! weight on input 0, MatMul of an input declared 1-D (tract's MatMulInteger gives it shape
//! `[1, N]`, so the check could not verify it), sparse-initializer weights, non-float32
//! activations, weights that are graph inputs, LSTM/GRU/RNN
//! (onnxruntime's `DynamicQuantizeLSTM` is a `com.microsoft` op that tract and other runtimes
//! lack), models below opset 11 (an error: DynamicQuantizeLinear does not exist there), weights
//! read by name from a subgraph (each graph's own initializers only), weights that another
//! node, a graph output or a subgraph also reads (the float copy would stay beside the int8
//! one and the file would grow).

use std::collections::HashMap;

use anyhow::{bail, Result};

use super::{can_add_initializers, Pass, PassKind, PassOptions, PassStats};
use crate::ir::edit::attr_int;
use crate::ir::{Graph, Model, Names, NodeId, Tensor, ValueDef, ValueId};
use crate::pb::tensor_proto::DataType;
use crate::quant::{quantize, Scheme, REDUCED_INT8_MAX};

/// See the module documentation.
pub struct QuantizeDynamic;

impl Pass for QuantizeDynamic {
    fn name(&self) -> &'static str {
        "quantize_dynamic"
    }
    fn summary(&self) -> &'static str {
        "MatMul/Gemm (and Conv on request) to DynamicQuantizeLinear + MatMulInteger/ConvInteger, int8 weights per channel"
    }
    fn kind(&self) -> PassKind {
        PassKind::Lossy {
            tolerance: "cosine >= 0.99 per output on typical models",
        }
    }
    fn run(&self, model: &mut Model, opts: &PassOptions) -> Result<PassStats> {
        let mut stats = PassStats::default();
        let opset = model.opset("").unwrap_or(1);
        if opset < 11 {
            bail!(
                "dynamic quantization needs DynamicQuantizeLinear (opset 11) but the model is opset {opset}; onnxopt does not raise a model's opset: use --mode weight-only"
            );
        }
        if !can_add_initializers(model) {
            stats.notes.push(format!(
                "IR version {} requires initializers to be graph inputs: nothing quantized",
                model.header.ir_version()
            ));
            return Ok(stats);
        }
        model.for_each_graph_mut(&mut |g, names| {
            quantize_graph(g, names, opts, &mut stats);
        });
        stats
            .notes
            .extend(super::constant_weights_note(model, opts));
        if stats.changes > 0 {
            stats.notes.push(if opts.reduce_range {
                format!("--reduce-range: int8 weights in [-{REDUCED_INT8_MAX}, {REDUCED_INT8_MAX}], so no pair of uint8 activation x int8 weight products can saturate onnxruntime's u8 x s8 kernels")
            } else {
                "int8 weights use [-127, 127] beside uint8 activations: onnxruntime's u8 x s8 kernels on x86 CPUs without VNNI can saturate a pair of products there, which the tract check cannot show; --reduce-range rules it out for such targets".to_string()
            });
        }
        Ok(stats)
    }
}

/// One rewrite: the node, its weight and how the weight is laid out.
struct Site {
    node: NodeId,
    weight: ValueId,
    kind: SiteKind,
}

#[derive(Clone, Copy, PartialEq)]
enum SiteKind {
    /// MatMul or Gemm; `transposed` when the weight is `[N, K]` (Gemm transB = 1).
    MatMul { transposed: bool, gemm: bool },
    /// Conv with a weight `[M, C/g, k..]`.
    Conv,
}

fn float32_init(g: &Graph, v: Option<ValueId>) -> Option<(ValueId, &Tensor)> {
    let v = v?;
    let t = g.initializer(v)?;
    (t.data_type() == DataType::Float as i32 && !g.is_graph_input(v)).then_some((v, t))
}

/// Why the weight `v` of `node` is not quantized, when it looks like a weight but is not a
/// float32 initializer of this graph: another float type, a graph input, or a value of an
/// enclosing graph. `None` for activations (computed values), which are not weights.
fn not_a_weight(g: &Graph, node: &str, v: Option<ValueId>) -> Option<String> {
    let v = v?;
    let name = &g.value(v).name;
    if let Some(t) = g.initializer(v) {
        let dt = t.dtype_name();
        if g.is_graph_input(v) {
            return Some(format!(
                "{node}: weight '{name}' is also a graph input (it can be fed at run time): left in float"
            ));
        }
        if matches!(
            DataType::try_from(t.data_type()),
            Ok(DataType::Float16 | DataType::Bfloat16 | DataType::Double)
        ) {
            return Some(format!(
                "{node}: weight '{name}' is {dt}, DynamicQuantizeLinear takes float32 only: left in float (use --mode weight-only)"
            ));
        }
        return None;
    }
    if g.value(v).def == ValueDef::Outer && g.sparse_initializer_names().any(|s| s == name) {
        return Some(format!(
            "{node}: weight '{name}' is a sparse initializer, which dynamic quantization does not rewrite: left in float"
        ));
    }
    (g.value(v).def == ValueDef::Outer).then(|| {
        format!(
            "{node}: weight '{name}' comes from an enclosing graph; dynamic quantization rewrites each graph's own initializers only: left in float"
        )
    })
}

/// The rank `v` is declared with (as a graph input or in `value_info`), if any.
fn declared_rank(g: &Graph, v: ValueId) -> Option<usize> {
    use crate::pb::type_proto::Value as T;
    let name = &g.value(v).name;
    g.inputs
        .iter()
        .map(|p| &p.info)
        .chain(g.value_info.iter().map(|i| &i.proto))
        .filter(|i| i.name() == name)
        .find_map(|i| match i.r#type.as_ref()?.value.as_ref()? {
            T::TensorType(t) => Some(t.shape.as_ref()?.dim.len()),
            _ => None,
        })
}

fn find_sites(g: &Graph, opts: &PassOptions, stats: &mut PassStats) -> Vec<Site> {
    let mut sites = Vec::new();
    for (id, n) in g.live_nodes() {
        if !n.domain().is_empty() || !opts.selects(g, n) {
            continue;
        }
        let input = |i: usize| n.inputs.get(i).copied().flatten();
        let skip = |stats: &mut PassStats| {
            if let Some(why) = not_a_weight(g, &n.label(id), input(1)) {
                stats.notes.push(why);
            }
        };
        match n.op_type() {
            "MatMul" => {
                let Some((w, t)) = float32_init(g, input(1)) else {
                    skip(stats);
                    continue;
                };
                if t.dims().len() != 2 {
                    stats.notes.push(format!(
                        "{}: weight '{}' has rank {}, only 2-D weights are quantized dynamically",
                        n.label(id),
                        g.value(w).name,
                        t.dims().len()
                    ));
                    continue;
                }
                if let Some(x) = input(0).filter(|&x| declared_rank(g, x) == Some(1)) {
                    // MatMul of a vector: tract's MatMulInteger returns [1, N] where MatMul
                    // returns [N], so the check could not verify the rewrite.
                    stats.notes.push(format!(
                        "{}: input '{}' is 1-D (a vector times the weight), which tract's MatMulInteger does not give MatMul's shape for, so no check could verify it: left in float",
                        n.label(id),
                        g.value(x).name
                    ));
                    continue;
                }
                sites.push(Site {
                    node: id,
                    weight: w,
                    kind: SiteKind::MatMul {
                        transposed: false,
                        gemm: false,
                    },
                });
            }
            "Gemm" => {
                let Some((w, t)) = float32_init(g, input(1)) else {
                    skip(stats);
                    continue;
                };
                let plain = n.attr_int("transA", 0) == 0
                    && n.attr_float("alpha", 1.0) == 1.0
                    && n.attr_float("beta", 1.0) == 1.0
                    && t.dims().len() == 2;
                if !plain {
                    stats.notes.push(format!(
                        "{}: transA, alpha or beta other than 0, 1, 1: left in float",
                        n.label(id)
                    ));
                    continue;
                }
                sites.push(Site {
                    node: id,
                    weight: w,
                    kind: SiteKind::MatMul {
                        transposed: n.attr_int("transB", 0) != 0,
                        gemm: true,
                    },
                });
            }
            "Conv" if opts.conv_integer => {
                let Some((w, t)) = float32_init(g, input(1)) else {
                    skip(stats);
                    continue;
                };
                if t.dims().len() < 3 {
                    continue;
                }
                sites.push(Site {
                    node: id,
                    weight: w,
                    kind: SiteKind::Conv,
                });
            }
            "LSTM" | "GRU" | "RNN" => stats.notes.push(format!(
                "{}: recurrent ops are not quantized dynamically (no standard ONNX integer form); use --mode weight-only",
                n.label(id)
            )),
            _ => {}
        }
    }
    sites
}

/// Quantized weight: int8 initializer laid out for the integer op, and its per-channel scales.
struct QWeight {
    q: ValueId,
    scales: Vec<f32>,
}

/// Drops the sites of weights that something other than a site's weight input also reads
/// (another node, another input of a site, a graph output, a subgraph): the float weight would
/// stay for that reader beside the int8 copy, and the file would grow instead of shrink. A
/// weight read in both layouts (`[K, N]` by MatMul, `[N, K]` by Gemm with `transB = 1`) gets
/// one int8 copy per layout, noted.
fn drop_shared(g: &Graph, sites: Vec<Site>, stats: &mut PassStats) -> Vec<Site> {
    let uses = g.uses();
    let sub_reads = g.names_read_by_subgraphs();
    // Input 1 of each site is its weight.
    let site_uses: std::collections::HashSet<(NodeId, usize)> =
        sites.iter().map(|s| (s.node, 1)).collect();
    let mut shared: HashMap<ValueId, String> = HashMap::new();
    let mut layouts: HashMap<ValueId, (bool, bool)> = HashMap::new();
    for s in &sites {
        let w = s.weight;
        let t = matches!(
            s.kind,
            SiteKind::MatMul {
                transposed: true,
                ..
            }
        );
        let l = layouts.entry(w).or_default();
        if t {
            l.1 = true;
        } else {
            l.0 = true;
        }
        if shared.contains_key(&w) {
            continue;
        }
        if let Some(other) = super::other_reader(g, &uses, &sub_reads, w, &site_uses) {
            shared.insert(w, other);
        }
    }
    let mut noted = std::collections::HashSet::new();
    let kept: Vec<Site> = sites
        .into_iter()
        .filter(|s| {
            let Some(other) = shared.get(&s.weight) else {
                return true;
            };
            if noted.insert(s.weight) {
                stats.notes.push(format!(
                    "{}: weight '{}' is also read by {other}, which needs it in float: quantizing it would store it twice, so it is left in float",
                    g.node(s.node).label(s.node),
                    g.value(s.weight).name
                ));
            }
            false
        })
        .collect();
    for s in &kept {
        if layouts.get(&s.weight) == Some(&(true, true)) && noted.insert(s.weight) {
            stats.notes.push(format!(
                "weight '{}' is read as [K, N] by MatMul and as [N, K] by Gemm (transB = 1): it is stored as one int8 copy per layout (half the float size together)",
                g.value(s.weight).name
            ));
        }
    }
    kept
}

fn quantize_graph(g: &mut Graph, names: &mut Names, opts: &PassOptions, stats: &mut PassStats) {
    let sites = find_sites(g, opts, stats);
    let sites = drop_shared(g, sites, stats);
    let mut done: HashMap<(ValueId, bool), QWeight> = HashMap::new();
    // One DynamicQuantizeLinear per activation, shared by its quantized readers.
    let mut dql: HashMap<ValueId, [ValueId; 3]> = HashMap::new();
    for site in sites {
        let node = g.node(site.node);
        let label = node.label(site.node);
        let (Some(x), Some(Some(y))) = (
            node.inputs.first().copied().flatten(),
            node.outputs.first().copied(),
        ) else {
            continue;
        };
        let bias = node.inputs.get(2).copied().flatten();
        let conv_attrs: Vec<_> = node
            .proto
            .attribute
            .iter()
            .filter(|a| {
                matches!(
                    a.name(),
                    "auto_pad" | "dilations" | "group" | "kernel_shape" | "pads" | "strides"
                )
            })
            .cloned()
            .collect();
        let is_conv = site.kind == SiteKind::Conv;
        // A Conv bias must be a 1-D initializer to be reshaped for broadcasting.
        let conv_bias = match (is_conv, bias) {
            (true, Some(b)) => match g.initializer(b) {
                Some(bt) if bt.dims().len() == 1 => Some(bt.clone()),
                _ => {
                    stats.notes.push(format!(
                        "{label}: bias is not a 1-D initializer: left in float"
                    ));
                    continue;
                }
            },
            _ => None,
        };
        let t = match &g.value(site.weight).def {
            ValueDef::Initializer(t) => t.clone(),
            _ => continue,
        };
        let wname = g.value(site.weight).name.clone();
        let transposed = matches!(
            site.kind,
            SiteKind::MatMul {
                transposed: true,
                ..
            }
        );
        let key = (site.weight, transposed);
        let qw = match done.entry(key) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => {
                let qw = match quantize_weight(g, names, &t, &wname, site.kind, opts.reduce_range) {
                    Ok(qw) => qw,
                    Err(why) => {
                        stats
                            .notes
                            .push(format!("{label}: weight '{wname}' {why}: left in float"));
                        continue;
                    }
                };
                e.insert(qw)
            }
        };
        let (wq, scales) = (qw.q, qw.scales.clone());
        let before = Some(site.node);
        let yname = g.value(y).name.clone();
        let [xq, xs, xz] = match dql.get(&x) {
            Some(v) => *v,
            None => {
                let xn = g.value(x).name.clone();
                let (_, o) = g.add_node(
                    names,
                    "DynamicQuantizeLinear",
                    "",
                    &format!("{xn}_DynamicQuantizeLinear"),
                    vec![],
                    vec![Some(x)],
                    &[
                        &format!("{xn}_quantized"),
                        &format!("{xn}_scale"),
                        &format!("{xn}_zero_point"),
                    ],
                    before,
                );
                let v = [o[0], o[1], o[2]];
                dql.insert(x, v);
                v
            }
        };
        let (op, attrs) = if is_conv {
            // ConvInteger takes Conv's geometry attributes.
            ("ConvInteger", conv_attrs)
        } else {
            ("MatMulInteger", vec![])
        };
        let (_, yi) = g.add_node(
            names,
            op,
            "",
            &format!("{yname}_{op}"),
            attrs,
            vec![Some(xq), Some(wq), Some(xz)],
            &[&format!("{yname}_int32")],
            before,
        );
        let (_, yf) = g.add_node(
            names,
            "Cast",
            "",
            &format!("{yname}_Cast"),
            vec![attr_int("to", DataType::Float as i32 as i64)],
            vec![Some(yi[0])],
            &[&format!("{yname}_int32_as_float")],
            before,
        );
        // Scale product: the activation's scale times each channel's weight scale.
        let sdims: Vec<i64> = if is_conv {
            let rank = t.dims().len();
            let mut d = vec![1i64; rank];
            d[1] = scales.len() as i64;
            d
        } else {
            vec![scales.len() as i64]
        };
        let ws = g.add_initializer(
            names,
            &format!("{wname}_scale"),
            Tensor::from_f32(&sdims, &scales),
        );
        let (_, sp) = g.add_node(
            names,
            "Mul",
            "",
            &format!("{yname}_scale_product"),
            vec![],
            vec![Some(xs), Some(ws)],
            &[&format!("{yname}_scale_product")],
            before,
        );
        let (_, scaled) = g.add_node(
            names,
            "Mul",
            "",
            &format!("{yname}_rescale"),
            vec![],
            vec![Some(yf[0]), Some(sp[0])],
            &[&format!("{yname}_rescaled")],
            before,
        );
        let mut out = scaled[0];
        if let Some(b) = bias {
            // Conv bias [M] broadcasts along the channel axis: reshaped to [1, M, 1, ..].
            let b = match &conv_bias {
                Some(bt) => {
                    let mut p = bt.proto.clone();
                    p.dims = sdims.clone();
                    p.name = None;
                    let bn = g.value(b).name.clone();
                    g.add_initializer(names, &format!("{bn}_broadcast"), Tensor::new(p))
                }
                None => b,
            };
            let (_, o) = g.add_node(
                names,
                "Add",
                "",
                &format!("{yname}_bias"),
                vec![],
                vec![Some(out), Some(b)],
                &[&format!("{yname}_biased")],
                before,
            );
            out = o[0];
        }
        // The new last value takes the node's output name; the float node goes.
        g.remove_node(site.node);
        g.transfer_name(y, out);
        g.redirect_outputs(y, out);
        g.replace_uses(y, out);
        stats.changes += 1;
        stats
            .touched
            .push(format!("{label}: {op}, weight '{wname}' int8 per channel"));
    }
}

/// Quantizes a weight for the integer op: MatMul wants `[K, N]` (transposed from Gemm's
/// `[N, K]` when needed) with scales per column; ConvInteger wants `[M, C/g, k..]` with scales
/// per output channel. Symmetric int8, zero point 0 (so no weight zero point input); in
/// `[-64, 64]` with `reduce_range`.
///
/// Errors: why the weight stays float (unreadable data, NaN or infinity, only subnormal
/// values: see [`crate::quant::unquantizable`]).
fn quantize_weight(
    g: &mut Graph,
    names: &mut Names,
    t: &Tensor,
    wname: &str,
    kind: SiteKind,
    reduce_range: bool,
) -> Result<QWeight, &'static str> {
    let values = t.to_f32().map_err(|_| "holds unreadable data")?;
    if let Some(why) = crate::quant::unquantizable(&values) {
        return Err(why);
    }
    let dims: Vec<usize> = t.dims().iter().map(|&d| d.max(0) as usize).collect();
    let (values, dims, axis) = match kind {
        SiteKind::MatMul {
            transposed: true, ..
        } => {
            let (n, k) = (dims[0], dims[1]);
            let mut tr = vec![0f32; values.len()];
            for i in 0..n {
                for j in 0..k {
                    tr[j * n + i] = values[i * k + j];
                }
            }
            (tr, vec![k, n], 1)
        }
        SiteKind::MatMul { .. } => (values, dims, 1),
        SiteKind::Conv => (values, dims, 0),
    };
    let block_axis = if axis == 0 { 1 } else { 0 };
    let mut qz = quantize(&values, &dims, axis, block_axis, &Scheme::INT8_CHANNEL)
        .ok_or("holds NaN or infinity")?;
    if reduce_range {
        qz.narrow(&values, &dims, axis, 127, REDUCED_INT8_MAX);
    }
    let dims_i64: Vec<i64> = dims.iter().map(|&d| d as i64).collect();
    let qt = Tensor::from_raw(
        DataType::Int8 as i32,
        &dims_i64,
        crate::quant::QType::Int8.pack(&qz.q),
    )
    .described_as(g.find(wname).and_then(|w| g.initializer(w)));
    let q = g.add_initializer(names, &format!("{wname}_quantized"), qt);
    Ok(QWeight {
        q,
        scales: qz.scales,
    })
}
