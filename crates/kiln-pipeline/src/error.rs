//! The error type of the crate.

use crate::MAX_FILE_SIZE;

/// Why a pipeline could not be parsed or detected.
///
/// `Display` reads `file:line:column: message` whenever the location is
/// known, for example
///
/// ```text
/// .kiln.yml:3:5: unknown field `rn`, expected one of `name`, `run`, `env`, `timeout`, `labels`
/// ```
///
/// and `file: message` otherwise. Lines and columns are 1-based; columns
/// count characters.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PipelineError {
    /// The pipeline file is larger than [`MAX_FILE_SIZE`].
    #[error("{file}: the file is {size} bytes, more than the limit of {limit} bytes (1 MiB)")]
    TooLarge {
        /// The file name passed to [`parse`](crate::parse).
        file: String,
        /// Size of the text in bytes.
        size: usize,
        /// The limit in bytes ([`MAX_FILE_SIZE`]).
        limit: usize,
    },
    /// The pipeline file is empty, or holds only whitespace and comments.
    #[error(
        "{file}: the file is empty; it must be a mapping with a non-empty `steps` list or \
         `jobs` mapping"
    )]
    Empty {
        /// The file name passed to [`parse`](crate::parse).
        file: String,
    },
    /// The file is not valid YAML, does not follow the schema (unknown key,
    /// wrong type, missing key) or breaks a rule of the schema (empty
    /// `steps`, duplicate step name, invalid duration, unknown dependency,
    /// cycle, ...); or, from [`plan`](crate::plan), the pipeline cannot be
    /// planned (conflicting runner labels in one job, ...), without a
    /// location then.
    #[error("{}", located(file, *line, *column, message))]
    Invalid {
        /// The file name passed to [`parse`](crate::parse).
        file: String,
        /// 1-based line of the offending text, when known.
        line: Option<usize>,
        /// 1-based column of the offending text, when known.
        column: Option<usize>,
        /// What is wrong, without the location.
        message: String,
    },
    /// The repository has no pipeline file and no default pipeline applies.
    #[error(
        "no `{}` found at the repository root and no project kiln knows how to test \
         (looked for pyproject.toml, setup.py, setup.cfg, requirements*.txt, package.json \
         with a test script, go.mod, Cargo.toml, a Makefile with a `test` target, \
         tests/test*.py); start from this `{}`:\n{}",
        crate::FILE_NAME,
        crate::FILE_NAME,
        crate::STARTER
    )]
    NothingDetected,
}

fn located(file: &str, line: Option<usize>, column: Option<usize>, message: &str) -> String {
    match (line, column) {
        (Some(line), Some(column)) => format!("{file}:{line}:{column}: {message}"),
        (Some(line), None) => format!("{file}:{line}: {message}"),
        _ => format!("{file}: {message}"),
    }
}

impl PipelineError {
    /// The 1-based line of the error in the pipeline file, when known.
    #[must_use]
    pub fn line(&self) -> Option<usize> {
        match self {
            Self::Invalid { line, .. } => *line,
            _ => None,
        }
    }

    /// The 1-based column of the error in the pipeline file, when known.
    #[must_use]
    pub fn column(&self) -> Option<usize> {
        match self {
            Self::Invalid { column, .. } => *column,
            _ => None,
        }
    }

    /// The name of the file the error is about, if it is about a file.
    #[must_use]
    pub fn file(&self) -> Option<&str> {
        match self {
            Self::TooLarge { file, .. } | Self::Empty { file } | Self::Invalid { file, .. } => {
                Some(file)
            }
            Self::NothingDetected => None,
        }
    }

    pub(crate) fn too_large(file: &str, size: usize) -> Self {
        Self::TooLarge {
            file: file.to_owned(),
            size,
            limit: MAX_FILE_SIZE,
        }
    }

    pub(crate) fn empty(file: &str) -> Self {
        Self::Empty {
            file: file.to_owned(),
        }
    }
}
