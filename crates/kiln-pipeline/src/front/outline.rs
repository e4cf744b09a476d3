//! The outline of the jobs (names, dependencies, matrix cells, steps,
//! shards), read leniently from the tree before the validation pass, so
//! that it reports an unknown dependency or a cycle at the offending
//! `depends_on` value and a file that expands to too many jobs at the key
//! of the job that goes over the limit, although both depend on jobs
//! further down. Anything of an unexpected type counts as empty; only a
//! key or a dependency that is not a scalar makes the outline unknown
//! (`None`): the pass then reports that shape error, and checks the graph
//! at the end of `jobs` (see [`crate::planner::check_graph`]). Of a job or
//! a key given twice, the first counts, as the pass reads it before it
//! refuses the second.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};

use super::yaml::{Kind, N, Node, scalar};
use crate::{MAX_SHARDS, graph};

/// The jobs of a file, in file order.
#[derive(Debug, Default)]
pub(crate) struct Outline {
    pub(super) names: Vec<String>,
    index: HashMap<String, usize>,
    pub(super) deps: Vec<Vec<usize>>,
    pub(super) cells: Vec<u64>,
    pub(super) steps: Vec<u64>,
    shards: Vec<u64>,
    comp: Vec<usize>,
}

/// The text of a key or name, `None` for a collection.
fn text<'a>(n: &'a N) -> Option<Cow<'a, str>> {
    scalar(n).map(|s| s.text)
}

/// The entries of a mapping (first definitions), `None` if a key is not a
/// scalar; empty for anything else than a mapping.
fn entries<'a>(n: &'a N<'a>) -> Option<Vec<(Cow<'a, str>, &'a N<'a>)>> {
    let Node::Map(map) = &n.value else {
        return Some(Vec::new());
    };
    let mut out: Vec<(Cow<'a, str>, &N)> = Vec::new();
    for (k, v) in map {
        let key = text(k)?;
        if out.iter().all(|(seen, _)| *seen != key) {
            out.push((key, v));
        }
    }
    Some(out)
}

impl Outline {
    /// The outline of the document `doc` of text `t`.
    pub(crate) fn read(doc: &N) -> Option<Self> {
        let top = entries(doc)?;
        let jobs = match top.iter().find(|(k, _)| k == "jobs") {
            Some((_, jobs)) => entries(jobs)?,
            None => Vec::new(),
        };
        let mut outline = Self::default();
        let mut raw_deps = Vec::new();
        for (name, job) in jobs {
            let (mut deps, mut cells, mut steps, mut shards) = (Vec::new(), 1u64, 0u64, 1u64);
            for (key, v) in entries(job)? {
                match (&*key, &v.value) {
                    ("depends_on", Node::Seq(items)) => {
                        for item in items {
                            deps.push(text(item)?.into_owned());
                        }
                    }
                    ("depends_on", Node::Scalar(..)) => {
                        if let Some(s) = scalar(v).filter(|s| s.kind == Kind::Str) {
                            deps.push(s.text.into_owned());
                        }
                    }
                    ("matrix", _) => {
                        for (_, values) in entries(v)? {
                            let count = match &values.value {
                                Node::Seq(items) => items.len() as u64,
                                _ => 0,
                            };
                            cells = cells.saturating_mul(count);
                        }
                    }
                    ("steps", Node::Seq(items)) => {
                        steps = items.len() as u64;
                        for step in items {
                            let parallel = entries(step)?
                                .into_iter()
                                .find(|(k, _)| k == "parallel")
                                .and_then(|(_, p)| match scalar(p)?.kind {
                                    Kind::Int(i) => u64::try_from(i).ok(),
                                    _ => None,
                                })
                                .filter(|p| (1..=u64::from(MAX_SHARDS)).contains(p))
                                .unwrap_or(1);
                            shards = shards.max(parallel);
                        }
                    }
                    _ => {}
                }
            }
            outline.index.insert(name.to_string(), outline.names.len());
            outline.names.push(name.into_owned());
            raw_deps.push(deps);
            outline.cells.push(cells);
            outline.steps.push(steps);
            outline.shards.push(shards);
        }
        for deps in raw_deps {
            let mut seen = HashSet::new();
            let deps = deps
                .iter()
                .filter_map(|d| outline.index.get(d).copied())
                .filter(|&d| seen.insert(d))
                .collect();
            outline.deps.push(deps);
        }
        outline.comp = graph::components(&outline.deps);
        Some(outline)
    }

    /// The index of the job `name`.
    pub(crate) fn job(&self, name: &str) -> Option<usize> {
        self.index.get(name).copied()
    }

    /// Number of jobs job `i` is planned as: cells times shards.
    pub(crate) fn planned(&self, i: usize) -> u64 {
        self.cells[i].saturating_mul(self.shards[i])
    }

    /// If job `from` depending on job `to` closes a cycle, the cycle as job
    /// names, `[from, to, ..., from]`.
    pub(crate) fn cycle(&self, from: usize, to: usize) -> Option<Vec<&str>> {
        if !graph::on_cycle(&self.comp, from, to) {
            return None;
        }
        let mut cycle = vec![from];
        cycle.extend(graph::path(&self.deps, to, from)?);
        Some(cycle.into_iter().map(|i| self.names[i].as_str()).collect())
    }
}
