//! The plan: an experiment's stages expanded by their matrices into a DAG of nodes (petgraph).
//!
//! A node's id is `stage[key=value,...]` with the matrix keys in declaration order. A reference in `from`
//! selects nodes of another stage: explicitly by `[key=value]` (values may interpolate the node's own matrix
//! values, `{fold}`), and implicitly by every matrix key the two stages share (so `evaluate` over the same matrix
//! as `finetune` pairs up node by node, and a stage without that key fans in over all of them).

pub mod key;

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};

use petgraph::graph::{DiGraph, NodeIndex};
use petgraph::Direction;

use crate::error::{Error, Result};
use crate::experiment::{Experiment, MatrixValue};

pub struct Node {
    pub id: String,
    /// Index into `Experiment::stages`.
    pub stage: usize,
    pub matrix: Vec<(String, MatrixValue)>,
    /// Input nodes in `from` order (each reference's matches in their own order), without repeats.
    pub inputs: Vec<usize>,
    /// Deterministic seed from the experiment seed and the node id (fits 32 bits so every RNG accepts it).
    pub seed: u64,
}

impl Node {
    pub fn matrix_value(&self, key: &str) -> Option<&MatrixValue> {
        self.matrix.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }
}

pub struct Plan {
    pub nodes: Vec<Node>,
    /// Edges input → consumer; node weights are indices into `nodes`.
    pub graph: DiGraph<usize, ()>,
    /// Node indices in a topological order (inputs before consumers, stable within a stage).
    pub order: Vec<usize>,
    /// Length of the longest path from the node to a sink, counted in nodes (the scheduler's priority).
    pub priority: Vec<u32>,
    by_id: HashMap<String, usize>,
}

impl Plan {
    pub fn build(exp: &Experiment) -> Result<Plan> {
        check_size(exp)?;
        let mut nodes: Vec<Node> = Vec::new();
        let mut stage_nodes: Vec<Vec<usize>> = Vec::new();
        for (si, stage) in exp.stages.iter().enumerate() {
            let mut ids = Vec::new();
            for combo in cartesian(&stage.matrix) {
                let id = node_id(&stage.name, &combo);
                let seed = node_seed(exp.seed, &id);
                ids.push(nodes.len());
                nodes.push(Node { id, stage: si, matrix: combo, inputs: Vec::new(), seed });
            }
            stage_nodes.push(ids);
        }

        // Matrix values as text, once: references compare them for every pair of nodes (O(n²) at 2,000 nodes).
        let texts: Vec<Vec<(String, String)>> =
            nodes.iter().map(|n| n.matrix.iter().map(|(k, v)| (k.clone(), v.to_string())).collect()).collect();
        let stage_index: HashMap<&str, usize> =
            exp.stages.iter().enumerate().map(|(i, s)| (s.name.as_str(), i)).collect();
        #[allow(clippy::needless_range_loop)] // `nodes` is read for other nodes inside the loop
        for ni in 0..nodes.len() {
            let stage = &exp.stages[nodes[ni].stage];
            let mut inputs = Vec::new();
            for r in &stage.refs {
                let target = stage_index[r.stage.as_str()];
                let target_decl = &exp.stages[target];
                let lookup = |name: &str| nodes[ni].matrix_value(name).map(|v| vec![v.to_string()]);
                let mut want: Vec<(String, String)> = Vec::new();
                for (k, tpl) in &r.select {
                    let v = tpl
                        .render_string(&lookup)
                        .map_err(|e| exp.source.error(r.span.clone(), format!("reference `{}`: {e}", r.text), None))?;
                    want.push((k.clone(), v));
                }
                for (k, v) in &nodes[ni].matrix {
                    if target_decl.has_matrix_key(k) && !want.iter().any(|(wk, _)| wk == k) {
                        want.push((k.clone(), v.to_string()));
                    }
                }
                let matches: Vec<usize> = stage_nodes[target]
                    .iter()
                    .copied()
                    .filter(|&t| want.iter().all(|(k, v)| texts[t].iter().any(|(tk, tv)| tk == k && tv == v)))
                    .collect();
                if matches.is_empty() && !r.optional {
                    let wanted: Vec<String> = want.iter().map(|(k, v)| format!("{k}={v}")).collect();
                    let available: Vec<String> = target_decl
                        .matrix
                        .iter()
                        .map(|(k, vs)| {
                            format!("{k} ∈ {{{}}}", vs.iter().map(|v| v.to_string()).collect::<Vec<_>>().join(", "))
                        })
                        .collect();
                    return Err(exp.source.error(
                        r.span.clone(),
                        format!(
                            "reference `{}` of node `{}` matches no node of stage `{}` (wanted {})",
                            r.text,
                            nodes[ni].id,
                            r.stage,
                            wanted.join(", ")
                        ),
                        Some(format!(
                            "stage `{}` has {}; end the reference with `?` if some nodes have no such input",
                            r.stage,
                            available.join(" × ")
                        )),
                    ));
                }
                for m in matches {
                    if !inputs.contains(&m) {
                        inputs.push(m);
                    }
                }
            }
            nodes[ni].inputs = inputs;
        }

        let mut graph = DiGraph::<usize, ()>::with_capacity(nodes.len(), nodes.len() * 2);
        for i in 0..nodes.len() {
            graph.add_node(i);
        }
        for (ni, n) in nodes.iter().enumerate() {
            for &i in &n.inputs {
                graph.add_edge(NodeIndex::new(i), NodeIndex::new(ni), ());
            }
        }
        let order = topological_order(&graph).map_err(|cycle| {
            let ids: Vec<&str> = cycle.iter().map(|&i| nodes[i].id.as_str()).collect();
            Error::user(format!("the nodes form a cycle: {}", ids.join(" → ")))
        })?;
        let priority = longest_remaining_paths(&graph, &order);
        let by_id = nodes.iter().enumerate().map(|(i, n)| (n.id.clone(), i)).collect();
        Ok(Plan { nodes, graph, order, priority, by_id })
    }

    /// Finds a node by id, tolerating spaces after commas and around `=`.
    pub fn find(&self, id: &str) -> Option<usize> {
        let normalised: String = id.chars().filter(|c| !c.is_whitespace()).collect();
        self.by_id.get(&normalised).copied()
    }

    /// The nodes that read node `i`'s output.
    pub fn consumers(&self, i: usize) -> impl Iterator<Item = usize> + '_ {
        self.graph.neighbors_directed(NodeIndex::new(i), Direction::Outgoing).map(|n| n.index())
    }

    /// All node ids, for "did you mean" hints.
    pub fn ids(&self) -> impl Iterator<Item = &str> {
        self.nodes.iter().map(|n| n.id.as_str())
    }
}

fn node_id(stage: &str, combo: &[(String, MatrixValue)]) -> String {
    if combo.is_empty() {
        return stage.to_string();
    }
    let parts: Vec<String> = combo.iter().map(|(k, v)| format!("{k}={v}")).collect();
    format!("{stage}[{}]", parts.join(","))
}

/// Kahn's algorithm over the graph, smallest node index first: inputs before consumers, and otherwise the
/// order of the file (stage by stage, matrix order), so listings are stable. On a cycle, returns one (the
/// stage graph is checked for cycles while parsing, so this guards the node expansion).
fn topological_order(graph: &DiGraph<usize, ()>) -> Result<Vec<usize>, Vec<usize>> {
    let n = graph.node_count();
    let mut indegree: Vec<usize> =
        graph.node_indices().map(|v| graph.neighbors_directed(v, Direction::Incoming).count()).collect();
    let mut heap: BinaryHeap<Reverse<usize>> = (0..n).filter(|&i| indegree[i] == 0).map(Reverse).collect();
    let mut order = Vec::with_capacity(n);
    while let Some(Reverse(i)) = heap.pop() {
        order.push(i);
        for c in graph.neighbors_directed(NodeIndex::new(i), Direction::Outgoing) {
            indegree[c.index()] -= 1;
            if indegree[c.index()] == 0 {
                heap.push(Reverse(c.index()));
            }
        }
    }
    if order.len() == n {
        return Ok(order);
    }
    let scc = petgraph::algo::tarjan_scc(graph).into_iter().find(|c| c.len() > 1 || graph.contains_edge(c[0], c[0]));
    let mut cycle: Vec<usize> = scc.unwrap_or_default().into_iter().map(|v| v.index()).collect();
    cycle.sort();
    if let Some(&first) = cycle.first() {
        cycle.push(first);
    }
    Err(cycle)
}

/// For each node, the number of nodes on the longest path from it to a sink (the scheduler's priority).
fn longest_remaining_paths(graph: &DiGraph<usize, ()>, order: &[usize]) -> Vec<u32> {
    let mut priority = vec![1u32; order.len()];
    for &n in order.iter().rev() {
        let below = graph.neighbors_directed(NodeIndex::new(n), Direction::Outgoing).map(|c| priority[c.index()]).max();
        priority[n] = 1 + below.unwrap_or(0);
    }
    priority
}

/// Seed of a node: blake3 of the experiment seed and the node id, reduced to 32 bits.
pub fn node_seed(experiment_seed: u64, id: &str) -> u64 {
    let mut h = blake3::Hasher::new();
    h.update(b"mpcs-node-seed\0");
    h.update(&experiment_seed.to_le_bytes());
    h.update(id.as_bytes());
    let b = h.finalize();
    u64::from(u32::from_le_bytes([b.as_bytes()[0], b.as_bytes()[1], b.as_bytes()[2], b.as_bytes()[3]]))
}

/// The most nodes an experiment may expand to (the paper's largest is 179; 20,000 takes seconds to plan).
pub const MAX_NODES: u64 = 20_000;

/// Counts the expansion before building it: a matrix of 10 keys × 10 values would otherwise take all memory.
fn check_size(exp: &Experiment) -> Result<()> {
    let count =
        |s: &crate::experiment::StageDecl| s.matrix.iter().fold(1u64, |n, (_, v)| n.saturating_mul(v.len() as u64));
    let total = exp.stages.iter().map(count).fold(0u64, u64::saturating_add);
    if total <= MAX_NODES {
        return Ok(());
    }
    let Some(big) = exp.stages.iter().max_by_key(|s| count(s)) else { return Ok(()) };
    let axes: Vec<String> = big.matrix.iter().map(|(k, v)| format!("{k} ({})", v.len())).collect();
    Err(exp.source.error(
        big.span.clone(),
        format!(
            "the experiment expands to {total} nodes, more than the {MAX_NODES} mpcs plans; stage `{}` alone has {} \
             ({})",
            big.name,
            count(big),
            axes.join(" × ")
        ),
        Some(
            "a matrix makes one node per combination of its values: drop axes or values, or split the experiment"
                .into(),
        ),
    ))
}

/// Every combination of the matrix axes, first axis outermost.
fn cartesian(matrix: &[(String, Vec<MatrixValue>)]) -> Vec<Vec<(String, MatrixValue)>> {
    let mut out = vec![Vec::new()];
    for (k, values) in matrix {
        let mut next = Vec::with_capacity(out.len() * values.len());
        for prefix in &out {
            for v in values {
                let mut combo = prefix.clone();
                combo.push((k.clone(), v.clone()));
                next.push(combo);
            }
        }
        out = next;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_seeds_are_stable_distinct_and_follow_the_experiment_seed() {
        let a = node_seed(47, "finetune[fold=0]");
        assert_eq!(a, node_seed(47, "finetune[fold=0]"));
        assert_ne!(a, node_seed(47, "finetune[fold=1]"));
        assert_ne!(a, node_seed(48, "finetune[fold=0]"));
        assert!(a < 1 << 32, "fits every RNG's seed type");
    }

    #[test]
    fn order_priorities_and_cycles_come_from_the_graph() {
        // 0 → 1 → 3, 0 → 2, 2 → 3; 4 alone.
        let mut g = DiGraph::<usize, ()>::new();
        let v: Vec<NodeIndex> = (0..5).map(|i| g.add_node(i)).collect();
        for (a, b) in [(0, 1), (1, 3), (0, 2), (2, 3)] {
            g.add_edge(v[a], v[b], ());
        }
        let order = topological_order(&g).unwrap();
        assert_eq!(order, vec![0, 1, 2, 3, 4], "inputs first, otherwise file order");
        assert_eq!(longest_remaining_paths(&g, &order), vec![3, 2, 2, 1, 1]);
        g.add_edge(v[3], v[1], ());
        assert_eq!(topological_order(&g).unwrap_err(), vec![1, 3, 1], "the cycle is named");
    }
}
