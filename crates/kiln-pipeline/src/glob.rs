//! Branch patterns of `when: {branch: ...}`.
//!
//! A pattern is matched against the whole branch name (`main`,
//! `release/1.2`, not `refs/heads/main`): `**` matches any text, `/`
//! included; `*` matches any text within one path segment (no `/`); every
//! other character matches itself. Matching is a dynamic program over the
//! pattern and the branch, so it takes time proportional to their product,
//! whatever the pattern.

/// Longest accepted pattern, in characters.
pub(crate) const MAX_PATTERN_LEN: usize = 256;

/// Characters refused in a pattern, so that they can become wildcards later.
const RESERVED: &[char] = &['?', '[', ']', '{', '}', '\\'];

/// Checks a pattern of `when.branch`; the error says why it is invalid.
pub(crate) fn check_pattern(pattern: &str) -> Result<(), String> {
    if pattern.is_empty() {
        return Err("it is empty".to_owned());
    }
    if pattern.chars().count() > MAX_PATTERN_LEN {
        return Err(format!("it is longer than {MAX_PATTERN_LEN} characters"));
    }
    if let Some(c) = pattern
        .chars()
        .find(|c| c.is_whitespace() || c.is_control())
    {
        return Err(format!(
            "it contains {c:?}, and branch names have no whitespace or control characters"
        ));
    }
    if let Some(c) = pattern.chars().find(|c| RESERVED.contains(c)) {
        return Err(format!(
            "`{c}` is reserved; only `*` (any text within a path segment) and `**` \
             (any text, `/` included) are wildcards, and a list of patterns gives \
             alternatives"
        ));
    }
    if pattern.contains("***") {
        return Err("`***` is not a wildcard, write `*` or `**`".to_owned());
    }
    Ok(())
}

#[derive(Clone, Copy)]
enum Token {
    /// One character.
    Char(char),
    /// `*`: any text without `/`.
    Star,
    /// `**`: any text.
    StarStar,
}

fn tokens(pattern: &str) -> Vec<Token> {
    let mut out = Vec::new();
    let mut chars = pattern.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '*' {
            out.push(Token::Char(c));
        } else if chars.peek() == Some(&'*') {
            while chars.peek() == Some(&'*') {
                chars.next();
            }
            out.push(Token::StarStar);
        } else {
            out.push(Token::Star);
        }
    }
    out
}

/// Whether `branch` matches `pattern` as a whole (see the module docs).
pub(crate) fn matches(pattern: &str, branch: &str) -> bool {
    let text: Vec<char> = branch.chars().collect();
    // `reach[j]`: the pattern read so far matches the first `j` characters.
    let mut reach = vec![false; text.len() + 1];
    reach[0] = true;
    let mut next = vec![false; text.len() + 1];
    for token in tokens(pattern) {
        match token {
            Token::Char(c) => {
                next[0] = false;
                for j in 0..text.len() {
                    next[j + 1] = reach[j] && text[j] == c;
                }
            }
            Token::Star => {
                next[0] = reach[0];
                for j in 0..text.len() {
                    next[j + 1] = reach[j + 1] || (next[j] && text[j] != '/');
                }
            }
            Token::StarStar => {
                next[0] = reach[0];
                for j in 0..text.len() {
                    next[j + 1] = reach[j + 1] || next[j];
                }
            }
        }
        std::mem::swap(&mut reach, &mut next);
        if !reach.contains(&true) {
            return false;
        }
    }
    reach[text.len()]
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn literal_and_wildcards() {
        assert!(matches("main", "main"));
        assert!(!matches("main", "main2"));
        assert!(!matches("main", "mai"));
        assert!(matches("release/*", "release/1.2"));
        assert!(!matches("release/*", "release/1.2/hotfix"));
        assert!(!matches("release/*", "release"));
        assert!(matches("release/*", "release/"));
        assert!(matches("release/**", "release/1.2/hotfix"));
        assert!(matches("**", "a/b/c"));
        assert!(matches("**", ""));
        assert!(matches("*", "main"));
        assert!(!matches("*", "feature/x"));
        assert!(matches("feature/*-fix", "feature/abc-fix"));
        assert!(!matches("feature/*-fix", "feature/a/b-fix"));
        assert!(matches("**/fix", "a/b/fix"));
        assert!(matches("**fix", "a/b/fix"));
        assert!(matches("a/**/z", "a/b/c/z"));
        assert!(matches("a/**/z", "a//z"));
        assert!(!matches("a/**/z", "a/z"));
        assert!(matches("*.*", "v1.2"));
        assert!(matches("é*", "été"));
    }

    #[test]
    fn many_stars_stay_fast() {
        let pattern = "*a".repeat(100);
        let branch = "a".repeat(10_000);
        assert!(matches(&pattern, &branch));
        assert!(!matches(&pattern, &"b".repeat(10_000)));
        let pattern = format!("{}b", "**a".repeat(80));
        assert!(!matches(&pattern, &branch));
    }

    #[test]
    fn pattern_checks() {
        assert!(check_pattern("release/**").is_ok());
        assert!(check_pattern("").is_err());
        assert!(check_pattern("a b").is_err());
        assert!(check_pattern("v[0-9]").unwrap_err().contains("reserved"));
        assert!(check_pattern("{a,b}").is_err());
        assert!(check_pattern("a?").is_err());
        assert!(check_pattern("a/***").is_err());
        assert!(check_pattern(&"a".repeat(MAX_PATTERN_LEN)).is_ok());
        assert!(check_pattern(&"a".repeat(MAX_PATTERN_LEN + 1)).is_err());
    }
}
