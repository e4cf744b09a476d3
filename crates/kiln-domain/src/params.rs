//! Build parameters: environment variables a build is submitted with ("build with parameters",
//! `kiln submit --env NAME=VALUE`). They reach every step of every job of the build and win over
//! the pipeline's `env` (file, job, step and matrix variables); kiln's own variables (`KILN`,
//! `KILN_*`) and the dispatcher's secrets cannot be named. The limits keep a build's row and
//! its assignments small.

use std::collections::BTreeMap;

/// Most parameters one build may have.
pub const MAX_PARAMS: usize = 64;
/// Longest parameter name, in bytes.
pub const MAX_NAME_LEN: usize = 128;
/// Longest parameter value, in bytes.
pub const MAX_VALUE_LEN: usize = 4096;

/// Whether `name` is an environment variable name kiln accepts: `[A-Za-z_][A-Za-z0-9_]*`.
pub fn is_env_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    bytes
        .next()
        .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// Whether `name` is one of kiln's own variables (`KILN`, `KILN_*`), which a parameter may not
/// set.
pub fn is_reserved(name: &str) -> bool {
    name == "KILN" || name.starts_with("KILN_")
}

/// What is wrong with one parameter, or `None`: the checks that need nothing but the pair
/// (name syntax, lengths, NUL, kiln's own names). Each message names the variable.
pub fn check(name: &str, value: &str) -> Option<String> {
    let shown = if name.len() > 40 {
        format!("{:?}...", name.chars().take(40).collect::<String>())
    } else {
        format!("{name:?}")
    };
    if name.is_empty() {
        return Some("a variable has an empty name".into());
    }
    if name.len() > MAX_NAME_LEN {
        return Some(format!(
            "variable {shown}: the name is longer than {MAX_NAME_LEN} bytes"
        ));
    }
    if !is_env_name(name) {
        return Some(format!(
            "variable {shown}: not a variable name (letters, digits and _, not starting with a digit)"
        ));
    }
    if is_reserved(name) {
        return Some(format!(
            "variable {shown}: KILN and KILN_* are kiln's own variables"
        ));
    }
    if value.len() > MAX_VALUE_LEN {
        return Some(format!(
            "variable {shown}: the value is longer than {MAX_VALUE_LEN} bytes"
        ));
    }
    if value.contains('\0') {
        return Some(format!("variable {shown}: the value contains a NUL byte"));
    }
    None
}

/// What is wrong with a whole set of parameters, or `None`: each pair's [`check`], their count,
/// and names that are also `secrets`.
pub fn check_all(
    params: &BTreeMap<String, String>,
    is_secret: impl Fn(&str) -> bool,
) -> Option<String> {
    if params.len() > MAX_PARAMS {
        return Some(format!(
            "at most {MAX_PARAMS} variables, got {}",
            params.len()
        ));
    }
    for (name, value) in params {
        if let Some(why) = check(name, value) {
            return Some(why);
        }
        if is_secret(name) {
            return Some(format!(
                "variable {name:?}: a secret of the dispatcher has this name"
            ));
        }
    }
    None
}

/// One `NAME=VALUE` (as `kiln submit --env` and the web form take them): split at the first
/// `=`; the name must be a variable name. The value is taken as written (it may be empty or
/// hold `=`).
pub fn parse_assignment(s: &str) -> Result<(String, String), String> {
    let Some((name, value)) = s.split_once('=') else {
        return Err(format!("{s:?} is not NAME=VALUE"));
    };
    if !is_env_name(name) {
        return Err(format!(
            "{name:?} (in {s:?}) is not a variable name (letters, digits and _, not starting with a digit)"
        ));
    }
    Ok((name.to_string(), value.to_string()))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn names() {
        for ok in ["A", "_", "a_b9", "_9", "Path"] {
            assert!(is_env_name(ok), "{ok}");
        }
        for bad in ["", "9A", "A-B", "A B", "É", "A=B", "a.b"] {
            assert!(!is_env_name(bad), "{bad}");
        }
        assert!(is_reserved("KILN") && is_reserved("KILN_X") && is_reserved("KILN_"));
        assert!(!is_reserved("KILNX") && !is_reserved("kiln_x"));
    }

    #[test]
    fn each_check_names_the_variable() {
        assert_eq!(check("GREETING", "hi"), None);
        assert_eq!(check("EMPTY", ""), None);
        assert_eq!(check("V", &"x".repeat(MAX_VALUE_LEN)), None);
        assert_eq!(check(&"N".repeat(MAX_NAME_LEN), ""), None);
        let cases = [
            ("1X".to_string(), "v".to_string(), "\"1X\""),
            ("A-B".into(), "v".into(), "\"A-B\""),
            ("KILN_BRANCH".into(), "v".into(), "kiln's own"),
            ("KILN".into(), "v".into(), "kiln's own"),
            ("NUL".into(), "a\0b".into(), "NUL"),
            (
                "BIG".into(),
                "x".repeat(MAX_VALUE_LEN + 1),
                "\"BIG\": the value is longer",
            ),
            ("N".repeat(MAX_NAME_LEN + 1), "v".into(), "name is longer"),
        ];
        for (name, value, want) in cases {
            let why = check(&name, &value).unwrap_or_else(|| panic!("{name} accepted"));
            assert!(why.contains(want), "{name}: {why}");
        }
        assert!(check("", "v").is_some());
    }

    #[test]
    fn the_set_is_bounded_and_keeps_off_secrets() {
        assert_eq!(check_all(&map(&[("A", "1")]), |_| false), None);
        let many: BTreeMap<String, String> = (0..=MAX_PARAMS)
            .map(|i| (format!("V{i}"), String::new()))
            .collect();
        let why = check_all(&many, |_| false).unwrap();
        assert!(why.contains("at most 64"), "{why}");
        let exactly: BTreeMap<String, String> = many.into_iter().take(MAX_PARAMS).collect();
        assert_eq!(check_all(&exactly, |_| false), None);
        let why = check_all(&map(&[("A", "1"), ("TOKEN", "x")]), |n| n == "TOKEN").unwrap();
        assert!(why.contains("\"TOKEN\"") && why.contains("secret"), "{why}");
    }

    #[test]
    fn assignments() {
        assert_eq!(parse_assignment("A=1"), Ok(("A".into(), "1".into())));
        assert_eq!(parse_assignment("A="), Ok(("A".into(), String::new())));
        assert_eq!(
            parse_assignment("URL=a=b c"),
            Ok(("URL".into(), "a=b c".into()))
        );
        for bad in ["A", "=1", "1A=x", "A B=x", " A=x"] {
            assert!(parse_assignment(bad).is_err(), "{bad}");
        }
    }
}
