//! Branch patterns: the one meaning of a pattern such as `release/*` wherever kiln takes one
//! (`when: {branch: ...}` in a pipeline, `kiln serve --newest-only`, `kiln watch --branch`).
//!
//! A pattern is a [`globset`] glob matched against the whole branch name (`main`,
//! `release/1.2`, never `refs/heads/main`), with `/` as the separator:
//! - `*` matches any text within one path segment: `release/*` matches `release/1.0` but not
//!   `release/1.0/rc1`; `*` alone matches `main` but not `feature/x`;
//! - `**` as a whole segment matches any number of segments: `release/**` matches
//!   `release/1.0/rc1`, `**` matches every branch, `**/fix` matches `a/b/fix`;
//! - `?` one character but `/`, `[abc]` / `[0-9]` one of a set, `{a,b}` alternatives; a
//!   backslash escapes the next character.

use std::fmt;

/// Longest accepted pattern, in bytes.
pub const MAX_BRANCH_PATTERN_LEN: usize = 256;

/// A compiled branch pattern (see the module documentation for its syntax).
#[derive(Clone)]
pub struct BranchPattern {
    /// The pattern as written, for messages and for storing.
    text: String,
    /// The compiled glob.
    matcher: globset::GlobMatcher,
}

impl BranchPattern {
    /// Compiles `text`; the error says why it is not a pattern.
    pub fn new(text: &str) -> Result<Self, String> {
        if text.is_empty() {
            return Err("it is empty".to_owned());
        }
        if text.len() > MAX_BRANCH_PATTERN_LEN {
            return Err(format!("it is longer than {MAX_BRANCH_PATTERN_LEN} bytes"));
        }
        if let Some(c) = text.chars().find(|c| c.is_whitespace() || c.is_control()) {
            return Err(format!(
                "it contains {c:?}, and branch names have no whitespace or control characters"
            ));
        }
        let glob = globset::GlobBuilder::new(text)
            .literal_separator(true)
            .backslash_escape(true)
            .build()
            .map_err(|e| e.kind().to_string())?;
        Ok(Self {
            text: text.to_owned(),
            matcher: glob.compile_matcher(),
        })
    }

    /// Whether `branch` (a whole branch name) matches.
    pub fn matches(&self, branch: &str) -> bool {
        self.matcher.is_match(branch)
    }

    /// The pattern as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }
}

/// Compiles every pattern of `texts`, naming the first bad one in the error.
pub fn branch_patterns(texts: &[String]) -> Result<Vec<BranchPattern>, String> {
    texts
        .iter()
        .map(|t| BranchPattern::new(t).map_err(|e| format!("branch pattern {t:?}: {e}")))
        .collect()
}

/// Whether `branch` matches any of `patterns` (an empty branch, a build with no branch, matches
/// none).
pub fn any_matches(patterns: &[BranchPattern], branch: &str) -> bool {
    !branch.is_empty() && patterns.iter().any(|p| p.matches(branch))
}

impl fmt::Debug for BranchPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("BranchPattern").field(&self.text).finish()
    }
}

impl fmt::Display for BranchPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl PartialEq for BranchPattern {
    fn eq(&self, other: &Self) -> bool {
        self.text == other.text
    }
}

impl Eq for BranchPattern {}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn m(pattern: &str, branch: &str) -> bool {
        BranchPattern::new(pattern).unwrap().matches(branch)
    }

    #[test]
    fn one_meaning() {
        assert!(m("main", "main"));
        assert!(!m("main", "main2"));
        assert!(!m("main", "mai"));
        assert!(m("release/*", "release/1.2"));
        assert!(!m("release/*", "release/1.0/rc1"));
        assert!(!m("release/*", "release"));
        assert!(m("release/**", "release/1.0/rc1"));
        assert!(m("release/**", "release/1.0"));
        assert!(m("**", "a/b/c"));
        assert!(m("*", "main"));
        assert!(!m("*", "feature/x"));
        assert!(m("feature/*-fix", "feature/abc-fix"));
        assert!(!m("feature/*-fix", "feature/a/b-fix"));
        assert!(m("**/fix", "a/b/fix"));
        assert!(m("a/**/z", "a/b/c/z"));
        assert!(m("*.*", "v1.2"));
        assert!(m("é*", "été"));
        assert!(m("v[0-9].*", "v1.x"));
        assert!(!m("v[0-9].*", "va.x"));
        assert!(m("{main,develop}", "develop"));
        assert!(m("rc?", "rc1"));
        assert!(!m("rc?", "rc/"));
        assert!(m(r"a\*", "a*"));
        assert!(!m(r"a\*", "ab"));
    }

    #[test]
    fn long_patterns_stay_fast() {
        // Compiled to a regex: matching is linear in the branch, whatever the pattern.
        let p = BranchPattern::new(&"*a".repeat(100)).unwrap();
        assert!(p.matches(&"a".repeat(10_000)));
        assert!(!p.matches(&"b".repeat(10_000)));
    }

    #[test]
    fn bad_patterns_say_why() {
        assert!(BranchPattern::new("").unwrap_err().contains("empty"));
        assert!(
            BranchPattern::new("a b")
                .unwrap_err()
                .contains("whitespace")
        );
        assert!(
            BranchPattern::new("v[0-9")
                .unwrap_err()
                .contains("unclosed")
        );
        assert!(BranchPattern::new("{a,b").unwrap_err().contains("unclosed"));
        assert!(BranchPattern::new(&"a".repeat(MAX_BRANCH_PATTERN_LEN)).is_ok());
        assert!(BranchPattern::new(&"a".repeat(MAX_BRANCH_PATTERN_LEN + 1)).is_err());
        let err = branch_patterns(&["ok".into(), "x[".into()]).unwrap_err();
        assert!(err.contains("\"x[\""), "{err}");
    }
}
