//! Finds which field a byte offset of a TOML document lies in, so that errors serde reports
//! with only a span (unknown key, wrong type) can name the field, like `node[1].cpus[2]`.
//!
//! This reads the document with `toml_edit`, which keeps the span of every key and value.
//! (`toml::Spanned` cannot do it: it fails on tables that have no span of their own, like the
//! `distances` of a file that has `[[distances.pair]]` but no `[distances]` header.)

use std::ops::Range;

use toml_edit::{Array, ArrayOfTables, ImDocument, InlineTable, Item, Table, Value};

/// A TOML document with the spans of its keys and values.
pub(super) struct Document<'a>(ImDocument<&'a str>);

impl<'a> Document<'a> {
    /// Parses `text`, or `None` if it is not TOML.
    pub(super) fn parse(text: &'a str) -> Option<Self> {
        ImDocument::parse(text).ok().map(Self)
    }

    /// The path of the innermost key or array element whose key or value contains `offset`,
    /// like `node[1].cpus[2]`; `None` if it is in no field.
    pub(super) fn field_at(&self, offset: usize) -> Option<String> {
        let mut path = String::new();
        let mut part = Part::Table(self.0.as_table());
        while let Some(child) = part.children().into_iter().find(|child| child.contains(offset)) {
            match child.name {
                Name::Key(key) => {
                    if !path.is_empty() {
                        path.push('.');
                    }
                    path.push_str(key);
                }
                Name::Index(index) => {
                    path.push('[');
                    path.push_str(&index.to_string());
                    path.push(']');
                }
            }
            part = child.part;
        }
        (!path.is_empty()).then_some(path)
    }

    /// The span of the top-level table `key` (header and body), or of its key.
    pub(super) fn table_span(&self, key: &str) -> Option<Range<usize>> {
        let (key, item) = self.0.as_table().get_key_value(key)?;
        item.span().or_else(|| key.span())
    }
}

/// A value or table of the document, seen the same way whichever kind it is.
enum Part<'a> {
    Table(&'a Table),
    InlineTable(&'a InlineTable),
    Array(&'a Array),
    ArrayOfTables(&'a ArrayOfTables),
    Leaf(Option<Range<usize>>),
}

/// A part inside another: under a key of a table, or at an index of an array.
struct Child<'a> {
    name: Name<'a>,
    key_span: Option<Range<usize>>,
    part: Part<'a>,
}

enum Name<'a> {
    Key(&'a str),
    Index(usize),
}

impl<'a> Part<'a> {
    fn of_item(item: &'a Item) -> Self {
        match item {
            Item::None => Part::Leaf(None),
            Item::Value(value) => Part::of_value(value),
            Item::Table(table) => Part::Table(table),
            Item::ArrayOfTables(tables) => Part::ArrayOfTables(tables),
        }
    }

    fn of_value(value: &'a Value) -> Self {
        match value {
            Value::Array(array) => Part::Array(array),
            Value::InlineTable(table) => Part::InlineTable(table),
            leaf => Part::Leaf(leaf.span()),
        }
    }

    fn span(&self) -> Option<Range<usize>> {
        match self {
            Part::Table(table) => table.span(),
            Part::InlineTable(table) => table.span(),
            Part::Array(array) => array.span(),
            Part::ArrayOfTables(tables) => tables.span(),
            Part::Leaf(span) => span.clone(),
        }
    }

    fn children(&self) -> Vec<Child<'a>> {
        let entry = |(key, item): (&'a toml_edit::Key, &'a Item)| Child {
            name: Name::Key(key.get()),
            key_span: key.span(),
            part: Part::of_item(item),
        };
        let element = |(index, part)| Child { name: Name::Index(index), key_span: None, part };
        match *self {
            Part::Table(table) => table.iter().filter_map(|(key, _)| table.get_key_value(key)).map(entry).collect(),
            Part::InlineTable(table) => {
                table.iter().filter_map(|(key, _)| table.get_key_value(key)).map(entry).collect()
            }
            Part::Array(array) => array.iter().map(Part::of_value).enumerate().map(element).collect(),
            Part::ArrayOfTables(tables) => tables.iter().map(Part::Table).enumerate().map(element).collect(),
            Part::Leaf(_) => Vec::new(),
        }
    }

    /// Whether `offset` is in this part. Implicit tables (made by a dotted key or header)
    /// have no span, and a table's span does not cover its sub-tables, so look inside too.
    fn contains(&self, offset: usize) -> bool {
        self.span().is_some_and(|span| span.contains(&offset))
            || self.children().iter().any(|child| child.contains(offset))
    }
}

impl Child<'_> {
    /// Whether `offset` is in this child's key or value.
    fn contains(&self, offset: usize) -> bool {
        self.key_span.as_ref().is_some_and(|span| span.contains(&offset)) || self.part.contains(offset)
    }
}
