//! Reading a parsed TOML table key by key, so that every error can name the
//! full key (`node[1].meta-disk`), not just the leaf serde saw.
//!
//! Why not `#[derive(Deserialize)]` with `deny_unknown_fields`: serde's
//! errors say "unknown field `nbdd`" or "invalid type: string, expected
//! i64" without the table they are in, and "missing field" without the
//! `[[node]]` it is missing from. Walking the table by hand costs a few
//! lines and gives every message its key.

use crate::ConfigError;
use std::path::Path;
use toml::{Table, Value};

/// One table of the file: `""` (the top level), `net`, `node[1]`, ...
pub(crate) struct Section<'f> {
    file: &'f Path,
    path: String,
    table: Table,
}

impl<'f> Section<'f> {
    /// `table`, at `path`, whose keys must all be in `known` (a misspelt key
    /// must not silently fall back to a default). `what` names the keys in
    /// the error ("key", "handler").
    pub fn new(
        file: &'f Path,
        path: String,
        table: Table,
        known: &[&str],
        what: &str,
    ) -> Result<Self, ConfigError> {
        let section = Self { file, path, table };
        // The first unknown key in file order would be nicer, but toml's
        // table is sorted; any one of them, reported stably, will do.
        if let Some(k) = section.table.keys().find(|k| !known.contains(&k.as_str())) {
            return Err(section.error(
                k,
                format!("unknown {what}; expected one of {}", known.join(", ")),
            ));
        }
        Ok(section)
    }

    /// The file being read.
    pub fn file(&self) -> &'f Path {
        self.file
    }

    /// The full name of `key` in this section.
    pub fn key(&self, key: &str) -> String {
        let key = quote_key(key);
        if self.path.is_empty() {
            key
        } else {
            format!("{}.{key}", self.path)
        }
    }

    /// An error about `key` of this section.
    pub fn error(&self, key: &str, message: String) -> ConfigError {
        ConfigError::Invalid {
            file: self.file.to_path_buf(),
            key: self.key(key),
            message,
        }
    }

    /// The string at `key`, if present; `expected` describes a good value
    /// for the message when it is not a string.
    pub fn string(&mut self, key: &str, expected: &str) -> Result<Option<String>, ConfigError> {
        match self.table.remove(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(other) => Err(self.error(
                key,
                format!("expected {expected}, found {}", describe(&other)),
            )),
        }
    }

    /// The string at `key`, which must be present.
    pub fn required_string(&mut self, key: &str, expected: &str) -> Result<String, ConfigError> {
        self.string(key, expected)?
            .ok_or_else(|| self.error(key, format!("missing; expected {expected}")))
    }

    /// The value at `key`, untyped, if present.
    pub fn value(&mut self, key: &str) -> Option<Value> {
        self.table.remove(key)
    }

    /// The sub-table at `key` (`[net]`), if present, with its known keys
    /// (`what` names them, as in [`Section::new`]).
    pub fn table(
        &mut self,
        key: &str,
        known: &[&str],
        what: &str,
    ) -> Result<Option<Section<'f>>, ConfigError> {
        match self.table.remove(key) {
            None => Ok(None),
            Some(Value::Table(t)) => {
                Section::new(self.file, self.key(key), t, known, what).map(Some)
            }
            Some(other) => Err(self.error(
                key,
                format!("expected a table ([{key}]), found {}", describe(&other)),
            )),
        }
    }

    /// The entries left unread (the keys were checked in [`Section::new`]).
    pub fn into_entries(self) -> impl Iterator<Item = (String, Value)> {
        self.table.into_iter()
    }
}

/// A key as written in TOML: bare when it can be, else quoted and escaped
/// (so that a key holding a dot or a newline keeps the message one line).
pub(crate) fn quote_key(key: &str) -> String {
    if !key.is_empty()
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_'))
    {
        key.to_string()
    } else {
        format!("{key:?}")
    }
}

/// A value as a message shows it: strings and numbers literally (escaped),
/// compound values by kind.
pub(crate) fn describe(v: &Value) -> String {
    match v {
        Value::String(s) => format!("{s:?}"),
        Value::Integer(i) => i.to_string(),
        Value::Float(f) => f.to_string(),
        Value::Boolean(b) => b.to_string(),
        Value::Datetime(_) => "a date-time".into(),
        Value::Array(_) => "an array".into(),
        Value::Table(_) => "a table".into(),
    }
}
