//! The processes a test or benchmark started, and everything they started in turn, found and
//! signalled through `/proc`: the one process-tree killer of kiln's tests and benchmarks.

use std::collections::{HashMap, HashSet};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// Parent pid of a process, from /proc (None if it is gone).
fn parent_of(pid: i32) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // "pid (comm) state ppid ...": comm may hold spaces and parentheses.
    let rest = stat.get(stat.rfind(')')? + 1..)?;
    rest.split_whitespace().nth(1)?.parse().ok()
}

/// The command name of a process, from /proc.
pub fn comm_of(pid: i32) -> Option<String> {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .ok()
        .map(|s| s.trim().to_string())
}

/// Every live descendant of `root` (children, grandchildren, ...), from /proc.
pub fn descendants(root: i32) -> Vec<i32> {
    let mut children: HashMap<i32, Vec<i32>> = HashMap::new();
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for e in dir.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
                continue;
            };
            if let Some(ppid) = parent_of(pid) {
                children.entry(ppid).or_default().push(pid);
            }
        }
    }
    let mut out = Vec::new();
    let mut todo = vec![root];
    while let Some(p) = todo.pop() {
        for &c in children.get(&p).map(Vec::as_slice).unwrap_or(&[]) {
            out.push(c);
            todo.push(c);
        }
    }
    out
}

/// Freezes `root` and its descendants (so none can start new ones), then kills them all. Only
/// a process the caller started and what it spawned are touched: `root` is a child of the
/// caller that has not been reaped, so its pid cannot belong to anyone else.
pub fn kill_tree(root: i32) {
    let mut seen: HashSet<i32> = HashSet::new();
    let _ = kill(Pid::from_raw(root), Signal::SIGSTOP);
    seen.insert(root);
    // Freeze the tree level by level until no new process shows up.
    loop {
        let found: Vec<i32> = seen
            .iter()
            .flat_map(|&p| descendants(p))
            .filter(|p| !seen.contains(p))
            .collect();
        if found.is_empty() {
            break;
        }
        for p in found {
            let _ = kill(Pid::from_raw(p), Signal::SIGSTOP);
            seen.insert(p);
        }
    }
    for &p in &seen {
        let _ = kill(Pid::from_raw(p), Signal::SIGKILL);
    }
}

/// Sends `sig` to `root` and every live descendant; returns the pids signalled.
pub fn signal_tree(root: i32, sig: Signal) -> Vec<i32> {
    let mut pids = vec![root];
    pids.extend(descendants(root));
    for &p in &pids {
        let _ = kill(Pid::from_raw(p), sig);
    }
    pids
}
