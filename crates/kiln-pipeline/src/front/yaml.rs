//! The one reading of the text: serde-saphyr (with its `Budget`, which bounds
//! depth, nodes and alias replay) into a tree of [`Spanned`] nodes, and the
//! scalars of that tree seen as serde_norway saw them before (YAML 1.2 core
//! types; a scalar's text as written where the schema takes any scalar as
//! text, `3.10` staying `3.10`).

use std::borrow::Cow;
use std::fmt;
use std::marker::PhantomData;

use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Unexpected, Visitor};
pub(crate) use serde_saphyr::Spanned;

/// A node of the document.
#[derive(Debug)]
pub(crate) enum Node<'t> {
    /// A plain empty, `~` or `null` scalar.
    Null,
    /// Any other scalar: its value when serde-saphyr gave a string, else
    /// `None` (a number or bool, whose text the span gives).
    Scalar(Option<Cow<'t, str>>),
    Seq(Vec<N<'t>>),
    Map(Vec<(N<'t>, N<'t>)>),
}

/// A node with its location.
pub(crate) type N<'t> = Spanned<Node<'t>>;

impl<'de> Deserialize<'de> for Node<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(NodeVisitor(PhantomData))
    }
}

struct NodeVisitor<'de>(PhantomData<&'de ()>);

macro_rules! scalar_visits {
    ($($f:ident: $t:ty),*) => {$(
        fn $f<E: de::Error>(self, _: $t) -> Result<Node<'de>, E> {
            Ok(Node::Scalar(None))
        }
    )*};
}

impl<'de> Visitor<'de> for NodeVisitor<'de> {
    type Value = Node<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any YAML node")
    }

    scalar_visits!(visit_bool: bool, visit_i64: i64, visit_u64: u64, visit_i128: i128,
        visit_u128: u128, visit_f64: f64, visit_char: char);

    fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Node<'de>, E> {
        Ok(Node::Scalar(Some(Cow::Borrowed(v))))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Node<'de>, E> {
        Ok(Node::Scalar(Some(Cow::Owned(v.to_owned()))))
    }

    fn visit_string<E: de::Error>(self, v: String) -> Result<Node<'de>, E> {
        Ok(Node::Scalar(Some(Cow::Owned(v))))
    }

    fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<Node<'de>, E> {
        Ok(Node::Scalar(Some(Cow::Owned(
            String::from_utf8_lossy(v).into_owned(),
        ))))
    }

    fn visit_unit<E: de::Error>(self) -> Result<Node<'de>, E> {
        Ok(Node::Null)
    }

    fn visit_none<E: de::Error>(self) -> Result<Node<'de>, E> {
        Ok(Node::Null)
    }

    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Node<'de>, D::Error> {
        d.deserialize_any(self)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Node<'de>, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element()? {
            items.push(item);
        }
        Ok(Node::Seq(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Node<'de>, A::Error> {
        let mut entries = Vec::new();
        while let Some(entry) = map.next_entry()? {
            entries.push(entry);
        }
        Ok(Node::Map(entries))
    }
}

/// Where a node is: line, column, and for an empty value (`key:`) its byte
/// offset. For a node read through an alias, where the anchored node is.
pub(crate) fn at(n: &N<'_>) -> ((usize, usize), Option<usize>) {
    let span = n.defined.span();
    let empty = (matches!(n.value, Node::Null) && span.byte_len() == Some(0))
        .then(|| span.byte_offset().and_then(|o| usize::try_from(o).ok()))
        .flatten();
    let line_column = (to_usize(n.defined.line()), to_usize(n.defined.column()));
    (line_column, empty)
}

/// Deepest nesting of lists and mappings read.
const MAX_DEPTH: usize = 24;

/// Reads `text`; the error is its location, when known, and message.
pub(crate) fn read(text: &str) -> Result<N<'_>, (Option<(usize, usize)>, String)> {
    // Deep enough for any pipeline (a `jobs:` file needs 7 levels), and
    // shallow enough for the recursive reading of the tree on a small stack.
    let mut budget = serde_saphyr::Budget::default();
    budget.max_depth = MAX_DEPTH;
    let options = serde_saphyr::options! {
        budget: Some(budget),
        duplicate_keys: serde_saphyr::DuplicateKeyPolicy::PassThrough,
        merge_keys: serde_saphyr::MergeKeyPolicy::AsOrdinary,
        non_finite_float_policy: serde_saphyr::NonFiniteFloatPolicy::PassThrough,
        with_snippet: false,
    };
    serde_saphyr::from_str_with_options::<N>(text, options).map_err(|e| {
        let at = e
            .location()
            .map(|l| (to_usize(l.line()), to_usize(l.column())));
        let mut inner = &e;
        while let serde_saphyr::Error::AliasError { error, .. }
        | serde_saphyr::Error::WithSnippet { error, .. } = inner
        {
            inner = error;
        }
        let message = match inner {
            serde_saphyr::Error::Budget { breach, .. } => format!(
                "the file is too large or too deeply nested for a pipeline ({}); write lists \
                 and mappings in block style, without deep nesting or repeated aliases",
                describe(breach)
            ),
            serde_saphyr::Error::MultipleDocuments { .. } => {
                "the file holds more than one document (`---`); a pipeline is one document"
                    .to_owned()
            }
            _ => {
                let text = e.to_string();
                let first = text.lines().next().unwrap_or_default();
                match first.split(" at line ").next().unwrap_or(first) {
                    // The parser's limit of nested flow collections.
                    "recursion limit exceeded" => "too many nested or unclosed flow collections \
                        (`[`, `{`) up to here; write lists and mappings in block style (one \
                        item per line) instead"
                        .to_owned(),
                    message => message.to_owned(),
                }
            }
        };
        (at, message)
    })
}

/// A budget breach, for people.
fn describe(breach: &serde_saphyr::budget::BudgetBreach) -> String {
    use serde_saphyr::budget::BudgetBreach as B;
    match breach {
        B::Depth { .. } => format!("lists and mappings nested more than {MAX_DEPTH} levels deep"),
        B::Nodes { nodes } => format!("more than {} values, aliases expanded", nodes - 1),
        B::Aliases { aliases } => format!("more than {} aliases", aliases - 1),
        other => format!("{other:?}"),
    }
}

fn to_usize(n: u64) -> usize {
    usize::try_from(n).unwrap_or(usize::MAX)
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

/// The text of the node's span, when serde-saphyr knows it.
fn source<'t>(text: &'t str, n: &N<'_>) -> Option<&'t str> {
    let span = n.defined.span();
    let start = usize::try_from(span.byte_offset()?).ok()?;
    let len = usize::try_from(span.byte_len()?).ok()?;
    text.get(start..start.checked_add(len)?)
}

/// The scalar of `n`, `None` for a sequence or mapping.
pub(crate) fn scalar<'a>(text: &'a str, n: &'a N<'_>) -> Option<Scalar<'a>> {
    let raw = source(text, n).unwrap_or("");
    match &n.value {
        Node::Null => Some(Scalar {
            text: Cow::Borrowed(raw.trim()),
            kind: Kind::Null,
        }),
        Node::Scalar(Some(v)) => {
            let plain = !raw.starts_with(['\'', '"', '|', '>', '!', '&', '*']);
            let kind = if plain { resolve(v) } else { Kind::Str };
            Some(Scalar {
                text: Cow::Borrowed(v.as_ref()),
                kind,
            })
        }
        Node::Scalar(None) => {
            let raw = raw.trim();
            Some(Scalar {
                text: Cow::Borrowed(raw),
                kind: resolve(raw),
            })
        }
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
