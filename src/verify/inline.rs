//! Local functions inlined into tract's copy of a model: tract does not read
//! `ModelProto.functions`, so a node calling one stopped the check ("Unimplemented(MyFn)").
//!
//! A call `n` of function `f` (matched by domain, name and overload, as ONNX IR 10 does)
//! becomes `f`'s nodes, following the ONNX IR spec's semantics of a function call
//! (docs/IR.md, "Functions"): `f`'s formal inputs and outputs read and write `n`'s actual
//! ones (an input `n` leaves out is `""`, an optional input left out); every other name of
//! the body gets a prefix no name of the model starts with, so that two calls (or a call and
//! the graph) cannot share a value; an attribute that refers to one of `f`'s
//! (`ref_attr_name`) takes the value `n` gives it, else `f`'s default (`attribute_proto`),
//! else it is left out. Calls inside function bodies are inlined in turn (to
//! [`MAX_DEPTH`] levels); the names a body gets are reserved before a nested call picks its
//! prefix, which extends its caller's. A call is left as it is when its function's body holds
//! subgraphs (their reads of body values would need renaming too) or imports the default
//! domain at another version than the model, when the function calls itself, or past
//! [`MAX_DEPTH`]; [`inline_local_functions`] says which and why, and tract's load refuses
//! such a model with that reason (tract could not run the call). The model itself is never
//! changed: this works on the copy tract reads.

use std::collections::{HashMap, HashSet};

use crate::pb;

/// Deepest nesting of calls inlined (a function calling another, and so on).
pub const MAX_DEPTH: usize = 16;

/// The key of a function or of a call: (domain, name, overload).
type Key = (String, String, String);

fn key_of_function(f: &pb::FunctionProto) -> Key {
    (
        crate::ir::normal_domain(f.domain()).to_string(),
        f.name().to_string(),
        f.overload().to_string(),
    )
}

fn key_of_call(n: &pb::NodeProto) -> Key {
    (
        crate::ir::normal_domain(n.domain()).to_string(),
        n.op_type().to_string(),
        n.overload().to_string(),
    )
}

/// True when some node of `model` (subgraphs included) calls one of its local functions.
pub fn calls_local_functions(model: &pb::ModelProto) -> bool {
    if model.functions.is_empty() {
        return false;
    }
    let keys: HashSet<Key> = model.functions.iter().map(key_of_function).collect();
    fn any_call(g: &pb::GraphProto, keys: &HashSet<Key>) -> bool {
        g.node.iter().any(|n| {
            keys.contains(&key_of_call(n))
                || n.attribute
                    .iter()
                    .flat_map(|a| a.g.iter().chain(&a.graphs))
                    .any(|sub| any_call(sub, keys))
        })
    }
    model.graph.as_ref().is_some_and(|g| any_call(g, &keys))
}

/// Inlines, in `model`'s graph and subgraphs, every call of a local function that can be (see
/// the module documentation). Returns how many calls were inlined, and a line for each call
/// left as it was, naming the node that made it and why.
pub fn inline_local_functions(model: &mut pb::ModelProto) -> (usize, Vec<String>) {
    let model_opset = model
        .opset_import
        .iter()
        .find(|o| crate::ir::normal_domain(o.domain()).is_empty())
        .map(|o| o.version());
    let functions: HashMap<Key, pb::FunctionProto> = model
        .functions
        .iter()
        .filter(|f| inlinable(f, model_opset))
        .map(|f| (key_of_function(f), f.clone()))
        .collect();
    let Some(graph) = model.graph.as_mut() else {
        return (0, Vec::new());
    };
    let mut names = HashSet::new();
    collect_names(graph, &mut names);
    for f in functions.values() {
        for n in &f.node {
            names.extend(n.input.iter().chain(&n.output).cloned());
            names.insert(n.name().to_string());
        }
    }
    let mut inliner = Inliner {
        functions: &functions,
        model_opset,
        all_functions: model.functions.iter().map(key_of_function).collect(),
        prefixes: HashSet::new(),
        calls: 0,
        left: Vec::new(),
        origin: String::new(),
    };
    for n in &names {
        inliner.reserve(n);
    }
    inliner.graph(graph);
    (inliner.calls, inliner.left)
}

/// A function whose body holds no subgraph and that imports the default domain at the model's
/// version, if at all.
fn inlinable(f: &pb::FunctionProto, model_opset: Option<i64>) -> bool {
    let no_subgraphs = f.node.iter().all(|n| {
        n.attribute
            .iter()
            .all(|a| a.g.is_none() && a.graphs.is_empty())
    });
    let same_opset = f
        .opset_import
        .iter()
        .filter(|o| crate::ir::normal_domain(o.domain()).is_empty())
        .all(|o| Some(o.version()) == model_opset);
    no_subgraphs && same_opset
}

/// Every name of `g` and its subgraphs: node names, inputs and outputs, initializers, graph
/// inputs and outputs.
fn collect_names(g: &pb::GraphProto, out: &mut HashSet<String>) {
    for n in &g.node {
        out.extend(n.input.iter().chain(&n.output).cloned());
        out.insert(n.name().to_string());
        for sub in n.attribute.iter().flat_map(|a| a.g.iter().chain(&a.graphs)) {
            collect_names(sub, out);
        }
    }
    out.extend(g.initializer.iter().map(|t| t.name().to_string()));
    out.extend(
        g.input
            .iter()
            .chain(&g.output)
            .map(|v| v.name().to_string()),
    );
}

struct Inliner<'a> {
    /// The functions that can be inlined.
    functions: &'a HashMap<Key, pb::FunctionProto>,
    model_opset: Option<i64>,
    /// Every local function, inlinable or not.
    all_functions: HashSet<Key>,
    /// Every prefix ending at a `/` of the names in use (the model's, the functions' and the
    /// ones made here), so that a new prefix is known unused in one lookup.
    prefixes: HashSet<String>,
    calls: usize,
    /// Calls left as they were, and why.
    left: Vec<String>,
    /// The node of the graph whose call is being inlined (the one the user's model has).
    origin: String,
}

impl Inliner<'_> {
    /// Marks `name` as in use: a prefix that one of its `/`-ended prefixes equals cannot be
    /// given.
    fn reserve(&mut self, name: &str) {
        for (i, _) in name.match_indices('/') {
            self.prefixes.insert(name[..=i].to_string());
        }
        self.prefixes.insert(format!("{name}/"));
    }

    /// Inlines the calls of `g`'s nodes and of its subgraphs' nodes.
    fn graph(&mut self, g: &mut pb::GraphProto) {
        let nodes = std::mem::take(&mut g.node);
        for mut n in nodes {
            for sub in n
                .attribute
                .iter_mut()
                .flat_map(|a| a.g.iter_mut().chain(a.graphs.iter_mut()))
            {
                self.graph(sub);
            }
            self.origin = n.name().to_string();
            self.node(n, 0, &mut Vec::new(), &mut g.node);
        }
    }

    /// Appends `n` to `out`, or the nodes it stands for when it calls a function (`stack`:
    /// the functions being inlined, to stop recursion).
    fn node(
        &mut self,
        n: pb::NodeProto,
        depth: usize,
        stack: &mut Vec<Key>,
        out: &mut Vec<pb::NodeProto>,
    ) {
        let key = key_of_call(&n);
        let why_not = match self.functions.get(&key) {
            _ if !self.all_functions.contains(&key) => None,
            None => Some(format!(
                "its body holds a subgraph or imports the default domain at another opset than the model's ({})",
                self.model_opset
                    .map_or("none".to_string(), |v| format!("opset {v}"))
            )),
            Some(_) if stack.contains(&key) => Some("it calls itself".to_string()),
            Some(_) if depth >= MAX_DEPTH => {
                Some(format!("calls are nested more than {MAX_DEPTH} deep"))
            }
            Some(_) => None,
        };
        let Some(f) = self.functions.get(&key).filter(|_| why_not.is_none()) else {
            if let Some(why) = why_not {
                let by = if depth == 0 {
                    format!("node \"{}\"", n.name())
                } else {
                    format!("the body of node \"{}\"", self.origin)
                };
                self.left.push(format!(
                    "local function `{}` ({}) called by {by} is not inlined for tract: {why}",
                    key.1,
                    if key.0.is_empty() {
                        "default domain"
                    } else {
                        &key.0
                    },
                ));
            }
            out.push(n);
            return;
        };
        self.calls += 1;
        let prefix = self.prefix(if n.name().is_empty() {
            n.op_type()
        } else {
            n.name()
        });
        // Formal names to actual ones: inputs and outputs the call gives, the rest prefixed.
        let mut names: HashMap<&str, String> = HashMap::new();
        for (i, formal) in f.input.iter().enumerate() {
            names.insert(formal, n.input.get(i).cloned().unwrap_or_default());
        }
        for (i, formal) in f.output.iter().enumerate() {
            match n.output.get(i).filter(|o| !o.is_empty()) {
                Some(actual) => names.insert(formal, actual.clone()),
                None => names.insert(formal, format!("{prefix}{formal}")),
            };
        }
        let rename = |name: &String| -> String {
            if name.is_empty() {
                return String::new();
            }
            names
                .get(name.as_str())
                .cloned()
                .unwrap_or_else(|| format!("{prefix}{name}"))
        };
        let node_name = |body: &pb::NodeProto, k: usize| {
            if body.name().is_empty() {
                format!("{prefix}{}{k}", body.op_type())
            } else {
                format!("{prefix}{}", body.name())
            }
        };
        // Every name the body gets is reserved before any nested call picks its prefix (a
        // nested prefix extends this one: `call/inlined1/inner/inlined2/`).
        for (k, body) in f.node.iter().enumerate() {
            for name in body.input.iter().chain(&body.output).map(rename) {
                self.reserve(&name);
            }
            self.reserve(&node_name(body, k));
        }
        stack.push(key);
        for (k, body) in f.node.iter().enumerate() {
            let mut b = body.clone();
            b.input = b.input.iter().map(rename).collect();
            b.output = b.output.iter().map(rename).collect();
            b.name = Some(node_name(body, k));
            b.attribute = body
                .attribute
                .iter()
                .filter_map(|a| {
                    let Some(r) = a.ref_attr_name.as_deref().filter(|r| !r.is_empty()) else {
                        return Some(a.clone());
                    };
                    let given = n
                        .attribute
                        .iter()
                        .chain(&f.attribute_proto)
                        .find(|x| x.name() == r)?;
                    let mut v = given.clone();
                    v.name = a.name.clone();
                    v.ref_attr_name = None;
                    Some(v)
                })
                .collect();
            self.node(b, depth + 1, stack, out);
        }
        stack.pop();
    }

    /// A prefix `base/inlinedK/` that no name in use starts with (reserved then).
    fn prefix(&mut self, base: &str) -> String {
        let mut k = self.calls;
        loop {
            let p = format!("{base}/inlined{k}/");
            if !self.prefixes.contains(&p) {
                self.reserve(&p[..p.len() - 1]);
                return p;
            }
            k += 1;
        }
    }
}
