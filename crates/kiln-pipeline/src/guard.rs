//! A guard against YAML that would take the parser too long.
//!
//! The scanner of libyaml (which serde_norway uses, as a Rust port) does work
//! proportional to the current nesting depth of flow collections (`[...]`,
//! `{...}`) for every token, so a document of deeply nested flow collections
//! takes time quadratic in its size: 100 KB of `[{` takes about a minute.
//! This module bounds that work *before* the parser runs, with an estimate
//! that never underestimates the real depth.
//!
//! The estimate counts every `[` and `{` byte as an opening, wherever it is
//! (a quoted string, a comment, a block scalar, ...), and lets a `]` or `}`
//! cancel the most recent unmatched opening only if no `'`, `"`, `#`, `!` or
//! `%` byte lies between them (closings that match nothing are ignored).
//! Why that never underestimates: if the opening is a real flow indicator,
//! libyaml is in flow context from there on; in flow context, plain scalars,
//! anchors and aliases cannot contain brackets and block scalars do not
//! exist, so the only places a bracket can hide in are quoted scalars,
//! comments, tags and directives, which all start with one of those five
//! bytes. Hence, with none of them in between and the brackets in between
//! balanced, the closing is a real flow indicator closing that opening, and
//! a real opening is only ever cancelled by a real closing. Fake openings
//! (in strings, scripts, comments) only make the estimate larger.
//!
//! The work estimate is the sum over all bytes of the estimated depth there,
//! which bounds the scanner's work up to a constant factor. Ordinary files,
//! even large ones, stay far below the limit; balanced brackets in scripts
//! (`[ -f x ]`, `${VAR}`) cancel out.

/// Largest accepted work estimate: well under a second of parsing in the
/// worst case (measured: about 5 to 10 ns per unit in a release build),
/// while a 1 MiB file with 40 brackets open all along still fits, and so
/// does a file of about 1000 one-line flow-style steps with quoted strings (each
/// leaves its brackets open in the estimate, since a quote separates them
/// from their closings).
const MAX_FLOW_WORK: u64 = 50_000_000;

/// Where the estimated work went over the limit.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct TooComplex {
    /// 1-based line.
    pub(crate) line: usize,
    /// 1-based column, in characters.
    pub(crate) column: usize,
}

/// Checks that parsing `text` takes bounded time (see the module docs).
pub(crate) fn check_flow_nesting(text: &str) -> Result<(), TooComplex> {
    // Unmatched openings that can no longer be cancelled (a separator byte
    // came after them).
    let mut locked: u64 = 0;
    // Unmatched openings since the last separator byte.
    let mut open: u64 = 0;
    let mut work: u64 = 0;
    let mut line = 1;
    let mut column = 0;
    for &byte in text.as_bytes() {
        // Columns count characters: skip UTF-8 continuation bytes.
        if byte & 0xC0 != 0x80 {
            column += 1;
        }
        match byte {
            b'[' | b'{' => open += 1,
            b']' | b'}' => open = open.saturating_sub(1),
            b'\'' | b'"' | b'#' | b'!' | b'%' => {
                locked += open;
                open = 0;
            }
            b'\n' => {
                line += 1;
                column = 0;
            }
            _ => {}
        }
        work = work.saturating_add(locked + open);
        if work > MAX_FLOW_WORK {
            return Err(TooComplex {
                line,
                column: column.max(1),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn ordinary_text_passes() {
        let script = "run: |\n  if [ -f x ]; then echo ${HOME}; fi\n".repeat(20_000);
        assert!(script.len() > 800_000);
        assert_eq!(check_flow_nesting(&script), Ok(()));
        let flow = "  - {name: a, run: \"make ${T}\", env: {A: '1'}}\n".repeat(1000);
        assert_eq!(check_flow_nesting(&flow), Ok(()));
        let open = format!("{}{}", "[".repeat(40), "x".repeat(1024 * 1024 - 40));
        assert_eq!(check_flow_nesting(&open), Ok(()));
    }

    #[test]
    fn deep_nesting_is_rejected_early() {
        let deep = format!("steps: {}", "[".repeat(100_000));
        let err = check_flow_nesting(&deep).unwrap_err();
        assert_eq!(err.line, 1);
        // Depth d costs about d²/2 by the estimate: 10_000 levels reach 5e7.
        assert_eq!(err.column, 10_007, "{err:?}");
    }

    #[test]
    fn brackets_hidden_in_strings_do_not_cancel() {
        // Real openings followed by closings inside quoted strings.
        let unit = "[ \"]\", ";
        let text = format!("x: {}", unit.repeat(20_000));
        assert!(check_flow_nesting(&text).is_err());
        let unit = "[ '}', ";
        let text = format!("x: {}", unit.repeat(20_000));
        assert!(check_flow_nesting(&text).is_err());
        let unit = "[ !t] ";
        let text = format!("x: {}", unit.repeat(20_000));
        assert!(check_flow_nesting(&text).is_err());
    }
}
