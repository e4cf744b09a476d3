//! Feasibility probe for issue 11 item 5: how many of the error fixtures
//! (`tests/fixtures/errors/*.yml`) would serde-saphyr, reading a derived
//! mirror of the schema (`deny_unknown_fields`, no checks beyond types),
//! refuse at the same line:column as today's parser (its snapshot)?
//!
//! ```text
//! cargo run -p kiln-pipeline --example saphyr_parity
//! ```
//!
//! Prints, per fixture, `same`, `moved` (today's location, serde-saphyr's,
//! and both messages) or `accepted` (the error would have to come from a
//! validation pass over spans), then the counts.

use std::collections::BTreeMap;

use serde::Deserialize;

#[derive(Deserialize)]
#[serde(untagged)]
#[allow(dead_code)]
enum OneOrMany {
    One(Option<String>),
    Many(Vec<Option<String>>),
}

type Texts = BTreeMap<String, Option<String>>;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct Doc {
    version: Option<String>,
    env: Option<Texts>,
    labels: Option<Texts>,
    timeout: Option<String>,
    steps: Option<Vec<Step>>,
    jobs: Option<BTreeMap<String, Job>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct Job {
    steps: Vec<Step>,
    depends_on: Option<OneOrMany>,
    matrix: Option<BTreeMap<String, Vec<Option<String>>>>,
    env: Option<Texts>,
    labels: Option<Texts>,
    timeout: Option<String>,
    when: Option<When>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct When {
    branch: OneOrMany,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct Step {
    name: Option<String>,
    run: Option<OneOrMany>,
    env: Option<Texts>,
    timeout: Option<String>,
    labels: Option<Texts>,
    post: Option<String>,
    parallel: Option<i64>,
    units: Option<Units>,
    retry: Option<Retry>,
    interaction: Option<String>,
    junit: Option<OneOrMany>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct Units {
    glob: Option<OneOrMany>,
    command: Option<String>,
    strategy: Option<String>,
    max_batch: Option<i64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct Retry {
    attempts: Option<i64>,
    max_failures: Option<String>,
    budget: Option<String>,
    shards: Option<i64>,
}

fn main() {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/tests");
    let Ok(dir) = std::fs::read_dir(format!("{root}/fixtures/errors")) else {
        eprintln!("no fixtures under {root}");
        std::process::exit(1);
    };
    let mut paths: Vec<_> = dir.filter_map(|e| e.ok().map(|e| e.path())).collect();
    paths.sort();
    let (mut same, mut moved, mut accepted) = (0, 0, 0);
    for path in paths {
        let name = path
            .file_name()
            .map_or(String::new(), |n| n.to_string_lossy().into_owned());
        let Ok(text) = std::fs::read_to_string(&path) else {
            continue;
        };
        let today = match kiln_pipeline::parse(kiln_pipeline::FILE_NAME, &text) {
            Err(e) => (e.line(), e.column(), e.to_string()),
            Ok(_) => continue,
        };
        let options = serde_saphyr::options! { null_as_string: true };
        match serde_saphyr::from_str_with_options::<Doc>(&text, options) {
            Ok(_) => {
                accepted += 1;
                println!("accepted {name}: {}", today.2);
            }
            Err(e) => {
                let loc = e
                    .location()
                    .map(|l| (l.line() as usize, l.column() as usize));
                let theirs = e.to_string();
                let first = theirs.lines().next().unwrap_or("");
                if loc == today.0.zip(today.1) {
                    same += 1;
                    println!("same     {name}: {} | {first}", today.2);
                } else {
                    moved += 1;
                    println!("moved    {name}: {} | {loc:?} {first}", today.2);
                }
            }
        }
    }
    println!("same {same}, moved {moved}, accepted (left to validation) {accepted}");
}
