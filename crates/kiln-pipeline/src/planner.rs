//! Planning the jobs of a build: matrix expansion, split steps' shards,
//! `when` filtering and the order of the jobs; and the checks on the job
//! graph shared with parsing.

use std::collections::{BTreeMap, HashMap, HashSet};

use kiln_domain::BranchPattern;

use crate::front::{cells_of, quote, unknown_job_message};
use crate::{
    FILE_NAME, JobPlan, MAX_JOBS, MAX_MATRIX_CELLS, MAX_NEEDS, MAX_PLANNED_STEPS, MAX_SHARDS,
    Pipeline, PipelineError, Shard, SplitDef, Step, graph,
};

/// Name of the job of a `steps:` file with several steps.
pub(crate) const SINGLE_JOB_NAME: &str = "pipeline";

/// What the checks on the job graph need to know about a job.
pub(crate) struct Shape<'a> {
    pub(crate) name: &'a str,
    pub(crate) deps: &'a [String],
    /// Number of matrix cells (1 without a matrix).
    pub(crate) cells: u64,
    /// Number of shards of its split step (1 without one).
    pub(crate) shards: u64,
    /// Number of steps.
    pub(crate) steps: usize,
}

/// The number of shards of a job whose steps have these split definitions:
/// that of its split step (the largest, for a pipeline with several), 1
/// without one.
pub(crate) fn shards_of<'a>(splits: impl IntoIterator<Item = Option<&'a SplitDef>>) -> u64 {
    splits
        .into_iter()
        .flatten()
        .map(|split| u64::from(split.shards))
        .max()
        .unwrap_or(1)
        .max(1)
}

/// Running totals of a file's jobs after matrix and shard expansion, against
/// [`MAX_JOBS`], [`MAX_PLANNED_STEPS`] and [`MAX_NEEDS`].
#[derive(Debug, Default)]
pub(crate) struct Budget {
    jobs: u64,
    steps: u64,
    needs: u64,
}

impl Budget {
    /// Adds job `name`, planned as `jobs` jobs (matrix cells times shards)
    /// of `steps` steps, whose dependencies are planned as `dep_jobs` jobs
    /// in all; the error is the message.
    pub(crate) fn add(
        &mut self,
        name: &str,
        jobs: u64,
        steps: u64,
        dep_jobs: u64,
    ) -> Result<(), String> {
        self.jobs = self.jobs.saturating_add(jobs);
        self.steps = self.steps.saturating_add(jobs.saturating_mul(steps));
        self.needs = self.needs.saturating_add(jobs.saturating_mul(dep_jobs));
        let name = quote(name);
        if self.jobs > MAX_JOBS as u64 {
            return Err(format!(
                "with job {name}, the file has more than {MAX_JOBS} jobs once the matrices \
                 are expanded and the split steps' shards counted"
            ));
        }
        if self.steps > MAX_PLANNED_STEPS as u64 {
            return Err(format!(
                "with job {name}, the jobs of the file have more than {MAX_PLANNED_STEPS} steps \
                 in all once the matrices are expanded and the split steps' shards counted \
                 (every cell of a matrix and every shard runs the steps of its job)"
            ));
        }
        if self.needs > MAX_NEEDS as u64 {
            return Err(format!(
                "with job {name}, the jobs of the file have more than {MAX_NEEDS} dependencies \
                 once the matrices are expanded and the split steps' shards counted (every \
                 cell or shard of a job depends on every cell and shard of each job in its \
                 `depends_on`)"
            ));
        }
        Ok(())
    }
}

/// Longest cycle quoted whole in a message, in jobs.
const MAX_CYCLE_SHOWN: usize = 8;

/// The message for a dependency cycle `[a, b, ..., a]` (`a` depends on `b`).
pub(crate) fn cycle_message(cycle: &[&str]) -> String {
    if let [a, b] = cycle
        && a == b
    {
        return format!("job {} depends on itself", quote(a));
    }
    let mut path: Vec<String> = cycle.iter().map(|name| quote(name)).collect();
    let jobs = cycle.len().saturating_sub(1);
    if jobs > MAX_CYCLE_SHOWN {
        path.drain(MAX_CYCLE_SHOWN - 1..cycle.len() - 1);
        path.insert(MAX_CYCLE_SHOWN - 1, "...".to_owned());
        return format!(
            "dependency cycle of {jobs} jobs: {} (each job depends on the next)",
            path.join(" -> ")
        );
    }
    format!(
        "dependency cycle: {} (each job depends on the next)",
        path.join(" -> ")
    )
}

/// Checks the job graph: unique names, known dependencies, no cycle, and the
/// expansion limits. Returns the dependencies of every job as indices
/// (without repetitions, in `depends_on` order) and the jobs in their
/// planning order: topological, file order among the ready jobs.
pub(crate) fn check_graph(shapes: &[Shape<'_>]) -> Result<(Vec<Vec<usize>>, Vec<usize>), String> {
    let mut index = HashMap::with_capacity(shapes.len());
    for (i, shape) in shapes.iter().enumerate() {
        if index.insert(shape.name, i).is_some() {
            return Err(format!("duplicate job name {}", quote(shape.name)));
        }
    }
    let names: Vec<String> = shapes.iter().map(|s| s.name.to_owned()).collect();
    // `mark[j] == i + 1`: job `j` is already a dependency of job `i`.
    let mut mark = vec![0usize; shapes.len()];
    let mut deps = Vec::with_capacity(shapes.len());
    for (i, shape) in shapes.iter().enumerate() {
        let mut list = Vec::new();
        for dep in shape.deps {
            let Some(&j) = index.get(dep.as_str()) else {
                return Err(format!(
                    "job {}: {}",
                    quote(shape.name),
                    unknown_job_message(dep, &names)
                ));
            };
            if mark[j] != i + 1 {
                mark[j] = i + 1;
                list.push(j);
            }
        }
        deps.push(list);
    }
    let order = graph::topo_order(&deps).map_err(|cycle| {
        let cycle: Vec<&str> = cycle.iter().map(|&i| shapes[i].name).collect();
        cycle_message(&cycle)
    })?;
    let planned = |shape: &Shape<'_>| shape.cells.saturating_mul(shape.shards);
    let mut budget = Budget::default();
    for (shape, list) in shapes.iter().zip(&deps) {
        let dep_jobs = list
            .iter()
            .fold(0u64, |sum, &d| sum.saturating_add(planned(&shapes[d])));
        let steps = u64::try_from(shape.steps).unwrap_or(u64::MAX);
        budget.add(shape.name, planned(shape), steps, dep_jobs)?;
    }
    Ok((deps, order))
}

/// An error of [`plan`]: about the pipeline, not a place in the file.
fn invalid(message: String) -> PipelineError {
    PipelineError::Invalid {
        file: FILE_NAME.to_owned(),
        line: None,
        column: None,
        message,
    }
}

/// The labels of a job: the union of its steps' labels.
fn job_labels(job: &str, steps: &[Step]) -> Result<BTreeMap<String, String>, PipelineError> {
    let mut first: BTreeMap<&str, (&str, &str)> = BTreeMap::new();
    for step in steps {
        for (key, value) in &step.labels {
            match first.get(key.as_str()) {
                Some(&(old, by)) if old != value => {
                    return Err(invalid(format!(
                        "job {}: steps {} and {} need different values of the runner \
                         label {}: {} and {}",
                        quote(job),
                        quote(by),
                        quote(&step.name),
                        quote(key),
                        quote(old),
                        quote(value)
                    )));
                }
                Some(_) => {}
                None => {
                    first.insert(key, (value, &step.name));
                }
            }
        }
    }
    Ok(first
        .into_iter()
        .map(|(key, (value, _))| (key.to_owned(), value.to_owned()))
        .collect())
}

/// One cell of a job's matrix: its job name and its variables.
struct Cell {
    name: String,
    vars: Vec<(String, String)>,
}

/// The cells of a job, the first axis (in key order) varying slowest.
fn cells(name: &str, matrix: &BTreeMap<String, Vec<String>>) -> Vec<Cell> {
    if matrix.is_empty() {
        return vec![Cell {
            name: name.to_owned(),
            vars: Vec::new(),
        }];
    }
    let axes: Vec<(&String, &Vec<String>)> = matrix.iter().collect();
    let mut at = vec![0usize; axes.len()];
    let mut out = Vec::new();
    loop {
        let picked: Vec<(&String, &String)> = axes
            .iter()
            .zip(&at)
            .map(|((axis, values), &i)| (*axis, &values[i]))
            .collect();
        let label: Vec<String> = picked.iter().map(|(a, v)| format!("{a}={v}")).collect();
        out.push(Cell {
            name: format!("{name} ({})", label.join(", ")),
            vars: picked
                .iter()
                .map(|(a, v)| (a.to_ascii_uppercase(), (*v).clone()))
                .collect(),
        });
        // Next combination: the last axis varies fastest.
        let mut k = axes.len();
        loop {
            if k == 0 {
                return out;
            }
            k -= 1;
            at[k] += 1;
            if at[k] < axes[k].1.len() {
                break;
            }
            at[k] = 0;
        }
    }
}

/// The split step of a job, if any, as `(step name, shards)`; checks what
/// [`crate::parse`] guarantees (for a pipeline built by hand): at most one
/// split step, not a post step, 1 to [`MAX_SHARDS`] shards.
fn split_step<'a>(job: &str, steps: &'a [Step]) -> Result<Option<(&'a str, u32)>, PipelineError> {
    let mut found: Option<(&str, u32)> = None;
    for step in steps {
        let Some(split) = &step.split else {
            continue;
        };
        if let Some((first, _)) = found {
            return Err(invalid(format!(
                "job {}: steps {} and {} are both split; a job has at most one split step",
                quote(job),
                quote(first),
                quote(&step.name)
            )));
        }
        if step.post.is_some() {
            return Err(invalid(format!(
                "job {}: step {} is a post step and a split step",
                quote(job),
                quote(&step.name)
            )));
        }
        if !(1..=MAX_SHARDS).contains(&split.shards) {
            return Err(invalid(format!(
                "job {}: step {} has {} shards, expected 1 to {MAX_SHARDS}",
                quote(job),
                quote(&step.name),
                split.shards
            )));
        }
        found = Some((&step.name, split.shards));
    }
    Ok(found)
}

/// One planned job of a cell: its name and shard.
struct Planned {
    name: String,
    shard: Option<Shard>,
}

/// The jobs a job (or a matrix cell) named `name` is planned as: one, or
/// one per shard of its split step. The split's key is `job/step` in a
/// `jobs:` file (`job` with its matrix values) and the step's name alone in a
/// `steps:` file (`in_jobs` false), whose one job's name changes with the
/// number of steps: the key, which names the units' recorded history, must
/// not.
fn shards(name: &str, in_jobs: bool, split: Option<(&str, u32)>) -> Vec<Planned> {
    let Some((step, count)) = split else {
        return vec![Planned {
            name: name.to_owned(),
            shard: None,
        }];
    };
    let key = if in_jobs {
        format!("{name}/{step}")
    } else {
        step.to_owned()
    };
    (0..count)
        .map(|index| Planned {
            name: if count == 1 {
                name.to_owned()
            } else {
                format!("{name} [{}/{count}]", index + 1)
            },
            shard: Some(Shard {
                index,
                count,
                key: key.clone(),
            }),
        })
        .collect()
}

/// See [`crate::plan`].
pub(crate) fn plan(p: &Pipeline, branch: &str) -> Result<Vec<JobPlan>, PipelineError> {
    if p.jobs.is_empty() {
        let name = match p.steps.as_slice() {
            [] => return Err(invalid("the pipeline has no steps".to_owned())),
            [only] => only.name.clone(),
            _ => SINGLE_JOB_NAME.to_owned(),
        };
        let labels = job_labels(&name, &p.steps)?;
        let split = split_step(&name, &p.steps)?;
        let jobs = split.map_or(1, |(_, count)| u64::from(count));
        let steps = u64::try_from(p.steps.len()).unwrap_or(u64::MAX);
        Budget::default()
            .add(&name, jobs, steps, 0)
            .map_err(invalid)?;
        return Ok(shards(&name, false, split)
            .into_iter()
            .map(|planned| JobPlan {
                name: planned.name,
                steps: p.steps.clone(),
                labels: labels.clone(),
                needs: Vec::new(),
                shard: planned.shard,
            })
            .collect());
    }
    if !p.steps.is_empty() {
        return Err(invalid(
            "the pipeline has both `steps` and `jobs`".to_owned(),
        ));
    }
    let mut splits = Vec::with_capacity(p.jobs.len());
    for job in &p.jobs {
        if job.steps.is_empty() {
            return Err(invalid(format!("job {} has no steps", quote(&job.name))));
        }
        if let Some((axis, _)) = job.matrix.iter().find(|(_, values)| values.is_empty()) {
            return Err(invalid(format!(
                "matrix axis {} of job {} has no values",
                quote(axis),
                quote(&job.name)
            )));
        }
        let cells = cells_of(&job.matrix);
        if cells > MAX_MATRIX_CELLS as u64 {
            return Err(invalid(format!(
                "the matrix of job {} has {cells} cells, more than the limit of {MAX_MATRIX_CELLS}",
                quote(&job.name)
            )));
        }
        splits.push(split_step(&job.name, &job.steps)?);
    }
    let shapes: Vec<Shape<'_>> = p
        .jobs
        .iter()
        .zip(&splits)
        .map(|(job, split)| Shape {
            name: &job.name,
            deps: &job.depends_on,
            cells: cells_of(&job.matrix),
            shards: split.map_or(1, |(_, count)| u64::from(count)),
            steps: job.steps.len(),
        })
        .collect();
    let (deps, order) = check_graph(&shapes).map_err(invalid)?;

    // A job is planned when its `when` holds and all its dependencies are
    // planned; `order` visits the dependencies first.
    let mut included = vec![false; p.jobs.len()];
    for &i in &order {
        let job = &p.jobs[i];
        let wanted = job.when.as_ref().is_none_or(|when| {
            !branch.is_empty()
                && when
                    .branch
                    .iter()
                    .any(|pattern| BranchPattern::new(pattern).is_ok_and(|p| p.matches(branch)))
        });
        included[i] = wanted && deps[i].iter().all(|&d| included[d]);
    }
    // The planned jobs of every job: its cells, each as its shards.
    let planned: Vec<Vec<(Cell, Vec<Planned>)>> = p
        .jobs
        .iter()
        .zip(&included)
        .zip(&splits)
        .map(|((job, &included), &split)| {
            if included {
                cells(&job.name, &job.matrix)
                    .into_iter()
                    .map(|cell| {
                        let shards = shards(&cell.name, true, split);
                        (cell, shards)
                    })
                    .collect()
            } else {
                Vec::new()
            }
        })
        .collect();

    let mut names = HashSet::new();
    let mut out = Vec::new();
    for &i in order.iter().filter(|&&i| included[i]) {
        let job = &p.jobs[i];
        let needs: Vec<String> = deps[i]
            .iter()
            .flat_map(|&d| {
                planned[d]
                    .iter()
                    .flat_map(|(_, shards)| shards.iter().map(|s| s.name.clone()))
            })
            .collect();
        for (cell, shards) in &planned[i] {
            let steps: Vec<Step> = job
                .steps
                .iter()
                .map(|step| {
                    let mut step = step.clone();
                    step.env.extend(cell.vars.iter().cloned());
                    step
                })
                .collect();
            let labels = job_labels(&cell.name, &steps)?;
            for shard in shards {
                if !names.insert(shard.name.as_str()) {
                    return Err(invalid(format!(
                        "two jobs of the plan are named {}",
                        quote(&shard.name)
                    )));
                }
                out.push(JobPlan {
                    name: shard.name.clone(),
                    steps: steps.clone(),
                    labels: labels.clone(),
                    needs: needs.clone(),
                    shard: shard.shard.clone(),
                });
            }
        }
    }
    Ok(out)
}
