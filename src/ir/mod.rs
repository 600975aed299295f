//! The IR: one model, its graph and nested subgraphs, with typed ids.
//!
//! Invariants (checked by [`validate`]):
//! - Every value of a graph is defined exactly once: graph input, initializer, node output, or a
//!   reference to a value of an enclosing graph ([`ValueDef::Outer`], for If/Loop/Scan bodies).
//!   An initializer may also be listed as a graph input (the IR < 4 convention).
//! - Every node input resolves to a value of its graph; optional inputs left out are `None`.
//! - The graph is acyclic; node order is kept as read and export writes a stable topological
//!   order that equals the input order when that order already was topological.
//! - Names are data: each value and node keeps its name exactly; new names come from [`Names`],
//!   which knows every name in every graph of the model.
//! - Everything the IR does not model (model and graph headers, attributes, functions,
//!   metadata, sparse initializers, doc strings) is kept as the protobuf it was read as and
//!   written back unchanged.

pub mod edit;
pub mod tensor;
pub mod validate;

use std::collections::{HashMap, HashSet};

pub use tensor::{elem_info, is_float, num_elements, Tensor};

use crate::pb;

/// Index of a node in its graph's arena.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeId(pub u32);

/// Index of a value in its graph's arena.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ValueId(pub u32);

/// An ONNX model: the header as read, the main graph, and the model-wide name registry.
#[derive(Debug, Clone)]
pub struct Model {
    /// Every `ModelProto` field but `graph` (functions, metadata, training_info, ...).
    pub header: pb::ModelProto,
    /// The main graph.
    pub graph: Graph,
    /// Every value and node name in every graph: the source of fresh names.
    pub names: Names,
}

/// A domain as the IR names it: `"ai.onnx"`, the default ONNX domain's other spelling, is
/// `""`.
pub fn normal_domain(domain: &str) -> &str {
    match domain {
        "ai.onnx" => "",
        d => d,
    }
}

impl Model {
    /// Version of the opset imported for `domain` (`""` or `"ai.onnx"` is the default domain).
    pub fn opset(&self, domain: &str) -> Option<i64> {
        self.header
            .opset_import
            .iter()
            .find(|o| normal_domain(o.domain()) == normal_domain(domain))
            .map(|o| o.version())
    }

    /// Sets the version of the opset imported for `domain` (`""` or `"ai.onnx"` is the default
    /// domain, under whichever name the model imports it), adding the import if needed.
    pub fn set_opset(&mut self, domain: &str, version: i64) {
        if let Some(o) = self
            .header
            .opset_import
            .iter_mut()
            .find(|o| normal_domain(o.domain()) == normal_domain(domain))
        {
            o.version = Some(version);
        } else {
            self.header.opset_import.push(pb::OperatorSetIdProto {
                domain: Some(domain.to_string()),
                version: Some(version),
            });
        }
    }
}

/// Where a value comes from.
#[derive(Debug, Clone, PartialEq)]
#[allow(clippy::large_enum_variant)] // one per value; boxing would add an allocation per initializer
pub enum ValueDef {
    /// A graph input that is not an initializer.
    Input,
    /// An initializer (possibly also listed as a graph input).
    Initializer(Tensor),
    /// Output `index` of a node.
    Node(NodeId, usize),
    /// A value of an enclosing graph, read by name from a subgraph; or a sparse initializer of
    /// this graph, which stays in [`Graph::header`] and is read by name.
    Outer,
    /// Not defined (only while importing or editing; the validator reports it).
    Undefined,
}

/// A named value (an edge of the graph).
#[derive(Debug, Clone, PartialEq)]
pub struct Value {
    /// The name, kept exactly.
    pub name: String,
    /// Its definition.
    pub def: ValueDef,
    /// Position of the initializer in the graph's initializer list (stable export order).
    pub init_pos: Option<usize>,
}

/// A subgraph-holding attribute of a node.
#[derive(Debug, Clone)]
pub enum SubgraphAttr {
    /// `AttributeProto.g` (If branches, Loop and Scan bodies).
    One(Box<Graph>),
    /// `AttributeProto.graphs`.
    Many(Vec<Graph>),
}

/// A node: its protobuf minus inputs, outputs and subgraphs, which the IR holds as ids.
#[derive(Debug, Clone)]
pub struct Node {
    /// The node as read, with `input`, `output` cleared and subgraph attributes emptied.
    pub proto: pb::NodeProto,
    /// Inputs in order; `None` for an optional input left out (`""`).
    pub inputs: Vec<Option<ValueId>>,
    /// Outputs in order; `None` for an optional output left out (`""`).
    pub outputs: Vec<Option<ValueId>>,
    /// Subgraph attributes, by index into `proto.attribute`.
    pub subgraphs: Vec<(usize, SubgraphAttr)>,
}

impl Node {
    /// Operator type, e.g. `Conv`.
    pub fn op_type(&self) -> &str {
        self.proto.op_type()
    }
    /// Operator domain; `""` is the default ONNX domain (`ai.onnx` is normalised to `""`).
    pub fn domain(&self) -> &str {
        normal_domain(self.proto.domain())
    }
    /// True for an op of the default domain named `op`.
    pub fn is(&self, op: &str) -> bool {
        self.domain().is_empty() && self.op_type() == op
    }
    /// Node name (may be empty).
    pub fn name(&self) -> &str {
        self.proto.name()
    }
    /// The attribute called `name`.
    pub fn attr(&self, name: &str) -> Option<&pb::AttributeProto> {
        self.proto.attribute.iter().find(|a| a.name() == name)
    }
    /// An integer attribute, or `default`.
    pub fn attr_int(&self, name: &str, default: i64) -> i64 {
        self.attr(name).and_then(|a| a.i).unwrap_or(default)
    }
    /// A float attribute, or `default`.
    pub fn attr_float(&self, name: &str, default: f32) -> f32 {
        self.attr(name).and_then(|a| a.f).unwrap_or(default)
    }
    /// An integer-list attribute.
    pub fn attr_ints(&self, name: &str) -> Option<&[i64]> {
        self.attr(name).map(|a| a.ints.as_slice())
    }
    /// A string attribute.
    pub fn attr_str(&self, name: &str) -> Option<&[u8]> {
        self.attr(name).and_then(|a| a.s.as_deref())
    }
    /// A short label for messages: `Conv "conv1"` or `Conv #12` when unnamed.
    pub fn label(&self, id: NodeId) -> String {
        let op = if self.domain().is_empty() {
            self.op_type().to_string()
        } else {
            format!("{}:{}", self.domain(), self.op_type())
        };
        if self.name().is_empty() {
            format!("{op} node #{}", id.0)
        } else {
            format!("{op} node \"{}\"", self.name())
        }
    }
    /// The graphs of every subgraph attribute.
    pub fn subgraphs(&self) -> impl Iterator<Item = &Graph> {
        self.subgraphs.iter().flat_map(|(_, s)| match s {
            SubgraphAttr::One(g) => std::slice::from_ref(&**g).iter(),
            SubgraphAttr::Many(gs) => gs.iter(),
        })
    }
    /// Mutable access to the graphs of every subgraph attribute.
    pub fn subgraphs_mut(&mut self) -> impl Iterator<Item = &mut Graph> {
        self.subgraphs.iter_mut().flat_map(|(_, s)| match s {
            SubgraphAttr::One(g) => std::slice::from_mut(&mut **g).iter_mut(),
            SubgraphAttr::Many(gs) => gs.iter_mut(),
        })
    }
}

/// A graph input or output entry: the value and its `ValueInfoProto` as read.
#[derive(Debug, Clone)]
pub struct Port {
    /// The value.
    pub value: ValueId,
    /// Its declared type, shape and doc string (name rewritten from the value on export).
    pub info: pb::ValueInfoProto,
}

/// A graph (the main graph or an If/Loop/Scan body).
#[derive(Debug, Clone)]
pub struct Graph {
    /// Every `GraphProto` field the IR does not model (name, doc_string, sparse_initializer,
    /// quantization_annotation, metadata_props); `node`, `initializer`, `input`, `output` and
    /// `value_info` are empty here.
    pub header: pb::GraphProto,
    /// Node arena; removed nodes are `None`.
    pub nodes: Vec<Option<Node>>,
    /// Node order (a permutation of the live nodes); export sorts it topologically, stably.
    pub order: Vec<NodeId>,
    /// Value arena.
    pub values: Vec<Value>,
    /// Graph inputs in order (may include initializers).
    pub inputs: Vec<Port>,
    /// Graph outputs in order.
    pub outputs: Vec<Port>,
    /// `value_info` entries as read; on export an entry is written while its name is still a
    /// live value of this graph, or always when it named no value at import.
    pub value_info: Vec<ValueInfo>,
    /// Values by name (every value of this graph, outer references included).
    pub by_name: HashMap<String, ValueId>,
    /// Names the model refers to in this graph other than through nodes and the graph's
    /// header, set at import: for the main graph, every name `training_info` mentions (its
    /// graphs' inputs, binding keys and values).
    pub read_by_model: HashSet<String>,
}

/// One `value_info` entry of a graph.
#[derive(Debug, Clone)]
pub struct ValueInfo {
    /// The entry as read (a pass that changes the value's type updates it).
    pub proto: pb::ValueInfoProto,
    /// True when the entry named no value of its graph at import (kept as is).
    pub orphan: bool,
}

impl Graph {
    /// The names of the graph's sparse initializers (each named by its `values` tensor), which
    /// stay in [`Graph::header`] and are read by name ([`ValueDef::Outer`]).
    pub fn sparse_initializer_names(&self) -> impl Iterator<Item = &str> {
        self.header
            .sparse_initializer
            .iter()
            .filter_map(|s| s.values.as_ref().map(|v| v.name()))
            .filter(|n| !n.is_empty())
    }

    /// An empty graph around `header`.
    pub fn new(header: pb::GraphProto) -> Self {
        Graph {
            header,
            nodes: Vec::new(),
            order: Vec::new(),
            values: Vec::new(),
            inputs: Vec::new(),
            outputs: Vec::new(),
            value_info: Vec::new(),
            by_name: HashMap::new(),
            read_by_model: HashSet::new(),
        }
    }

    /// The node `id`; panics on an id that is not a live node of this graph (one that never
    /// came from it, or a removed node: [`validate::validate`] reports such ids).
    pub fn node(&self, id: NodeId) -> &Node {
        match self.nodes.get(id.0 as usize) {
            Some(Some(n)) => n,
            _ => unreachable_node(id),
        }
    }

    /// Mutable node access.
    pub fn node_mut(&mut self, id: NodeId) -> &mut Node {
        match self.nodes.get_mut(id.0 as usize) {
            Some(Some(n)) => n,
            _ => unreachable_node(id),
        }
    }

    /// The value `id`.
    pub fn value(&self, id: ValueId) -> &Value {
        &self.values[id.0 as usize]
    }

    /// Mutable value access.
    pub fn value_mut(&mut self, id: ValueId) -> &mut Value {
        &mut self.values[id.0 as usize]
    }

    /// The value called `name`, if this graph has one.
    pub fn find(&self, name: &str) -> Option<ValueId> {
        self.by_name.get(name).copied()
    }

    /// Is `v` still defined (not a removed initializer or an output of a removed node)?
    pub fn is_live(&self, v: ValueId) -> bool {
        match self.value(v).def {
            ValueDef::Undefined => false,
            ValueDef::Node(n, _) => matches!(self.nodes.get(n.0 as usize), Some(Some(_))),
            _ => true,
        }
    }

    /// The producer of `v`, when `v` is a node output.
    pub fn producer(&self, v: ValueId) -> Option<NodeId> {
        match self.value(v).def {
            ValueDef::Node(n, _) => Some(n),
            _ => None,
        }
    }

    /// Live nodes in the current order.
    pub fn live_nodes(&self) -> impl Iterator<Item = (NodeId, &Node)> {
        self.order.iter().map(|&id| (id, self.node(id)))
    }

    /// The initializer tensor of `v`, if `v` is an initializer.
    pub fn initializer(&self, v: ValueId) -> Option<&Tensor> {
        match &self.value(v).def {
            ValueDef::Initializer(t) => Some(t),
            _ => None,
        }
    }

    /// Initializers in their stored order.
    pub fn initializers(&self) -> Vec<ValueId> {
        let mut v: Vec<(usize, ValueId)> = self
            .values
            .iter()
            .enumerate()
            .filter(|(_, val)| matches!(val.def, ValueDef::Initializer(_)))
            .map(|(i, val)| (val.init_pos.unwrap_or(usize::MAX), ValueId(i as u32)))
            .collect();
        v.sort();
        v.into_iter().map(|(_, id)| id).collect()
    }

    /// Is `v` listed as a graph input?
    pub fn is_graph_input(&self, v: ValueId) -> bool {
        self.inputs.iter().any(|p| p.value == v)
    }

    /// Is `v` listed as a graph output?
    pub fn is_graph_output(&self, v: ValueId) -> bool {
        self.outputs.iter().any(|p| p.value == v)
    }

    /// Consumers of every value: `uses[v]` lists `(node, input index)` in node order.
    /// An analysis: recompute after edits.
    pub fn uses(&self) -> Vec<Vec<(NodeId, usize)>> {
        let mut uses = vec![Vec::new(); self.values.len()];
        for &id in &self.order {
            for (i, inp) in self.node(id).inputs.iter().enumerate() {
                if let Some(v) = inp {
                    uses[v.0 as usize].push((id, i));
                }
            }
        }
        uses
    }

    /// Names the graph's `quantization_annotation` (the annotated tensors and their scale and
    /// zero point tensors) and the model ([`Graph::read_by_model`]) refer to.
    pub fn names_read_by_header(&self) -> HashSet<String> {
        let mut out = self.read_by_model.clone();
        for a in &self.header.quantization_annotation {
            out.insert(a.tensor_name().to_string());
            out.extend(
                a.quant_parameter_tensor_names
                    .iter()
                    .map(|e| e.value().to_string()),
            );
        }
        out
    }

    /// Names of the values of this graph or an enclosing one that are read by name rather
    /// than by this graph's nodes: by its subgraphs (at any depth) and by
    /// [`Graph::names_read_by_header`]. A value listed here must not be removed or renamed.
    pub fn names_read_by_subgraphs(&self) -> HashSet<String> {
        let mut out = self.names_read_by_header();
        for (_, n) in self.live_nodes() {
            for g in n.subgraphs() {
                out.extend(g.names_read_from_outside());
            }
        }
        out
    }

    /// Names this graph (at any depth) reads from enclosing graphs.
    pub fn names_read_from_outside(&self) -> HashSet<String> {
        let mut out = HashSet::new();
        for v in &self.values {
            if v.def == ValueDef::Outer {
                out.insert(v.name.clone());
            }
        }
        for name in self.names_read_by_subgraphs() {
            let local = self
                .find(&name)
                .is_some_and(|id| self.value(id).def != ValueDef::Outer);
            if !local {
                out.insert(name);
            }
        }
        out
    }

    /// Visits this graph and every nested subgraph, depth first, parents before children.
    pub fn visit<'a>(&'a self, f: &mut dyn FnMut(&'a Graph)) {
        f(self);
        for (_, n) in self.live_nodes() {
            for g in n.subgraphs() {
                g.visit(f);
            }
        }
    }
}

#[cold]
fn unreachable_node(id: NodeId) -> ! {
    // An id is only ever produced by this graph's own arena; reaching this is a bug in a pass,
    // never a property of the input model.
    unreachable!("node id {} is not a live node of this graph", id.0)
}

/// Every name used in a model, to make new names that collide with none.
#[derive(Debug, Clone, Default)]
pub struct Names {
    used: HashSet<String>,
}

impl Names {
    /// Records `name` as used.
    pub fn insert(&mut self, name: &str) {
        self.used.insert(name.to_string());
    }
    /// True when `name` is in use.
    pub fn contains(&self, name: &str) -> bool {
        self.used.contains(name)
    }
    /// A fresh name derived from `base` (`base`, `base_1`, `base_2`, ...), recorded as used.
    pub fn fresh(&mut self, base: &str) -> String {
        if !base.is_empty() && !self.used.contains(base) {
            self.used.insert(base.to_string());
            return base.to_string();
        }
        let mut i = 1usize;
        loop {
            let cand = format!("{base}_{i}");
            if !self.used.contains(&cand) {
                self.used.insert(cand.clone());
                return cand;
            }
            i += 1;
        }
    }
}
