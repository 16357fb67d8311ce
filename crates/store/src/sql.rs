//! What the broker's SQL needs from an engine, so that its statements are
//! written once for SQLite and PostgreSQL. Statements use SQLite's numbered
//! placeholders (`?1`); the PostgreSQL engine rewrites them to `$1`. Values
//! cross the boundary as [`Param`] (in) and [`SqlValue`] (out), which each
//! engine maps to its own types; that mapping and the schemas are the only
//! places where the engines differ.

use crate::{corrupt, StoreResult};
use std::borrow::Cow;

/// A statement parameter.
#[derive(Debug, Clone)]
pub(crate) enum Param<'a> {
    Int(i64),
    OptInt(Option<i64>),
    Text(Cow<'a, str>),
    OptText(Option<&'a str>),
    Bool(bool),
}

impl<'a> From<&'a str> for Param<'a> {
    fn from(text: &'a str) -> Self {
        Param::Text(Cow::Borrowed(text))
    }
}

impl<'a> From<&'a String> for Param<'a> {
    fn from(text: &'a String) -> Self {
        Param::Text(Cow::Borrowed(text.as_str()))
    }
}

impl From<String> for Param<'_> {
    fn from(text: String) -> Self {
        Param::Text(Cow::Owned(text))
    }
}

/// Numbers are u64 in the domain and BIGINT (i64) in both databases; every
/// value the broker stores (ids, milliseconds, micro-units) is far below 2^63.
pub(crate) fn int(value: u64) -> Param<'static> {
    Param::Int(value as i64)
}

pub(crate) fn opt_int(value: Option<u64>) -> Param<'static> {
    Param::OptInt(value.map(|v| v as i64))
}

/// A column of a result row.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum SqlValue {
    Null,
    Int(i64),
    Text(String),
    Bool(bool),
}

/// One result row, read by column position.
#[derive(Debug)]
pub(crate) struct SqlRow(pub Vec<SqlValue>);

impl SqlRow {
    fn column(&self, index: usize) -> StoreResult<&SqlValue> {
        self.0
            .get(index)
            .ok_or_else(|| corrupt("result", format!("no column {index}")))
    }

    pub fn opt_i64(&self, index: usize) -> StoreResult<Option<i64>> {
        match self.column(index)? {
            SqlValue::Null => Ok(None),
            SqlValue::Int(value) => Ok(Some(*value)),
            other => Err(corrupt(
                "result",
                format!("column {index}: expected an integer, found {other:?}"),
            )),
        }
    }

    pub fn i64(&self, index: usize) -> StoreResult<i64> {
        self.opt_i64(index)?
            .ok_or_else(|| corrupt("result", format!("column {index} is NULL")))
    }

    pub fn u64(&self, index: usize) -> StoreResult<u64> {
        Ok(self.i64(index)? as u64)
    }

    pub fn opt_u64(&self, index: usize) -> StoreResult<Option<u64>> {
        Ok(self.opt_i64(index)?.map(|v| v as u64))
    }

    pub fn opt_text(&self, index: usize) -> StoreResult<Option<String>> {
        match self.column(index)? {
            SqlValue::Null => Ok(None),
            SqlValue::Text(text) => Ok(Some(text.clone())),
            other => Err(corrupt(
                "result",
                format!("column {index}: expected text, found {other:?}"),
            )),
        }
    }

    pub fn text(&self, index: usize) -> StoreResult<String> {
        self.opt_text(index)?
            .ok_or_else(|| corrupt("result", format!("column {index} is NULL")))
    }

    /// SQLite keeps booleans as 0/1 integers, PostgreSQL as BOOLEAN.
    pub fn bool(&self, index: usize) -> StoreResult<bool> {
        match self.column(index)? {
            SqlValue::Bool(value) => Ok(*value),
            SqlValue::Int(value) => Ok(*value != 0),
            other => Err(corrupt(
                "result",
                format!("column {index}: expected a boolean, found {other:?}"),
            )),
        }
    }
}

/// Runs statements on one connection (or inside one transaction).
pub(crate) trait SqlConnection {
    /// Runs a statement and returns how many rows it changed.
    fn execute(&mut self, sql: &str, params: &[Param<'_>]) -> StoreResult<u64>;
    /// Runs a query and returns every row.
    fn query(&mut self, sql: &str, params: &[Param<'_>]) -> StoreResult<Vec<SqlRow>>;
}

/// A connection that can also group statements into one transaction.
pub(crate) trait SqlEngine: SqlConnection {
    /// Runs `body` in one transaction: committed when it returns `Ok`,
    /// rolled back (nothing written) when it fails.
    fn transaction(
        &mut self,
        body: &mut dyn FnMut(&mut dyn SqlConnection) -> StoreResult<()>,
    ) -> StoreResult<()>;
}
