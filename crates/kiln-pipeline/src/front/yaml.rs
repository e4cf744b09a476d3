//! The one reading of the text: the events of `granit_parser` (the YAML
//! parser of serde-saphyr, without its serde layer) into a tree of nodes with their locations, within
//! budgets of depth and of nodes read through aliases; and the scalars of that
//! tree seen as serde_norway saw them before (YAML 1.2 core types; a
//! scalar's text as written where the schema takes any scalar as text,
//! `3.10` staying `3.10`).

use std::borrow::Cow;
use std::collections::HashMap;

use granit_parser::{Event, Parser, ScalarStyle, ScanError, Span};
use serde::de::Unexpected;

/// Deepest nesting of lists and mappings read (a `jobs:` file needs 7).
const MAX_DEPTH: usize = 24;
/// Most nodes read through aliases (the nodes of the text itself are
/// bounded by its size).
const MAX_ALIASED: usize = 100_000;

/// A node of the document and where it starts (for a node read through an
/// alias, where the anchored node starts).
#[derive(Debug, Clone)]
pub(crate) struct N<'t> {
    pub(crate) value: Node<'t>,
    pub(crate) line: usize,
    pub(crate) column: usize,
}

#[derive(Debug, Clone)]
pub(crate) enum Node<'t> {
    /// A scalar and whether it is plain (unquoted, untagged, not a block
    /// scalar): only plain scalars are numbers, bools or nulls.
    Scalar(Cow<'t, str>, bool),
    Seq(Vec<N<'t>>),
    Map(Vec<(N<'t>, N<'t>)>),
}

/// An error of the YAML: where, when known, and the message.
pub(crate) type YamlError = (Option<(usize, usize)>, String);

fn error(span: &Span, message: impl Into<String>) -> YamlError {
    let at = (span.start.line(), span.start.col() + 1);
    (Some(at), message.into())
}

fn scan_error(e: &ScanError) -> YamlError {
    let at = (e.marker().line(), e.marker().col() + 1);
    let message = match e.info().as_str() {
        // The parser's limit of nested flow collections.
        "recursion limit exceeded" => "too many nested or unclosed flow collections (`[`, `{`) \
                                       up to here; write lists and mappings in block style (one \
                                       item per line) instead"
            .to_owned(),
        "while parsing node, found unknown anchor" => "unknown anchor".to_owned(),
        info => info.to_owned(),
    };
    (Some(at), message)
}

/// A collection being read: the node, the key waiting for its value (in a
/// mapping), its anchor and the node count where it started.
struct Open<'t> {
    node: N<'t>,
    key: Option<N<'t>>,
    anchor: usize,
    start: usize,
}

/// Reads the one document of `text`; a file without a document (only
/// comments) is an empty scalar after its last line.
pub(crate) fn read(text: &str) -> Result<N<'_>, YamlError> {
    let mut stack: Vec<Open<'_>> = Vec::new();
    let mut anchors: HashMap<usize, (N<'_>, usize)> = HashMap::new();
    let mut root = None;
    let (mut nodes, mut aliased) = (0usize, 0usize);
    for event in Parser::new_from_str(text) {
        let (event, span) = event.map_err(|e| scan_error(&e))?;
        // A node is placed where it starts, or at its anchor (`&name`).
        let at = |value, anchor: usize| {
            let (line, column) = (span.start.line(), span.start.col() + 1);
            let anchored = span.start.byte_offset().filter(|_| anchor != 0);
            let (line, column) = anchored
                .and_then(|offset| anchor_place(text, offset, line))
                .unwrap_or((line, column));
            N {
                value,
                line,
                column,
            }
        };
        let (done, anchor, start) = match event {
            Event::DocumentStart(..) if root.is_some() => {
                return Err(error(
                    &span,
                    "the file holds more than one document (`---`); a pipeline is one document",
                ));
            }
            Event::Scalar(value, style, anchor, tag) => {
                let plain = style == ScalarStyle::Plain && tag.is_none();
                // The parser reads an empty value (`key:`) as `~`, placed at
                // its `:`; it is the empty text, placed right after the `:`
                // (as serde_norway did).
                let source = span.start.byte_offset().and_then(|o| text.get(o..));
                let empty = plain && value == "~" && !source.is_some_and(|s| s.starts_with('~'));
                let mut value = if empty { Cow::Borrowed("") } else { value };
                // A block scalar ending the file without a line break has
                // none (as libyaml, and serde_norway, read it).
                if matches!(style, ScalarStyle::Literal | ScalarStyle::Folded)
                    && span.end.byte_offset() == Some(text.len())
                    && !text.ends_with('\n')
                    && value.ends_with('\n')
                {
                    value.to_mut().pop();
                }
                let mut node = at(Node::Scalar(value, plain), anchor);
                if empty && let Some(offset) = span.start.byte_offset() {
                    node.column = after_indicator(text, offset, node.column);
                }
                nodes += 1;
                (node, anchor, nodes - 1)
            }
            Event::Alias(id) => {
                let Some((node, size)) = anchors.get(&id) else {
                    return Err(error(&span, "unknown anchor"));
                };
                nodes += size;
                aliased += size;
                if aliased > MAX_ALIASED {
                    return Err(error(
                        &span,
                        too_big(format!(
                            "its aliases expand to more than {MAX_ALIASED} values"
                        )),
                    ));
                }
                (node.clone(), 0, nodes)
            }
            Event::UnresolvedAlias(_) => return Err(error(&span, "unknown anchor")),
            Event::SequenceStart(_, anchor, _) | Event::MappingStart(_, anchor, _) => {
                if stack.len() >= MAX_DEPTH {
                    return Err(error(
                        &span,
                        too_big(format!(
                            "lists and mappings nested more than {MAX_DEPTH} levels deep"
                        )),
                    ));
                }
                let value = if matches!(event, Event::SequenceStart(..)) {
                    Node::Seq(Vec::new())
                } else {
                    Node::Map(Vec::new())
                };
                nodes += 1;
                stack.push(Open {
                    node: at(value, anchor),
                    key: None,
                    anchor,
                    start: nodes - 1,
                });
                continue;
            }
            Event::SequenceEnd | Event::MappingEnd => match stack.pop() {
                Some(open) => (open.node, open.anchor, open.start),
                None => continue,
            },
            _ => continue,
        };
        if anchor != 0 {
            anchors.insert(anchor, (done.clone(), nodes - start));
        }
        match stack.last_mut() {
            None => root = Some(done),
            Some(Open {
                node:
                    N {
                        value: Node::Seq(items),
                        ..
                    },
                ..
            }) => items.push(done),
            Some(Open {
                node:
                    N {
                        value: Node::Map(entries),
                        ..
                    },
                key,
                ..
            }) => match key.take() {
                None => *key = Some(done),
                Some(k) => entries.push((k, done)),
            },
            Some(_) => {}
        }
    }
    // A file without a document is an empty one after its last line (where
    // serde_norway placed it).
    Ok(root.unwrap_or(N {
        value: Node::Scalar(Cow::Borrowed(""), true),
        line: text.lines().count() + 1,
        column: 1,
    }))
}

/// Where the anchor (`&name`) of a node starting at byte `offset` (on line
/// `line`) is: serde_norway's place of an anchored node.
fn anchor_place(text: &str, offset: usize, line: usize) -> Option<(usize, usize)> {
    let before = text.get(..offset)?.trim_end();
    let start = before
        .rfind(|c: char| c.is_whitespace() || matches!(c, '[' | '{' | ','))
        .map_or(0, |i| i + 1);
    if !before.get(start..)?.starts_with('&') {
        return None;
    }
    let line = line.saturating_sub(text.get(start..offset)?.matches('\n').count());
    let line_start = before[..start].rfind('\n').map_or(0, |i| i + 1);
    Some((line, before[line_start..start].chars().count() + 1))
}

/// The column right after the indicator (`:`, `-`, `?`) of an empty value
/// the parser placed at `offset` (at the `:`, or after the spaces that
/// follow a `-`), `column` being that place's column: where serde_norway
/// placed empty values.
fn after_indicator(text: &str, offset: usize, column: usize) -> usize {
    if text.as_bytes().get(offset) == Some(&b':') {
        return column + 1;
    }
    let before = text.get(..offset).unwrap_or_default();
    let blanks = before.len() - before.trim_end_matches([' ', '\t']).len();
    if before[..before.len() - blanks].ends_with(['-', ':', '?']) {
        column.saturating_sub(blanks)
    } else {
        column
    }
}

fn too_big(what: String) -> String {
    format!(
        "the file is too large or too deeply nested for a pipeline ({what}); write lists and \
         mappings in block style, without deep nesting or repeated aliases"
    )
}

/// The type of a scalar, as YAML 1.2's core schema (and serde_norway) resolve
/// it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Kind {
    Null,
    Bool(bool),
    Int(i128),
    Float(f64),
    Str,
}

/// A scalar: its text and its type.
pub(crate) struct Scalar<'a> {
    pub(crate) text: Cow<'a, str>,
    pub(crate) kind: Kind,
}

/// The scalar of `n`, `None` for a sequence or mapping.
pub(crate) fn scalar<'a>(n: &'a N<'_>) -> Option<Scalar<'a>> {
    match &n.value {
        Node::Scalar(v, plain) => Some(Scalar {
            text: Cow::Borrowed(v.as_ref()),
            kind: if *plain { resolve(v) } else { Kind::Str },
        }),
        Node::Seq(_) | Node::Map(_) => None,
    }
}

/// What serde calls the node in an "invalid type" message.
pub(crate) fn unexpected<'a>(n: &N<'_>, s: Option<&'a Scalar<'_>>) -> Unexpected<'a> {
    match (&n.value, s) {
        (Node::Seq(_), _) => Unexpected::Seq,
        (Node::Map(_), _) => Unexpected::Map,
        (_, None) => Unexpected::Other("node"),
        (_, Some(s)) => match s.kind {
            Kind::Null => Unexpected::Unit,
            Kind::Bool(b) => Unexpected::Bool(b),
            Kind::Int(i) => match (i64::try_from(i), u64::try_from(i)) {
                (_, Ok(u)) => Unexpected::Unsigned(u),
                (Ok(i), _) => Unexpected::Signed(i),
                _ => Unexpected::Other("integer"),
            },
            Kind::Float(f) => Unexpected::Float(f),
            Kind::Str => Unexpected::Str(&s.text),
        },
    }
}

/// Resolves a plain scalar.
fn resolve(v: &str) -> Kind {
    match v {
        "" | "~" | "null" | "Null" | "NULL" => return Kind::Null,
        "true" | "True" | "TRUE" => return Kind::Bool(true),
        "false" | "False" | "FALSE" => return Kind::Bool(false),
        ".inf" | ".Inf" | ".INF" | "+.inf" | "+.Inf" | "+.INF" => {
            return Kind::Float(f64::INFINITY);
        }
        "-.inf" | "-.Inf" | "-.INF" => return Kind::Float(f64::NEG_INFINITY),
        ".nan" | ".NaN" | ".NAN" => return Kind::Float(f64::NAN),
        _ => {}
    }
    let (negative, digits) = match v.as_bytes().first() {
        Some(b'-') => (true, &v[1..]),
        Some(b'+') => (false, &v[1..]),
        _ => (false, v),
    };
    let radix = [("0x", 16), ("0o", 8), ("0b", 2)]
        .into_iter()
        .find_map(|(prefix, radix)| digits.strip_prefix(prefix).map(|d| (d, radix)));
    let int = match radix {
        Some((d, radix)) => i128::from_str_radix(d, radix).ok(),
        None if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) => {
            digits.parse::<i128>().ok()
        }
        None => None,
    };
    if let Some(i) = int
        && !digits.starts_with(['+', '-'])
    {
        return Kind::Int(if negative { -i } else { i });
    }
    let number_like = digits
        .bytes()
        .next()
        .is_some_and(|b| b.is_ascii_digit() || b == b'.')
        && digits.bytes().any(|b| b.is_ascii_digit())
        && digits
            .bytes()
            .all(|b| b.is_ascii_digit() || matches!(b, b'.' | b'e' | b'E' | b'+' | b'-'));
    match number_like.then(|| v.parse::<f64>()) {
        Some(Ok(f)) => Kind::Float(f),
        _ => Kind::Str,
    }
}
