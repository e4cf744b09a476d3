//! Streaming masking of secrets in a step's output.
//!
//! A CI job's secrets reach its steps as environment variables, and a step
//! may print them. A [`Masker`] sits on one output stream (stdout or stderr)
//! of a step and replaces every occurrence of a secret by [`MASK`] (`***`)
//! before the bytes are stored or streamed, while still forwarding output
//! immediately: it holds back only a tail that could be the beginning of a
//! secret split across two chunks.
//!
//! # What is masked
//!
//! - Each secret, as exact bytes (no decoding: output need not be UTF-8).
//! - If a secret contains `\n` (private keys, certificates, JSON credential
//!   files), additionally each of its lines on its own, with a trailing `\r`
//!   removed: such secrets are typically printed line by line, or with
//!   different line endings, and a line of a key is as sensitive as the whole.
//! - Secrets (and lines) with fewer than [`MIN_SECRET_LEN`] bytes apart from
//!   leading and trailing ASCII whitespace are ignored: masking `a` or `  }`
//!   everywhere would destroy the log and protect nothing.
//! - Encodings (base64, URL or JSON escaping, ...) are *not* masked: the set
//!   of possible transformations is open-ended, and guessing at some of them
//!   would give a false sense of safety. Steps must not print transformed
//!   secrets.
//!
//! # How overlaps are resolved
//!
//! Every byte that belongs to *any* occurrence of *any* secret is covered,
//! including overlapping occurrences of different secrets, and each maximal
//! run of covered bytes is replaced by a single `***`. So when one secret is
//! nested inside another, the longest match wins (one `***` for the outer
//! secret), and when occurrences overlap or touch, their union is masked as
//! one: no fragment of any secret is ever left readable, which replacing
//! only the leftmost-longest match would not guarantee.
//!
//! Known limit: a secret that itself contains `***` could in theory be formed
//! by the replacement text next to unmasked bytes.
//!
//! # Streaming
//!
//! The result of [`Masker::push`]ing a stream in arbitrary chunks and then
//! calling [`Masker::finish`] is byte-for-byte the result of masking the
//! whole stream at once. Matching uses an Aho-Corasick automaton whose state
//! is kept across chunks, so every input byte is examined once: `push` is
//! O(chunk length) (amortized), independent of how many bytes are held back.
//! The held-back tail is the longest suffix of the output so far that is a
//! proper prefix of a secret (so at most `longest_secret - 1` bytes, and
//! nothing when the tail cannot begin any secret).
//!
//! The `aho-corasick` crate is deliberately not used: this masker needs, for
//! every automaton state, the length of the longest secret prefix it stands
//! for (to hold back exactly that much) and the length of the longest secret
//! ending there (to mask overlaps), and that crate's public API exposes
//! neither. The automaton here is small and checked against a naive
//! reference implementation by randomized tests.

use std::collections::VecDeque;
use std::fmt;
use std::sync::Arc;

/// Secrets (and lines of multi-line secrets) with fewer bytes than this,
/// not counting leading and trailing ASCII whitespace, are not masked.
pub const MIN_SECRET_LEN: usize = 4;

/// The text that replaces each run of secret bytes.
pub const MASK: &[u8] = b"***";

/// Masks secrets in one output stream (stdout or stderr) of a step.
///
/// Create one per stream; cloning a fresh `Masker` is cheap (the automaton
/// is shared) and is the way to get a second one for the other stream.
///
/// ```
/// use kiln_exec::mask::Masker;
///
/// let mut masker = Masker::new(&["hunter22"]);
/// let mut out = masker.push(b"password: hunt");
/// assert_eq!(out, b"password: ");
/// assert!(masker.holding());
/// out.extend(masker.push(b"er22\n"));
/// out.extend(masker.finish());
/// assert_eq!(out, b"password: ***\n");
/// ```
#[derive(Clone)]
pub struct Masker {
    /// The automaton over all patterns; `None` when there is nothing to mask.
    automaton: Option<Arc<Automaton>>,
    /// Automaton state after the last byte pushed.
    state: usize,
    /// Bytes not emitted yet: every byte from the first one whose output is
    /// not decided up to the last byte pushed.
    held: Vec<u8>,
    /// Covered (secret) ranges within `held`: sorted, disjoint, and neither
    /// overlapping nor touching each other.
    held_runs: Vec<(usize, usize)>,
    /// Whether the last emitted byte was covered, so that a run continuing
    /// into the held bytes does not get a second `***`.
    in_run: bool,
}

impl fmt::Debug for Masker {
    /// Never shows secrets nor held bytes (which may be part of a secret).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Masker")
            .field(
                "patterns",
                &self.automaton.as_ref().map_or(0, |a| a.patterns),
            )
            .field("held_bytes", &self.held.len())
            .finish_non_exhaustive()
    }
}

impl Masker {
    /// Builds a masker for `secrets`. Secrets shorter than
    /// [`MIN_SECRET_LEN`] are ignored; with no usable secret the masker
    /// passes everything through untouched and never holds anything.
    pub fn new(secrets: &[impl AsRef<[u8]>]) -> Self {
        let patterns = patterns(secrets.iter().map(AsRef::as_ref));
        let automaton = if patterns.is_empty() {
            None
        } else {
            Some(Arc::new(Automaton::new(&patterns)))
        };
        Masker {
            automaton,
            state: ROOT,
            held: Vec::new(),
            held_runs: Vec::new(),
            in_run: false,
        }
    }

    /// Feeds the next chunk of the stream and returns the bytes that are safe
    /// to emit now, with secrets replaced by `***`.
    ///
    /// Holds back only the shortest tail that could still turn out to be part
    /// of a secret: the longest suffix of the stream that is a proper prefix
    /// of a secret (at most `longest_secret - 1` bytes), and nothing when no
    /// suffix can begin a secret.
    pub fn push(&mut self, chunk: &[u8]) -> Vec<u8> {
        let Some(automaton) = self.automaton.clone() else {
            return chunk.to_vec();
        };
        // Positions below are relative to the first held byte: held bytes
        // come first, then the chunk.
        let held_len = self.held.len();
        let total = held_len + chunk.len();
        let mut runs = std::mem::take(&mut self.held_runs);
        let mut state = self.state;
        for (i, &byte) in chunk.iter().enumerate() {
            state = automaton.next(state, byte);
            let len = automaton.longest_match(state);
            if len != 0 {
                let end = held_len + i + 1;
                // Bytes before the first held one were already emitted (only
                // possible after a `finish` in the middle of a secret).
                add_run(&mut runs, end.saturating_sub(len), end);
            }
        }
        self.state = state;

        // No match that ends later can start before `boundary`.
        let boundary = total.saturating_sub(automaton.depth(state));
        // Covered bytes right at the boundary stay covered whatever follows,
        // so they are decided too.
        let first_open = runs.partition_point(|&(_, end)| end <= boundary);
        let decided = match runs.get(first_open) {
            Some(&(start, end)) if start <= boundary => end,
            _ => boundary,
        };
        self.emit(chunk, runs, decided)
    }

    /// Emits whatever is held back, masked: at the end of the stream, and at
    /// flush points (when the step exits, or after a short idle period while
    /// [`holding`](Self::holding)).
    ///
    /// Matching state is kept, so the masker may go on being used after a
    /// flush point: if the flush fell inside a secret, the already emitted
    /// beginning (a proper prefix of the secret, which is all that was held)
    /// stays visible, but the rest of the secret is still masked.
    pub fn finish(&mut self) -> Vec<u8> {
        let runs = std::mem::take(&mut self.held_runs);
        let decided = self.held.len();
        self.emit(&[], runs, decided)
    }

    /// Whether bytes are currently held back; the caller should
    /// [`finish`](Self::finish) after a short idle timeout if so.
    pub fn holding(&self) -> bool {
        !self.held.is_empty()
    }

    /// Emits held bytes plus `chunk` up to relative position `decided`
    /// (replacing `runs` by `***`), and keeps the rest held.
    fn emit(&mut self, chunk: &[u8], runs: Vec<(usize, usize)>, decided: usize) -> Vec<u8> {
        let total = self.held.len() + chunk.len();
        let decided = decided.min(total);
        let mut out = Vec::with_capacity(decided);
        let mut pos = 0;
        let mut in_run = self.in_run;
        let done = runs.partition_point(|&(start, _)| start < decided);
        for &(start, end) in runs.iter().take(done) {
            if start > pos {
                copy_range(&mut out, &self.held, chunk, pos, start);
                in_run = false;
            }
            if !in_run {
                out.extend_from_slice(MASK);
            }
            in_run = true;
            pos = end;
        }
        if decided > pos {
            copy_range(&mut out, &self.held, chunk, pos, decided);
            in_run = false;
        }
        self.in_run = in_run;

        let mut held = Vec::with_capacity(total - decided);
        copy_range(&mut held, &self.held, chunk, decided, total);
        self.held = held;
        self.held_runs = runs
            .iter()
            .skip(done)
            .map(|&(start, end)| (start - decided, end - decided))
            .collect();
        out
    }
}

/// Appends relative positions `from..to` of `held` followed by `chunk`.
fn copy_range(out: &mut Vec<u8>, held: &[u8], chunk: &[u8], from: usize, to: usize) {
    let split = held.len();
    if from < split {
        out.extend_from_slice(held.get(from..to.min(split)).unwrap_or_default());
    }
    if to > split {
        let from = from.max(split) - split;
        out.extend_from_slice(chunk.get(from..to - split).unwrap_or_default());
    }
}

/// Adds the covered range `start..end` to `runs`, merging it with the runs it
/// overlaps or touches. Ends are non-decreasing from call to call, so only
/// runs at the back can be affected.
fn add_run(runs: &mut Vec<(usize, usize)>, mut start: usize, mut end: usize) {
    while let Some(&(run_start, run_end)) = runs.last() {
        if run_end < start {
            break;
        }
        start = start.min(run_start);
        end = end.max(run_end);
        runs.pop();
    }
    runs.push((start, end));
}

/// Whether `bytes` is long enough to be worth masking.
fn long_enough(bytes: &[u8]) -> bool {
    bytes.trim_ascii().len() >= MIN_SECRET_LEN
}

/// The byte strings to mask for `secrets`: each secret, plus each line of a
/// multi-line secret; sorted and without duplicates.
fn patterns<'a>(secrets: impl Iterator<Item = &'a [u8]>) -> Vec<Vec<u8>> {
    let mut patterns = Vec::new();
    for secret in secrets {
        if long_enough(secret) {
            patterns.push(secret.to_vec());
        }
        if secret.contains(&b'\n') {
            for line in secret.split(|&b| b == b'\n') {
                let line = line.strip_suffix(b"\r").unwrap_or(line);
                if long_enough(line) {
                    patterns.push(line.to_vec());
                }
            }
        }
    }
    patterns.sort_unstable();
    patterns.dedup();
    patterns
}

/// The root state of the [`Automaton`].
const ROOT: usize = 0;

/// Aho-Corasick automaton: a trie of the patterns with failure links.
///
/// Each state stands for a prefix of some pattern. After reading some input,
/// the current state is the longest suffix of the input that is a prefix of a
/// pattern; its length is the state's depth.
struct Automaton {
    /// Number of patterns (for `Debug` only).
    patterns: usize,
    /// Transitions of the root for every byte (to itself when no pattern
    /// starts with the byte), so that the hot root state needs no search.
    root: Box<[usize; 256]>,
    /// Trie edges of state `s` are `edge_bytes/edge_targets[edge_start[s]..edge_start[s + 1]]`,
    /// sorted by byte.
    edge_start: Vec<usize>,
    /// Labels of the trie edges.
    edge_bytes: Vec<u8>,
    /// Targets of the trie edges.
    edge_targets: Vec<usize>,
    /// Failure link: the state for the longest proper suffix of this state's
    /// string that is a prefix of a pattern (always less deep).
    fail: Vec<usize>,
    /// Length of the string each state stands for.
    depth: Vec<usize>,
    /// Length of the longest pattern that is a suffix of the state's string
    /// (0 if none): all patterns ending here lie within that many bytes.
    longest: Vec<usize>,
}

impl Automaton {
    /// Builds the automaton; `patterns` must be non-empty and deduplicated.
    fn new(patterns: &[Vec<u8>]) -> Self {
        // The trie, with children sorted by byte.
        let mut children: Vec<Vec<(u8, usize)>> = vec![Vec::new()];
        let mut depth = vec![0];
        let mut terminal = vec![false];
        for pattern in patterns {
            let mut state = ROOT;
            for &byte in pattern {
                let kids = &mut children[state];
                state = match kids.binary_search_by_key(&byte, |&(b, _)| b) {
                    Ok(i) => kids[i].1,
                    Err(i) => {
                        let new = depth.len();
                        kids.insert(i, (byte, new));
                        let new_depth = depth[state] + 1;
                        children.push(Vec::new());
                        depth.push(new_depth);
                        terminal.push(false);
                        new
                    }
                };
            }
            terminal[state] = true;
        }

        let states = depth.len();
        let mut root = Box::new([ROOT; 256]);
        for &(byte, child) in &children[ROOT] {
            root[usize::from(byte)] = child;
        }
        let goto = |state: usize, byte: u8| -> Option<usize> {
            let kids = &children[state];
            kids.binary_search_by_key(&byte, |&(b, _)| b)
                .ok()
                .map(|i| kids[i].1)
        };

        // Breadth-first, so that failure targets (less deep) are done first.
        let mut fail = vec![ROOT; states];
        let mut longest = vec![0; states];
        let mut queue = VecDeque::new();
        for &(_, child) in &children[ROOT] {
            longest[child] = if terminal[child] { depth[child] } else { 0 };
            queue.push_back(child);
        }
        while let Some(state) = queue.pop_front() {
            for &(byte, child) in &children[state] {
                let mut f = fail[state];
                let target = loop {
                    if f == ROOT {
                        break root[usize::from(byte)];
                    }
                    if let Some(next) = goto(f, byte) {
                        break next;
                    }
                    f = fail[f];
                };
                fail[child] = target;
                longest[child] = if terminal[child] {
                    depth[child]
                } else {
                    longest[target]
                };
                queue.push_back(child);
            }
        }

        let mut edge_start = Vec::with_capacity(states + 1);
        let mut edge_bytes = Vec::with_capacity(states);
        let mut edge_targets = Vec::with_capacity(states);
        for kids in &children {
            edge_start.push(edge_bytes.len());
            for &(byte, child) in kids {
                edge_bytes.push(byte);
                edge_targets.push(child);
            }
        }
        edge_start.push(edge_bytes.len());

        Automaton {
            patterns: patterns.len(),
            root,
            edge_start,
            edge_bytes,
            edge_targets,
            fail,
            depth,
            longest,
        }
    }

    /// The state after reading `byte` in `state`. Amortized O(1): each
    /// failure step lowers the depth, which each byte raises by at most one.
    fn next(&self, mut state: usize, byte: u8) -> usize {
        loop {
            if state == ROOT {
                return self.root[usize::from(byte)];
            }
            if let Some(next) = self.goto(state, byte) {
                return next;
            }
            // Failure links always point to a less deep state; the fallback
            // to the root is for robustness only.
            state = self.fail.get(state).copied().unwrap_or(ROOT);
        }
    }

    /// The trie edge labelled `byte` out of `state`, if any.
    fn goto(&self, state: usize, byte: u8) -> Option<usize> {
        let from = *self.edge_start.get(state)?;
        let to = *self.edge_start.get(state + 1)?;
        let i = self.edge_bytes.get(from..to)?.binary_search(&byte).ok()?;
        self.edge_targets.get(from + i).copied()
    }

    /// Length of the string `state` stands for.
    fn depth(&self, state: usize) -> usize {
        self.depth.get(state).copied().unwrap_or(0)
    }

    /// Length of the longest pattern ending in `state` (0 if none).
    fn longest_match(&self, state: usize) -> usize {
        self.longest.get(state).copied().unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    /// Masks `input` in one go with the naive definition: every byte of every
    /// occurrence of every pattern is covered; each maximal covered run
    /// becomes `***`. Patterns are derived independently of `patterns()`.
    fn reference(secrets: &[Vec<u8>], input: &[u8]) -> Vec<u8> {
        let mut pats: Vec<Vec<u8>> = Vec::new();
        for secret in secrets {
            let mut candidates = vec![secret.clone()];
            if secret.contains(&b'\n') {
                for line in secret.split(|&b| b == b'\n') {
                    let mut line = line.to_vec();
                    if line.last() == Some(&b'\r') {
                        line.pop();
                    }
                    candidates.push(line);
                }
            }
            for c in candidates {
                let is_space = |b: &u8| b" \t\n\r\x0c".contains(b);
                let first = c.iter().position(|b| !is_space(b));
                let last = c.iter().rposition(|b| !is_space(b));
                if let (Some(first), Some(last)) = (first, last)
                    && last + 1 - first >= MIN_SECRET_LEN
                {
                    pats.push(c);
                }
            }
        }
        let mut covered = vec![false; input.len()];
        for p in &pats {
            for i in 0..input.len() {
                if input[i..].starts_with(p) {
                    covered[i..i + p.len()].iter_mut().for_each(|c| *c = true);
                }
            }
        }
        let mut out = Vec::new();
        for (i, &b) in input.iter().enumerate() {
            if !covered[i] {
                out.push(b);
            } else if i == 0 || !covered[i - 1] {
                out.extend_from_slice(MASK);
            }
        }
        out
    }

    /// A tiny alphabet (including non-UTF-8 bytes and newlines) so that
    /// partial matches, overlaps and nesting are frequent.
    const ALPHABET: &[u8] = b"ab\n\xff\x00";

    fn contains(haystack: &[u8], needle: &[u8]) -> bool {
        haystack.windows(needle.len()).any(|w| w == needle)
    }

    /// Feeds `input` split at `cuts` (sorted positions) and returns the
    /// concatenated output; checks the hold-back bound after every push.
    fn run_chunks(masker: &mut Masker, input: &[u8], cuts: &[usize]) -> Vec<u8> {
        let max_hold = masker
            .automaton
            .as_ref()
            .map_or(0, |a| a.depth.iter().copied().max().unwrap_or(0));
        let mut out = Vec::new();
        let mut prev = 0;
        for &cut in cuts.iter().chain(std::iter::once(&input.len())) {
            out.extend(masker.push(&input[prev..cut]));
            assert!(masker.held.len() < max_hold.max(1), "held too much");
            // Never more than the longest suffix that is a prefix of a pattern.
            if let Some(a) = &masker.automaton {
                assert!(masker.held.len() <= a.depth(masker.state));
            }
            assert_eq!(masker.holding(), !masker.held.is_empty());
            prev = cut;
        }
        out.extend(masker.finish());
        assert!(!masker.holding());
        out
    }

    /// A piece of input: filler from the alphabet, a whole secret, or a fragment of one
    /// (indices taken modulo the secrets and their lengths when the case is built).
    #[derive(Debug, Clone)]
    enum Piece {
        Filler(Vec<u8>),
        Secret(usize),
        Fragment(usize, usize, usize),
    }

    fn piece() -> impl Strategy<Value = Piece> {
        prop_oneof![
            proptest::collection::vec(proptest::sample::select(ALPHABET), 0..8)
                .prop_map(Piece::Filler),
            any::<usize>().prop_map(Piece::Secret),
            (any::<usize>(), any::<usize>(), any::<usize>())
                .prop_map(|(i, from, to)| Piece::Fragment(i, from, to)),
        ]
    }

    /// Random secrets (some too short, some multi-line) and an input built from random filler
    /// and copies of secrets and their fragments, with the positions where it is cut into
    /// chunks (sorted). proptest shrinks a failing case to a small one.
    fn case() -> impl Strategy<Value = (Vec<Vec<u8>>, Vec<u8>, Vec<usize>)> {
        let secrets = proptest::collection::vec(
            proptest::collection::vec(proptest::sample::select(ALPHABET), 1..10),
            1..5,
        );
        let pieces = proptest::collection::vec(piece(), 0..12);
        let cuts = proptest::collection::vec(any::<proptest::sample::Index>(), 0..6);
        (secrets, pieces, cuts).prop_map(|(secrets, pieces, cuts)| {
            let mut input = Vec::new();
            for p in pieces {
                match p {
                    Piece::Filler(f) => input.extend(f),
                    Piece::Secret(i) => input.extend(&secrets[i % secrets.len()]),
                    Piece::Fragment(i, from, to) => {
                        let s = &secrets[i % secrets.len()];
                        let from = from % s.len();
                        let to = from + to % (s.len() - from + 1);
                        input.extend(&s[from..to]);
                    }
                }
            }
            let mut cuts: Vec<usize> = cuts.iter().map(|c| c.index(input.len() + 1)).collect();
            cuts.sort_unstable();
            (secrets, input, cuts)
        })
    }

    fn used_patterns(secrets: &[Vec<u8>]) -> Vec<Vec<u8>> {
        patterns(secrets.iter().map(Vec::as_slice))
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(5_000))]

        #[test]
        fn mask_random_chunking_matches_whole_input_masking((secrets, input, cuts) in case()) {
            let expected = reference(&secrets, &input);
            let mut masker = Masker::new(&secrets);
            let out = run_chunks(&mut masker, &input, &cuts);
            prop_assert_eq!(&out, &expected);
            // Whole input at once, too.
            let mut whole = Masker::new(&secrets);
            let mut once = whole.push(&input);
            once.extend(whole.finish());
            prop_assert_eq!(&once, &expected);
            for p in used_patterns(&secrets) {
                prop_assert!(!contains(&out, &p), "{:?} leaked in {:?}", p, out);
            }
        }

        #[test]
        fn mask_never_leaks_a_whole_secret_even_with_flushes(
            (secrets, input, cuts) in case(),
            flushes in proptest::collection::vec(any::<bool>(), 6),
        ) {
            let mut masker = Masker::new(&secrets);
            let mut out = Vec::new();
            let mut prev = 0;
            for (n, &cut) in cuts.iter().chain(std::iter::once(&input.len())).enumerate() {
                out.extend(masker.push(&input[prev..cut]));
                if flushes.get(n).copied().unwrap_or(false) {
                    out.extend(masker.finish());
                }
                prev = cut;
            }
            out.extend(masker.finish());
            for p in used_patterns(&secrets) {
                prop_assert!(!contains(&out, &p), "{:?} leaked in {:?}", p, out);
            }
        }
    }

    #[test]
    fn mask_secret_split_across_two_chunks() {
        let mut m = Masker::new(&["s3cr3t-token"]);
        assert_eq!(m.push(b"token=s3cr"), b"token=");
        assert!(m.holding());
        assert_eq!(m.push(b"3t-token done\n"), b"*** done\n");
        assert!(!m.holding());
        assert_eq!(m.finish(), b"");
    }

    #[test]
    fn mask_secret_split_across_three_chunks() {
        let mut m = Masker::new(&["s3cr3t-token"]);
        let mut out = m.push(b"x s3");
        assert_eq!(out, b"x ");
        out.extend(m.push(b"cr3t-to"));
        assert_eq!(out, b"x ");
        out.extend(m.push(b"ken y"));
        out.extend(m.finish());
        assert_eq!(out, b"x *** y");
    }

    #[test]
    fn mask_false_start_is_released_as_soon_as_it_cannot_be_a_secret() {
        let mut m = Masker::new(&["abcdef"]);
        assert_eq!(m.push(b"xx abc"), b"xx ");
        assert_eq!(m.push(b"dX"), b"abcdX");
        assert!(!m.holding());
        // A tail that cannot begin a secret is not held.
        assert_eq!(m.push(b"no secret here"), b"no secret here");
        assert!(!m.holding());
    }

    #[test]
    fn mask_holds_only_the_longest_possible_secret_prefix() {
        let mut m = Masker::new(&["aaab"]);
        // "aaaa" then "aa": only the last three bytes can begin "aaab".
        assert_eq!(m.push(b"aaaaaa"), b"aaa");
        assert_eq!(m.held, b"aaa");
        assert_eq!(m.push(b"b"), b"***");
        assert!(!m.holding());
    }

    #[test]
    fn mask_non_utf8_data() {
        let secret: &[u8] = b"\xff\xfe\x00\x80key";
        let mut m = Masker::new(&[secret]);
        let mut out = m.push(b"\xc3\x28 \xff\xfe");
        out.extend(m.push(b"\x00\x80key \xf0\x90"));
        out.extend(m.finish());
        assert_eq!(out, b"\xc3\x28 *** \xf0\x90");
    }

    #[test]
    fn mask_short_secrets_are_ignored() {
        let mut m = Masker::new(&["a", "abc", "  x\n", ""]);
        assert!(m.automaton.is_none());
        assert_eq!(m.push(b"a abc x"), b"a abc x");
        assert!(!m.holding());
        let mut m = Masker::new(&["ab", "abcd"]);
        assert_eq!(m.push(b"ab abcd"), b"ab ***");
    }

    #[test]
    fn mask_without_secrets_passes_through() {
        let none: [&str; 0] = [];
        let mut m = Masker::new(&none);
        for chunk in [&b"hello "[..], b"\xff\x00 world", b""] {
            assert_eq!(m.push(chunk), chunk);
            assert!(!m.holding());
        }
        assert_eq!(m.finish(), b"");
    }

    #[test]
    fn mask_nested_and_overlapping_secrets() {
        // Nested: the longest wins, one mask.
        let mut m = Masker::new(&["pass", "mypassword"]);
        assert_eq!(m.push(b"[mypassword] [pass]"), b"[***] [***]");
        // Overlapping: the union is masked, no fragment stays readable.
        let mut m = Masker::new(&["abcd1234", "1234wxyz"]);
        let mut out = m.push(b"<abcd1234wxyz>");
        out.extend(m.finish());
        assert_eq!(out, b"<***>");
        // Adjacent occurrences form one run.
        let mut m = Masker::new(&["tok1"]);
        assert_eq!(m.push(b"tok1tok1 tok1"), b"*** ***");
    }

    #[test]
    fn mask_multiline_secret_lines() {
        let key = "-----BEGIN KEY-----\nMIIEowIBAAKCAQEA\r\nxyz\n-----END KEY-----\n";
        let mut m = Masker::new(&[key]);
        // Printed as is: one mask.
        let mut out = m.push(format!("key: {key}done").as_bytes());
        out.extend(m.finish());
        assert_eq!(out, b"key: ***done");
        // Printed line by line: each long enough line masked ("xyz" is too short).
        let mut out = m.push(b"line MIIEowIBAAKCAQEA\nline xyz\n");
        out.extend(m.finish());
        assert_eq!(out, b"line ***\nline xyz\n");
        // A secret read from a file with its trailing newline.
        let mut m = Masker::new(&["hunter22\n"]);
        assert_eq!(m.push(b"echo hunter22;"), b"echo ***;");
    }

    #[test]
    fn mask_unbounded_run_is_streamed() {
        let mut m = Masker::new(&["aaaa"]);
        let mut out = Vec::new();
        for _ in 0..1000 {
            out.extend(m.push(b"aaaaaaa"));
            assert!(m.held.len() < 4);
        }
        out.extend(m.push(b"b"));
        out.extend(m.finish());
        assert_eq!(out, b"***b");
    }

    #[test]
    fn mask_flush_inside_a_secret_masks_the_rest() {
        let mut m = Masker::new(&["s3cr3t-token"]);
        assert_eq!(m.push(b"t=s3cr"), b"t=");
        assert_eq!(m.finish(), b"s3cr");
        assert_eq!(m.push(b"3t-token!"), b"***!");
    }

    #[test]
    fn mask_large_chunk_is_linear() {
        let secrets = ["needle-0001", "needle-0002", "ABABABABABAB"];
        let mut m = Masker::new(&secrets);
        let mut input = Vec::new();
        for i in 0..20_000 {
            input.extend_from_slice(b"ABABABABABA needle-000 ");
            if i % 1000 == 0 {
                input.extend_from_slice(b"needle-0002 ");
            }
        }
        let mut out = m.push(&input);
        out.extend(m.finish());
        assert_eq!(out, reference_fast(&secrets, &input));
    }

    /// Expected output for `mask_large_chunk_is_linear` (only needle-0002
    /// occurs there).
    fn reference_fast(_secrets: &[&str], input: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut i = 0;
        while i < input.len() {
            if input[i..].starts_with(b"needle-0002") {
                out.extend_from_slice(MASK);
                i += 11;
            } else {
                out.push(input[i]);
                i += 1;
            }
        }
        out
    }

    #[test]
    fn mask_debug_does_not_show_secrets() {
        let mut m = Masker::new(&["topsecret"]);
        let _ = m.push(b"top");
        let shown = format!("{m:?}");
        assert!(!shown.contains("top") && !shown.contains("116"), "{shown}");
        assert!(shown.contains("held_bytes: 3"));
    }
}
