//! The topology file as serde reads it, before validation. Values whose range or meaning is
//! checked later are read loosely (any integer, any string) and kept with their spans, so that
//! the checks can say exactly where and what is wrong.

use std::fmt;

use serde::de::{Deserializer, Unexpected, Visitor};
use serde::Deserialize;
use toml::Spanned;

/// The whole file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a topology: name, description, [[node]] tables, [distances] and [latency]")]
pub(super) struct RawTopology {
    pub name: Option<Spanned<String>>,
    pub description: Option<String>,
    #[serde(default)]
    pub node: Vec<Spanned<RawNode>>,
    // Not `Spanned`: these tables can be implicit (`[[distances.pair]]` without a
    // `[distances]` header), and `toml::Spanned` fails on a table without a span.
    pub distances: Option<RawDistances>,
    pub latency: Option<RawLatency>,
}

/// One `[[node]]` table.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a node table with id, cpus and memory")]
pub(super) struct RawNode {
    pub id: Option<Spanned<Int>>,
    pub cpus: Option<Vec<Spanned<Int>>>,
    pub memory: Option<Spanned<RawSize>>,
}

/// The `[distances]` table: a matrix, or a list of pairs.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a distances table with either matrix or [[distances.pair]]")]
pub(super) struct RawDistances {
    pub matrix: Option<Spanned<Matrix>>,
    pub pair: Option<Vec<Spanned<RawPair>>>,
}

/// One `[[distances.pair]]` table.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a distance pair table with src, dst and val")]
pub(super) struct RawPair {
    pub src: Option<Spanned<Int>>,
    pub dst: Option<Spanned<Int>>,
    pub val: Option<Spanned<Int>>,
}

/// The `[latency]` table.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a latency table with local_ns, matrix_ns and mode")]
pub(super) struct RawLatency {
    pub local_ns: Option<Spanned<Int>>,
    pub matrix_ns: Option<Spanned<Matrix>>,
    pub mode: Option<Spanned<String>>,
}

/// A square table of integers, rows and entries with their spans.
pub(super) type Matrix = Vec<Spanned<Vec<Spanned<Int>>>>;

/// Any TOML integer; the range is checked by validation, which can say why.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Int(pub i64);

impl<'de> Deserialize<'de> for Int {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct IntVisitor;

        impl Visitor<'_> for IntVisitor {
            type Value = Int;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a whole number")
            }

            fn visit_i64<E>(self, value: i64) -> Result<Int, E> {
                Ok(Int(value))
            }

            fn visit_u64<E: serde::de::Error>(self, value: u64) -> Result<Int, E> {
                i64::try_from(value).map(Int).map_err(|_| E::invalid_value(Unexpected::Unsigned(value), &self))
            }
        }

        deserializer.deserialize_i64(IntVisitor)
    }
}

/// A memory size as written: a string like `"64M"`, or an integer of bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum RawSize {
    Text(String),
    Bytes(i64),
}

impl fmt::Display for RawSize {
    /// As it was written in the file, so that messages quote the user's own text.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RawSize::Text(text) => write!(f, "{text:?}"),
            RawSize::Bytes(bytes) => write!(f, "{bytes}"),
        }
    }
}

impl<'de> Deserialize<'de> for RawSize {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct SizeVisitor;

        impl Visitor<'_> for SizeVisitor {
            type Value = RawSize;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a size like \"64M\" or a number of bytes")
            }

            fn visit_str<E>(self, text: &str) -> Result<RawSize, E> {
                Ok(RawSize::Text(text.to_owned()))
            }

            fn visit_i64<E>(self, bytes: i64) -> Result<RawSize, E> {
                Ok(RawSize::Bytes(bytes))
            }

            fn visit_u64<E: serde::de::Error>(self, bytes: u64) -> Result<RawSize, E> {
                i64::try_from(bytes)
                    .map(RawSize::Bytes)
                    .map_err(|_| E::invalid_value(Unexpected::Unsigned(bytes), &self))
            }
        }

        deserializer.deserialize_any(SizeVisitor)
    }
}
