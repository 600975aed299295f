//! The only mutation API of the IR. Passes read first (collect matches from `&Graph`), then
//! apply them through these methods.

use super::{Graph, Model, Names, Node, NodeId, Tensor, Value, ValueDef, ValueId};
use crate::pb;

impl Graph {
    fn push_value(&mut self, name: String, def: ValueDef) -> ValueId {
        let id = ValueId(self.values.len() as u32);
        self.by_name.insert(name.clone(), id);
        self.values.push(Value {
            name,
            def,
            init_pos: None,
        });
        id
    }

    /// Adds an initializer under a fresh name derived from `base`.
    pub fn add_initializer(&mut self, names: &mut Names, base: &str, tensor: Tensor) -> ValueId {
        let name = names.fresh(base);
        let pos = self
            .values
            .iter()
            .filter_map(|v| v.init_pos)
            .max()
            .map_or(0, |p| p + 1);
        let id = self.push_value(name, ValueDef::Initializer(tensor));
        self.value_mut(id).init_pos = Some(pos);
        id
    }

    /// The value of this graph that reads `name` from an enclosing graph, created if needed.
    /// Returns the local value instead when this graph defines `name` itself.
    pub fn outer_value(&mut self, name: &str) -> ValueId {
        match self.find(name) {
            Some(v) => v,
            None => self.push_value(name.to_string(), ValueDef::Outer),
        }
    }

    /// Replaces the tensor of initializer `v` (same name). The value keeps its description:
    /// when `tensor` has no `doc_string` and no `metadata_props`, the old tensor's are kept
    /// (an exporter's source name of a weight, for example).
    pub fn set_initializer(&mut self, v: ValueId, mut tensor: Tensor) {
        let val = self.value_mut(v);
        if let ValueDef::Initializer(old) = &val.def {
            if tensor.proto.doc_string.is_none() && tensor.proto.metadata_props.is_empty() {
                tensor.proto.doc_string = old.proto.doc_string.clone();
                tensor.proto.metadata_props = old.proto.metadata_props.clone();
            }
        }
        val.def = ValueDef::Initializer(tensor);
    }

    /// Removes initializer `v` (its name stays reserved). The caller makes sure nothing reads it.
    pub fn remove_initializer(&mut self, v: ValueId) {
        self.value_mut(v).def = ValueDef::Undefined;
        self.inputs.retain(|p| p.value != v);
    }

    /// Turns `v` (a node output) into an initializer holding `tensor`, keeping its name.
    pub fn make_initializer(&mut self, v: ValueId, tensor: Tensor) {
        let pos = self
            .values
            .iter()
            .filter_map(|v| v.init_pos)
            .max()
            .map_or(0, |p| p + 1);
        let val = self.value_mut(v);
        val.def = ValueDef::Initializer(tensor);
        val.init_pos = Some(pos);
    }

    /// Adds a node of `op_type` in `domain` (`""` = default) named after `base` (fresh), reading
    /// `inputs`, with one fresh output value per entry of `outputs` (names derived from them).
    /// It is placed just before `before` in the node order, or at the end.
    #[allow(clippy::too_many_arguments)] // each argument is one field of the new node
    pub fn add_node(
        &mut self,
        names: &mut Names,
        op_type: &str,
        domain: &str,
        base: &str,
        attributes: Vec<pb::AttributeProto>,
        inputs: Vec<Option<ValueId>>,
        outputs: &[&str],
        before: Option<NodeId>,
    ) -> (NodeId, Vec<ValueId>) {
        let id = NodeId(self.nodes.len() as u32);
        let outs: Vec<ValueId> = outputs
            .iter()
            .enumerate()
            .map(|(k, o)| {
                let name = names.fresh(o);
                self.push_value(name, ValueDef::Node(id, k))
            })
            .collect();
        let proto = pb::NodeProto {
            op_type: Some(op_type.to_string()),
            domain: (!domain.is_empty()).then(|| domain.to_string()),
            name: (!base.is_empty()).then(|| names.fresh(base)),
            attribute: attributes,
            ..Default::default()
        };
        self.nodes.push(Some(Node {
            proto,
            inputs,
            outputs: outs.iter().map(|&v| Some(v)).collect(),
            subgraphs: Vec::new(),
        }));
        match before.and_then(|b| self.order.iter().position(|&n| n == b)) {
            Some(pos) => self.order.insert(pos, id),
            None => self.order.push(id),
        }
        (id, outs)
    }

    /// Removes node `id`; its outputs are no longer defined.
    pub fn remove_node(&mut self, id: NodeId) {
        if let Some(slot) = self.nodes.get_mut(id.0 as usize) {
            *slot = None;
        }
        self.order.retain(|&n| n != id);
    }

    /// Makes every node input that reads `old` read `new` instead. Graph outputs are a contract
    /// and are not touched; see [`Graph::redirect_outputs`].
    pub fn replace_uses(&mut self, old: ValueId, new: ValueId) {
        for &id in &self.order {
            if let Some(Some(n)) = self.nodes.get_mut(id.0 as usize) {
                for inp in n.inputs.iter_mut().flatten() {
                    if *inp == old {
                        *inp = new;
                    }
                }
            }
        }
    }

    /// Sets input `idx` of node `id`.
    pub fn set_input(&mut self, id: NodeId, idx: usize, v: Option<ValueId>) {
        let n = self.node_mut(id);
        if idx >= n.inputs.len() {
            n.inputs.resize(idx + 1, None);
        }
        n.inputs[idx] = v;
    }

    /// Gives value `to` the name of value `from`, whose producer is being removed, so that a
    /// graph output keeps its name when its producer changes. Graph input and output names
    /// never change; `to`'s old name is no longer used by any value.
    pub fn transfer_name(&mut self, from: ValueId, to: ValueId) {
        let name = self.value(from).name.clone();
        let old = std::mem::replace(&mut self.value_mut(to).name, name.clone());
        if self.by_name.get(&old) == Some(&to) {
            self.by_name.remove(&old);
        }
        self.by_name.insert(name, to);
    }

    /// Points the readers of value `old` of this graph in its subgraphs (at any depth, unless
    /// a subgraph defines `old` itself) at value `new` of this graph, graph outputs of the
    /// subgraphs included.
    pub fn redirect_subgraph_reads(&mut self, old: &str, new: &str) {
        fn redirect_outer(sg: &mut Graph, old: &str, new: &str) {
            if let Some(v) = sg.find(old) {
                if sg.value(v).def != ValueDef::Outer {
                    return; // shadowed by a local definition
                }
                let readers = sg.uses()[v.0 as usize].clone();
                let is_out = sg.is_graph_output(v);
                if !readers.is_empty() || is_out {
                    let nv = sg.outer_value(new);
                    for (n, i) in readers {
                        sg.set_input(n, i, Some(nv));
                    }
                    sg.redirect_outputs(v, nv);
                }
                // Nothing here reads `old` any more: it is no longer read from outside.
                sg.value_mut(v).def = ValueDef::Undefined;
            }
            sg.redirect_subgraph_reads(old, new);
        }
        let ids: Vec<NodeId> = self.order.clone();
        for id in ids {
            for sg in self.node_mut(id).subgraphs_mut() {
                redirect_outer(sg, old, new);
            }
        }
    }

    /// Graph outputs that read `old` read `new` instead (the caller keeps the output names: see
    /// the passes that use this).
    pub fn redirect_outputs(&mut self, old: ValueId, new: ValueId) {
        for p in &mut self.outputs {
            if p.value == old {
                p.value = new;
            }
        }
    }

    /// The `value_info` entry of `name`, for a pass that changes that value's type.
    pub fn value_info_mut(&mut self, name: &str) -> Option<&mut pb::ValueInfoProto> {
        self.value_info
            .iter_mut()
            .find(|vi| vi.proto.name() == name)
            .map(|vi| &mut vi.proto)
    }
}

impl Model {
    /// Calls `f` on the main graph and every subgraph (parents first), each with the model's
    /// name registry.
    pub fn for_each_graph_mut(&mut self, f: &mut dyn FnMut(&mut Graph, &mut Names)) {
        fn walk(g: &mut Graph, names: &mut Names, f: &mut dyn FnMut(&mut Graph, &mut Names)) {
            f(g, names);
            let order = g.order.clone();
            for id in order {
                for sg in g.node_mut(id).subgraphs_mut() {
                    walk(sg, names, f);
                }
            }
        }
        walk(&mut self.graph, &mut self.names, f);
    }
}

/// An `AttributeProto` of type INT.
pub fn attr_int(name: &str, v: i64) -> pb::AttributeProto {
    pb::AttributeProto {
        name: Some(name.to_string()),
        i: Some(v),
        r#type: Some(pb::attribute_proto::AttributeType::Int as i32),
        ..Default::default()
    }
}

/// An `AttributeProto` of type FLOAT.
pub fn attr_float(name: &str, v: f32) -> pb::AttributeProto {
    pb::AttributeProto {
        name: Some(name.to_string()),
        f: Some(v),
        r#type: Some(pb::attribute_proto::AttributeType::Float as i32),
        ..Default::default()
    }
}
