//! Dependency graphs of jobs, as adjacency lists: `deps[i]` holds the
//! indices of the jobs that job `i` depends on. Everything here is iterative
//! and linear (or `n log n`) in the size of the graph, so a hostile file
//! with thousands of jobs costs little.

use std::collections::{BTreeSet, VecDeque};

/// The strongly connected component of every node (Tarjan's algorithm,
/// without recursion): two nodes share a component when each reaches the
/// other.
pub(crate) fn components(deps: &[Vec<usize>]) -> Vec<usize> {
    const NONE: usize = usize::MAX;
    let n = deps.len();
    let mut index = vec![NONE; n];
    let mut low = vec![0; n];
    let mut on_stack = vec![false; n];
    let mut stack = Vec::new();
    let mut comp = vec![NONE; n];
    let mut next_index = 0;
    let mut next_comp = 0;
    // The simulated call stack: (node, position of its next edge).
    let mut calls: Vec<(usize, usize)> = Vec::new();
    for root in 0..n {
        if index[root] != NONE {
            continue;
        }
        index[root] = next_index;
        low[root] = next_index;
        next_index += 1;
        stack.push(root);
        on_stack[root] = true;
        calls.push((root, 0));
        while let Some(&(v, edge)) = calls.last() {
            if let Some(&w) = deps[v].get(edge) {
                if let Some(top) = calls.last_mut() {
                    top.1 += 1;
                }
                if w >= n {
                    continue;
                }
                if index[w] == NONE {
                    index[w] = next_index;
                    low[w] = next_index;
                    next_index += 1;
                    stack.push(w);
                    on_stack[w] = true;
                    calls.push((w, 0));
                } else if on_stack[w] {
                    low[v] = low[v].min(index[w]);
                }
                continue;
            }
            calls.pop();
            if let Some(&(parent, _)) = calls.last() {
                low[parent] = low[parent].min(low[v]);
            }
            if low[v] == index[v] {
                while let Some(w) = stack.pop() {
                    on_stack[w] = false;
                    comp[w] = next_comp;
                    if w == v {
                        break;
                    }
                }
                next_comp += 1;
            }
        }
    }
    comp
}

/// Whether the dependency `from -> to` lies on a cycle, given the
/// [`components`].
pub(crate) fn on_cycle(comp: &[usize], from: usize, to: usize) -> bool {
    from == to || comp[from] == comp[to]
}

/// A shortest path of dependencies from `start` to `goal`, both included.
pub(crate) fn path(deps: &[Vec<usize>], start: usize, goal: usize) -> Option<Vec<usize>> {
    let n = deps.len();
    let mut came_from = vec![usize::MAX; n];
    let mut queue = VecDeque::from([start]);
    came_from[start] = start;
    while let Some(v) = queue.pop_front() {
        if v == goal {
            let mut out = vec![goal];
            let mut at = goal;
            while at != start {
                at = came_from[at];
                out.push(at);
            }
            out.reverse();
            return Some(out);
        }
        for &w in &deps[v] {
            if w < n && came_from[w] == usize::MAX {
                came_from[w] = v;
                queue.push_back(w);
            }
        }
    }
    None
}

/// The jobs in a topological order (a job after all its dependencies),
/// taking among the ready jobs always the first in index order; or, if the
/// graph has a cycle, one cycle `[a, b, ..., a]` (`a` depends on `b`, ...),
/// starting at the first job in index order that lies on a cycle.
pub(crate) fn topo_order(deps: &[Vec<usize>]) -> Result<Vec<usize>, Vec<usize>> {
    let n = deps.len();
    let mut missing = vec![0usize; n];
    let mut dependents = vec![Vec::new(); n];
    for (i, list) in deps.iter().enumerate() {
        for &d in list {
            missing[i] += 1;
            dependents[d].push(i);
        }
    }
    let mut ready: BTreeSet<usize> = (0..n).filter(|&i| missing[i] == 0).collect();
    let mut order = Vec::with_capacity(n);
    while let Some(v) = ready.pop_first() {
        order.push(v);
        for &w in &dependents[v] {
            missing[w] -= 1;
            if missing[w] == 0 {
                ready.insert(w);
            }
        }
    }
    if order.len() == n {
        return Ok(order);
    }
    let comp = components(deps);
    for (i, list) in deps.iter().enumerate() {
        for &d in list {
            if on_cycle(&comp, i, d) {
                let mut cycle = vec![i];
                cycle.extend(path(deps, d, i).unwrap_or_default());
                return Err(cycle);
            }
        }
    }
    // Unreachable: a graph without a topological order has a cycle.
    Err(Vec::new())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn components_and_cycles() {
        // 0 -> 1 -> 2 -> 0, 3 -> 0, 4 -> 4
        let deps = vec![vec![1], vec![2], vec![0], vec![0], vec![4]];
        let comp = components(&deps);
        assert_eq!(comp[0], comp[1]);
        assert_eq!(comp[1], comp[2]);
        assert_ne!(comp[3], comp[0]);
        assert!(on_cycle(&comp, 2, 0));
        assert!(!on_cycle(&comp, 3, 0));
        assert!(on_cycle(&comp, 4, 4));
        assert_eq!(path(&deps, 1, 0), Some(vec![1, 2, 0]));
        assert_eq!(path(&deps, 0, 3), None);
        assert_eq!(topo_order(&deps), Err(vec![0, 1, 2, 0]));
    }

    #[test]
    fn order_prefers_index_order() {
        // 0 depends on 2; 1 free; 2 free.
        let deps = vec![vec![2], vec![], vec![]];
        assert_eq!(topo_order(&deps), Ok(vec![1, 2, 0]));
        let deps = vec![vec![], vec![0], vec![]];
        assert_eq!(topo_order(&deps), Ok(vec![0, 1, 2]));
    }

    #[test]
    fn long_chain_does_not_overflow_the_stack() {
        let n = 200_000;
        let mut deps: Vec<Vec<usize>> = (0..n).map(|i| vec![i + 1]).collect();
        deps[n - 1] = vec![0];
        let comp = components(&deps);
        assert!(comp.iter().all(|&c| c == comp[0]));
        deps[n - 1] = vec![];
        let order = topo_order(&deps).unwrap();
        assert_eq!(order[0], n - 1);
    }
}
