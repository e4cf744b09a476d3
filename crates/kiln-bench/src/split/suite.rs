//! The synthetic test suite of `kiln-bench split` and its deliberately wrong timing history.
//!
//! Everything here is a pure function of the seed (a `StdRng` from `rand` 0.9, pinned by
//! `Cargo.lock`), so a run can be repeated and every strategy sees the same suite. The design,
//! at scale 1:
//!
//! - 200 files `suite/f000.t` .. `suite/f199.t`, one unit each; each line is one test:
//!   `NAME DURATION_MS FLAKY_PERMILLE` (test names are unique in the suite).
//! - Ordinary files hold 2 to 8 tests (5 on average). Of their tests 90% take 10-90 ms and 10%
//!   100-500 ms (log-uniform in each range): most tests are tens of milliseconds.
//! - [`HEAVY_TESTS`] ordinary files get one more test of 1-4 s (log-uniform).
//! - Two files are much longer than the rest: 8 tests each, sized so that each is 95% of the
//!   suite's total divided by 16 (total about 90 s, each long file about 5.3 s). At N = 16 a
//!   good schedule puts each long file alone on a shard and packs the other files into the 14
//!   other shards (about total/16 each), so the lower bound max(total/N, longest) can nearly be
//!   reached; a hash split adds about a sixteenth of the other files to each long file's shard,
//!   about 1.8 x the bound.
//! - [`FLAKY_TESTS`] tests (in distinct ordinary files without a second-long test) fail with a
//!   probability of 0.2 to 0.6 per try; [`BROKEN_TESTS`] more (in other files) always fail
//!   (written as permille 1000). Both are active only in the flaky scenario.
//!
//! The timing history ([`history`]) records each unit's true duration (at the run's scale)
//! within +-10%, except: about 10% of the units are off by 5x (the longest second-long file is
//! recorded 5x too short, as a test that got slower since; another second-long file 5x too
//! long; 18 ordinary files 5x one way or the other, at random), and 5% (10 ordinary files) are
//! missing, as new files. The two long files are recorded correctly: with them wrong no
//! schedule made in advance or longest-first could come near the bound.

use std::collections::HashMap;

use kiln_domain::split::{Strategy, batch_len, median, static_shards};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

/// Files (units) in the suite.
pub const FILES: usize = 200;
/// Files with one test of 1-4 s.
pub const HEAVY_TESTS: usize = 10;
/// Flaky tests.
pub const FLAKY_TESTS: usize = 8;
/// Tests that always fail (flaky scenario).
pub const BROKEN_TESTS: usize = 2;
/// Tests in each long file.
const LONG_FILE_TESTS: u64 = 8;
/// Each long file is this share of total / 16.
const LONG_SHARE: f64 = 0.95;
/// Ordinary files recorded 5x off in the history.
const WRONG_ORDINARY: usize = 18;
/// Ordinary files missing from the history.
const MISSING: usize = 10;

/// One test.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Test {
    /// Unique in the suite.
    pub name: String,
    /// Its sleep at scale 1.
    pub ms: u64,
    /// Chance of failing a try, in thousandths (1000: always fails).
    pub flaky_permille: u32,
}

/// What part a file plays in the design.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Tens-of-milliseconds tests, a few of hundreds.
    Ordinary,
    /// An ordinary file with one test of 1-4 s.
    Heavy,
    /// One of the two long files.
    Long,
}

/// One file of the suite: one unit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct File {
    /// Path relative to the repository root, `suite/fNNN.t` (the unit id).
    pub path: String,
    /// Its part in the design.
    pub kind: Kind,
    /// Its tests, in order.
    pub tests: Vec<Test>,
}

impl File {
    /// Sum of its tests' sleeps at scale 1, ms.
    pub fn ms(&self) -> u64 {
        self.tests.iter().map(|t| t.ms).sum()
    }

    /// The file's text.
    pub fn text(&self) -> String {
        self.tests
            .iter()
            .map(|t| format!("{} {} {}\n", t.name, t.ms, t.flaky_permille))
            .collect()
    }
}

/// The generated suite.
#[derive(Debug, Clone)]
pub struct Suite {
    /// The seed it came from.
    pub seed: u64,
    /// Its files, `suite/f000.t` first.
    pub files: Vec<File>,
}

/// Log-uniform in `[lo, hi]`.
fn log_uniform(rng: &mut StdRng, lo: f64, hi: f64) -> u64 {
    let x: f64 = rng.random_range(lo.ln()..=hi.ln());
    x.exp().round() as u64
}

impl Suite {
    /// Generates the suite of `seed`.
    pub fn generate(seed: u64) -> Suite {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut files: Vec<File> = (0..FILES)
            .map(|i| {
                let n = rng.random_range(2..=8);
                let tests = (0..n)
                    .map(|j| Test {
                        name: format!("f{i:03}_t{j}"),
                        ms: if rng.random_bool(0.9) {
                            log_uniform(&mut rng, 10.0, 90.0)
                        } else {
                            log_uniform(&mut rng, 100.0, 500.0)
                        },
                        flaky_permille: 0,
                    })
                    .collect();
                File {
                    path: format!("suite/f{i:03}.t"),
                    kind: Kind::Ordinary,
                    tests,
                }
            })
            .collect();
        // Distinct files for every special role.
        let mut order: Vec<usize> = (0..FILES).collect();
        order.shuffle(&mut rng);
        let mut take = |n: usize| order.drain(..n).collect::<Vec<usize>>();
        let long = take(2);
        let heavy = take(HEAVY_TESTS);
        let flaky = take(FLAKY_TESTS);
        let broken = take(BROKEN_TESTS);
        for &i in &heavy {
            let f = &mut files[i];
            f.kind = Kind::Heavy;
            let j = f.tests.len();
            f.tests.push(Test {
                name: format!("f{i:03}_t{j}"),
                ms: log_uniform(&mut rng, 1000.0, 4000.0),
                flaky_permille: 0,
            });
        }
        for &i in &flaky {
            let f = &mut files[i];
            let j = rng.random_range(0..f.tests.len());
            f.tests[j].flaky_permille = rng.random_range(200..=600);
        }
        for &i in &broken {
            let f = &mut files[i];
            let j = rng.random_range(0..f.tests.len());
            f.tests[j].flaky_permille = 1000;
        }
        // Long files: with R the rest and L each long file, L = share * (R + 2L) / 16.
        let rest: u64 = files
            .iter()
            .enumerate()
            .filter(|(i, _)| !long.contains(i))
            .map(|(_, f)| f.ms())
            .sum();
        let l = (LONG_SHARE * rest as f64 / (16.0 - 2.0 * LONG_SHARE)).round() as u64;
        for &i in &long {
            let f = &mut files[i];
            f.kind = Kind::Long;
            f.tests = (0..LONG_FILE_TESTS)
                .map(|j| Test {
                    name: format!("f{i:03}_t{j}"),
                    ms: l / LONG_FILE_TESTS + u64::from(j < l % LONG_FILE_TESTS),
                    flaky_permille: 0,
                })
                .collect();
        }
        Suite { seed, files }
    }

    /// Sum of every sleep at scale 1, ms.
    pub fn total_ms(&self) -> u64 {
        self.files.iter().map(File::ms).sum()
    }

    /// Number of tests.
    pub fn tests(&self) -> usize {
        self.files.iter().map(|f| f.tests.len()).sum()
    }

    /// The longest file at scale 1, ms.
    pub fn longest_ms(&self) -> u64 {
        self.files.iter().map(File::ms).max().unwrap_or(0)
    }

    /// Tests that fail some tries but not all.
    pub fn flaky(&self) -> impl Iterator<Item = (&File, &Test)> {
        self.files.iter().flat_map(|f| {
            f.tests
                .iter()
                .filter(|t| t.flaky_permille > 0 && t.flaky_permille < 1000)
                .map(move |t| (f, t))
        })
    }

    /// Tests that always fail when flakes are on.
    pub fn always_failing(&self) -> impl Iterator<Item = (&File, &Test)> {
        self.files.iter().flat_map(|f| {
            f.tests
                .iter()
                .filter(|t| t.flaky_permille >= 1000)
                .map(move |t| (f, t))
        })
    }
}

/// How a unit's recorded duration relates to the truth.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Recorded {
    /// Within +-10%.
    Close,
    /// Recorded 5x too long (the unit got faster).
    TooLong,
    /// Recorded 5x too short (the unit got slower).
    TooShort,
    /// Not recorded (a new unit).
    Missing,
}

/// The seeded timing history: (unit, recorded ms at `scale`) for every recorded unit, and how
/// each unit's entry was made (in file order).
pub fn history(suite: &Suite, scale: f64) -> (Vec<(String, u64)>, Vec<Recorded>) {
    let mut rng = StdRng::seed_from_u64(suite.seed ^ 0x6b69_6c6e_6869_7374);
    let mut how = vec![Recorded::Close; suite.files.len()];
    let mut heavy: Vec<usize> = (0..suite.files.len())
        .filter(|&i| suite.files[i].kind == Kind::Heavy)
        .collect();
    // Longest first (index breaks ties).
    heavy.sort_by_key(|&i| (std::cmp::Reverse(suite.files[i].ms()), i));
    if let Some(&first) = heavy.first() {
        how[first] = Recorded::TooShort;
    }
    if heavy.len() > 1 {
        let other = heavy[rng.random_range(1..heavy.len())];
        how[other] = Recorded::TooLong;
    }
    let mut ordinary: Vec<usize> = (0..suite.files.len())
        .filter(|&i| suite.files[i].kind == Kind::Ordinary)
        .collect();
    ordinary.shuffle(&mut rng);
    for &i in ordinary.iter().take(WRONG_ORDINARY) {
        how[i] = if rng.random_bool(0.5) {
            Recorded::TooLong
        } else {
            Recorded::TooShort
        };
    }
    for &i in ordinary.iter().skip(WRONG_ORDINARY).take(MISSING) {
        how[i] = Recorded::Missing;
    }
    let mut out = Vec::new();
    for (f, h) in suite.files.iter().zip(&how) {
        let truth = f.ms() as f64 * scale;
        let noise: f64 = rng.random_range(0.9..=1.1);
        let ms = match h {
            Recorded::Close => truth * noise,
            Recorded::TooLong => truth * 5.0 * noise,
            Recorded::TooShort => truth / 5.0 * noise,
            Recorded::Missing => continue,
        };
        out.push((f.path.clone(), (ms.round() as u64).max(1)));
    }
    (out, how)
}

/// Each unit's estimate as the dispatcher sees it (in file order): its recorded duration, or
/// the median of the recorded ones for a unit without history; with `perfect`, the truth.
pub fn estimates(suite: &Suite, scale: f64, perfect: bool) -> Vec<u64> {
    if perfect {
        return suite
            .files
            .iter()
            .map(|f| (f.ms() as f64 * scale).round() as u64)
            .collect();
    }
    let (recorded, _) = history(suite, scale);
    let known: HashMap<&str, u64> = recorded.iter().map(|(u, ms)| (u.as_str(), *ms)).collect();
    let median = median(recorded.iter().map(|(_, ms)| *ms).collect()).unwrap_or(0);
    suite
        .files
        .iter()
        .map(|f| known.get(f.path.as_str()).copied().unwrap_or(median))
        .collect()
}

/// The makespan at scale 1 without any overhead of `strategy` at `n` shards, the units'
/// estimates from the history (or the truth with `perfect`): static splits by
/// [`static_shards`]; the dynamic queue longest first by estimate, batches by [`batch_len`],
/// the next batch to the first shard free. A model to read the measurements against.
pub fn simulate(suite: &Suite, strategy: Strategy, n: u32, perfect: bool) -> u64 {
    let est = estimates(suite, 1.0, perfect);
    let truth: Vec<u64> = suite.files.iter().map(File::ms).collect();
    let mut load = vec![0u64; n.max(1) as usize];
    if strategy != Strategy::Dynamic {
        let units: Vec<(String, u64)> = suite
            .files
            .iter()
            .zip(&est)
            .map(|(f, e)| (f.path.clone(), *e))
            .collect();
        for (t, shard) in truth.iter().zip(static_shards(strategy, &units, n)) {
            load[shard.unwrap_or(0) as usize] += t;
        }
        return load.into_iter().max().unwrap_or(0);
    }
    let mut queue: Vec<usize> = (0..suite.files.len()).collect();
    queue.sort_by_key(|&i| (std::cmp::Reverse(est[i]), i));
    let mut at = 0;
    while at < queue.len() {
        let ests: Vec<u64> = queue[at..].iter().map(|&i| est[i]).collect();
        let k = batch_len(&ests, n, 0, 0, 0);
        let Some((shard, _)) = load.iter().enumerate().min_by_key(|&(i, t)| (*t, i)) else {
            break;
        };
        load[shard] += queue[at..at + k].iter().map(|&i| truth[i]).sum::<u64>();
        at += k;
    }
    load.into_iter().max().unwrap_or(0)
}

/// A stable 64-bit hash of text (FNV-1a, then a SplitMix64 finish so nearby inputs spread).
pub fn hash(text: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in text.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

/// Whether a flaky test fails try `try_number`: `hash(seed, test, try) % 1000 < permille`.
pub fn flake_fails(seed: u64, test: &str, try_number: u32, permille: u32) -> bool {
    permille > 0 && hash(&format!("{seed}/{test}/{try_number}")) % 1000 < u64::from(permille)
}

/// Whether a test is broken in the broken scenario: `hash(seed, test) % 1000 < permille`.
pub fn is_broken(seed: u64, test: &str, permille: u32) -> bool {
    permille > 0 && hash(&format!("{seed}/{test}")) % 1000 < u64::from(permille)
}

/// Parses a file's text: `(name, ms, flaky_permille)` per non-blank line.
pub fn parse(text: &str) -> Result<Vec<Test>, String> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let mut w = l.split_whitespace();
            let (Some(name), Some(ms), Some(p), None) = (w.next(), w.next(), w.next(), w.next())
            else {
                return Err(format!("bad line {l:?}: want `NAME MS PERMILLE`"));
            };
            Ok(Test {
                name: name.to_string(),
                ms: ms
                    .parse()
                    .map_err(|e| format!("bad duration in {l:?}: {e}"))?,
                flaky_permille: p
                    .parse()
                    .map_err(|e| format!("bad permille in {l:?}: {e}"))?,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn same_seed_same_suite_other_seed_other_suite() {
        let a = Suite::generate(42);
        let b = Suite::generate(42);
        assert_eq!(a.files, b.files);
        assert_eq!(history(&a, 1.0), history(&b, 1.0));
        assert_ne!(Suite::generate(43).files, a.files);
    }

    #[test]
    fn the_suite_has_the_designed_shape() {
        for seed in [1, 42, 7777] {
            let s = Suite::generate(seed);
            assert_eq!(s.files.len(), FILES);
            let tests = s.tests();
            assert!((900..=1100).contains(&tests), "{tests} tests");
            let total = s.total_ms();
            assert!((75_000..=110_000).contains(&total), "total {total} ms");
            let long: Vec<&File> = s.files.iter().filter(|f| f.kind == Kind::Long).collect();
            assert_eq!(long.len(), 2);
            for f in &long {
                let share = f.ms() as f64 / (total as f64 / 16.0);
                assert!((0.94..=0.96).contains(&share), "long file {share}");
            }
            // Every other file is far shorter than a long one.
            let other_max = s
                .files
                .iter()
                .filter(|f| f.kind != Kind::Long)
                .map(File::ms)
                .max()
                .unwrap_or(0);
            assert!(
                other_max * 10 < long[0].ms() * 9,
                "{other_max} vs {}",
                long[0].ms()
            );
            // Most tests are tens of milliseconds.
            let short = s
                .files
                .iter()
                .flat_map(|f| &f.tests)
                .filter(|t| t.ms <= 90)
                .count();
            assert!(short * 100 >= tests * 80, "{short} of {tests} short");
            let seconds = s
                .files
                .iter()
                .flat_map(|f| &f.tests)
                .filter(|t| t.ms >= 1000 && t.ms <= 4000)
                .count();
            assert_eq!(seconds, HEAVY_TESTS);
            assert_eq!(s.flaky().count(), FLAKY_TESTS);
            assert!(
                s.flaky()
                    .all(|(_, t)| (200..=600).contains(&t.flaky_permille))
            );
            assert_eq!(s.always_failing().count(), BROKEN_TESTS);
            // Special tests sit in distinct, ordinary files.
            let mut special: Vec<&str> = s
                .flaky()
                .chain(s.always_failing())
                .map(|(f, _)| f.path.as_str())
                .collect();
            special.sort_unstable();
            special.dedup();
            assert_eq!(special.len(), FLAKY_TESTS + BROKEN_TESTS);
            // Files round-trip through their text.
            for f in &s.files {
                assert_eq!(parse(&f.text()).unwrap(), f.tests);
            }
        }
    }

    #[test]
    fn the_history_is_wrong_as_designed() {
        let s = Suite::generate(42);
        let (recorded, how) = history(&s, 0.5);
        let count = |r: Recorded| how.iter().filter(|h| **h == r).count();
        assert_eq!(count(Recorded::Missing), MISSING);
        assert_eq!(recorded.len(), FILES - MISSING);
        assert_eq!(
            count(Recorded::TooLong) + count(Recorded::TooShort),
            WRONG_ORDINARY + 2
        );
        for ((f, h), (unit, ms)) in s
            .files
            .iter()
            .zip(&how)
            .filter(|(_, h)| **h != Recorded::Missing)
            .zip(&recorded)
        {
            assert_eq!(&f.path, unit);
            let truth = f.ms() as f64 * 0.5;
            let ratio = *ms as f64 / truth;
            let want = match h {
                Recorded::Close => 1.0,
                Recorded::TooLong => 5.0,
                Recorded::TooShort => 0.2,
                Recorded::Missing => unreachable!(),
            };
            // Within the noise, and the rounding to whole milliseconds.
            let (lo, hi) = (truth * want * 0.9 - 1.0, truth * want * 1.1 + 1.0);
            assert!(
                *ms as f64 >= lo && *ms as f64 <= hi.max(1.0),
                "{unit}: {ms} for {truth} ({ratio})"
            );
            if f.kind == Kind::Long {
                assert_eq!(*h, Recorded::Close);
            }
        }
        // The longest second-long file is the one recorded too short.
        let heaviest = s
            .files
            .iter()
            .enumerate()
            .filter(|(_, f)| f.kind == Kind::Heavy)
            .max_by_key(|(i, f)| (f.ms(), std::cmp::Reverse(*i)))
            .map(|(i, _)| i)
            .unwrap();
        assert_eq!(how[heaviest], Recorded::TooShort);
    }

    #[test]
    fn static_splits_are_worse_than_the_bound_by_design() {
        for seed in [1, 42, 7777] {
            let s = Suite::generate(seed);
            let bound = (s.total_ms() / 16).max(s.longest_ms()) as f64;
            let ratio = |st, perfect| simulate(&s, st, 16, perfect) as f64 / bound;
            let (hash, timing) = (ratio(Strategy::Hash, false), ratio(Strategy::Timing, false));
            let dynamic = ratio(Strategy::Dynamic, false);
            let perfect = ratio(Strategy::Dynamic, true);
            println!(
                "seed {seed}: dynamic {dynamic:.3} (perfect history {perfect:.3}), hash {hash:.2}, timing {timing:.2}"
            );
            assert!(
                perfect <= 1.02,
                "seed {seed}: dynamic {perfect:.3} x the bound"
            );
            assert!(
                dynamic <= 1.06,
                "seed {seed}: dynamic {dynamic:.3} x the bound"
            );
            assert!(hash >= 1.6, "seed {seed}: hash {hash:.2} x the bound");
            assert!(timing >= 1.2, "seed {seed}: timing {timing:.2} x the bound");
        }
    }

    #[test]
    fn flakes_depend_on_seed_test_and_try_only() {
        let fails: Vec<bool> = (1..=200)
            .map(|t| flake_fails(42, "f001_t2", t, 400))
            .collect();
        let n = fails.iter().filter(|f| **f).count();
        assert!((50..=110).contains(&n), "{n} of 200 at 0.4");
        assert_eq!(
            fails,
            (1..=200)
                .map(|t| flake_fails(42, "f001_t2", t, 400))
                .collect::<Vec<_>>()
        );
        assert!((1..=50).all(|t| flake_fails(42, "x", t, 1000)));
        assert!((1..=50).all(|t| !flake_fails(42, "x", t, 0)));
        let broken = (0..1000)
            .filter(|i| is_broken(42, &format!("t{i}"), 300))
            .count();
        assert!((250..=350).contains(&broken), "{broken} of 1000 at 30%");
    }
}
