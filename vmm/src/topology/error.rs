//! Errors of reading a topology, each naming the file, the place in it and the field, and
//! saying what would be valid.

use std::fmt;
use std::ops::Range;

use super::locate::Document;

/// Where in a topology file an error is: the file and, when TOML gave one, the position.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    /// The file as the caller named it (a path, or `<built-in NAME.toml>`).
    pub origin: String,
    /// 1-based line and column (in characters), when the error has a place in the text.
    pub position: Option<(usize, usize)>,
}

impl Location {
    /// The location of the byte at `offset` in `text`.
    pub(super) fn at(origin: &str, text: &str, offset: usize) -> Self {
        // Clamp and step back to a character boundary so that no offset can panic.
        let mut offset = offset.min(text.len());
        while !text.is_char_boundary(offset) {
            offset -= 1;
        }
        let before = &text[..offset];
        let line = before.matches('\n').count() + 1;
        let line_start = before.rfind('\n').map_or(0, |newline| newline + 1);
        let column = before[line_start..].chars().count() + 1;
        Self { origin: origin.to_owned(), position: Some((line, column)) }
    }

    /// The whole file, for errors about the machine as a whole.
    pub(super) fn file(origin: &str) -> Self {
        Self { origin: origin.to_owned(), position: None }
    }
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.position {
            Some((line, column)) => write!(f, "{}:{line}:{column}", self.origin),
            None => f.write_str(&self.origin),
        }
    }
}

/// Why a topology could not be read. The `Display` form is the whole message for the user:
/// `{file}:{line}:{column}: {field}: {what is wrong and what would be valid}`.
#[derive(Debug, thiserror::Error)]
pub enum TopologyError {
    /// The file could not be read. (The I/O error is part of the message rather than a
    /// `source`, so that error reporters that print the chain do not print it twice.)
    #[error("{path}: cannot read the topology file: {error}")]
    Read {
        /// The path as given.
        path: String,
        /// What the operating system said.
        error: std::io::Error,
    },
    /// A `--topology` argument that is neither an existing file nor a shipped topology.
    #[error(
        "{arg}: no such file, and no shipped topology has this name; shipped topologies: {}",
        .shipped.join(", ")
    )]
    NotFound {
        /// The argument as given.
        arg: String,
        /// Names of the shipped topologies, without `.toml`.
        shipped: Vec<String>,
    },
    /// The text is not TOML at all.
    #[error("{at}: not valid TOML: {message}")]
    Syntax {
        /// Where the TOML parser stopped.
        at: Location,
        /// The parser's complaint.
        message: String,
    },
    /// One field is wrong: an unknown key, a value of the wrong type, or a value that does not
    /// describe a machine the VMM can build.
    #[error("{at}: {field}: {message}")]
    Field {
        /// Where the field is.
        at: Location,
        /// Its path, like `node[1].cpus` or `distances.matrix[0][1]`.
        field: String,
        /// What is wrong and what would be valid.
        message: String,
    },
    /// The machine as a whole is wrong (no vCPUs, a gap in the vCPU numbers, too much memory).
    #[error("{at}: {message}")]
    Machine {
        /// The file (these errors have no single place in it).
        at: Location,
        /// What is wrong and what would be valid.
        message: String,
    },
}

impl TopologyError {
    /// Converts an error of `toml::from_str`: a syntax error, or a schema error (unknown key,
    /// wrong type) which is given the path of the field it is in.
    pub(super) fn from_toml(error: &toml::de::Error, text: &str, origin: &str) -> Self {
        let at = match error.span() {
            Some(span) => Location::at(origin, text, span.start),
            None => Location::file(origin),
        };
        // toml writes "what\nexpected what" on two lines; keep the message on one.
        let message =
            error.message().lines().map(str::trim).filter(|line| !line.is_empty()).collect::<Vec<_>>().join(": ");
        // The schema (serde) errors are the ones in text that is well-formed TOML.
        let Some(document) = Document::parse(text) else {
            return Self::Syntax { at, message };
        };
        let field = error.span().and_then(|span| document.field_at(span.start));
        let (field, message) = in_toml_words(field, &message);
        match field {
            Some(field) => Self::Field { at, field, message },
            None => Self::Machine { at, message },
        }
    }

    /// An error in one field, placed at `span`.
    pub(super) fn field(
        source: Source<'_>,
        span: &Range<usize>,
        field: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        Self::Field {
            at: Location::at(source.origin, source.text, span.start),
            field: field.into(),
            message: message.into(),
        }
    }

    /// An error in a field that is missing from the top level, so it has no place in the text.
    pub(super) fn field_in_file(source: Source<'_>, field: impl Into<String>, message: impl Into<String>) -> Self {
        Self::Field { at: Location::file(source.origin), field: field.into(), message: message.into() }
    }

    /// An error about the machine as a whole.
    pub(super) fn machine(source: Source<'_>, message: impl Into<String>) -> Self {
        Self::Machine { at: Location::file(source.origin), message: message.into() }
    }
}

/// The text being parsed and the name to report it by.
#[derive(Debug, Clone, Copy)]
pub(super) struct Source<'a> {
    pub text: &'a str,
    pub origin: &'a str,
}

impl Source<'_> {
    /// The span of the top-level table `key`, for errors about a key missing from it.
    pub(super) fn table_span(&self, key: &str) -> Option<Range<usize>> {
        Document::parse(self.text)?.table_span(key)
    }
}

/// Rewrites serde's vocabulary (map, sequence, field) into TOML's (table, array, key), and
/// explains two likely mistakes: `[node]` for `[[node]]`, and a dotted key (`id.x = 0`) where
/// a value belongs.
fn in_toml_words(field: Option<String>, message: &str) -> (Option<String>, String) {
    // `toml::Spanned` complains in its own terms when it is given a table: the error is at the
    // table's first key, and the field that should have been a value is the one above it.
    if message.contains("expected a borrowed string") {
        if let Some((value, _)) = field.as_deref().and_then(|field| field.rsplit_once('.')) {
            return (
                Some(value.to_owned()),
                "must be a value, not a table: is there a stray dot in the key?".to_owned(),
            );
        }
    }
    let message = message
        .replace("unknown field", "unknown key")
        .replace("invalid type: map", "invalid type: table")
        .replace("invalid type: sequence", "invalid type: array")
        .replace("expected a sequence", "expected an array");
    let message = match field.as_deref() {
        Some(array @ ("node" | "distances.pair")) if message.contains("table, expected an array") => {
            format!("{message}; write each entry as its own [[{array}]] table")
        }
        _ => message,
    };
    (field, message)
}
