//! Errors of MarsDB.

use std::fmt;
use std::path::PathBuf;

/// Why a database (a file, or the result of a change) is invalid.
///
/// Displayed as `<file>:<line>:<column>: <path>: <message>`, leaving out
/// the parts that are unknown, e.g.
/// `/config/mars_db.yaml:12:10: duts.52:54:00:11:22:33.pdu: unknown PDU "APC2"`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ValidationError {
    /// The file the database was read from, if any.
    pub file: Option<PathBuf>,
    /// 1-based line of the offending YAML node, when known.
    pub line: Option<usize>,
    /// 1-based column of the offending YAML node, when known.
    pub column: Option<usize>,
    /// Dotted path of the offending field (`duts.<mac>.pdu`); empty for the
    /// whole document (e.g. a YAML syntax error).
    pub path: String,
    /// What is wrong.
    pub message: String,
}

impl ValidationError {
    /// An error about the field at `path` (dotted, e.g. `pdus.APC.driver`).
    pub fn new(path: impl Into<String>, message: impl Into<String>) -> Self {
        ValidationError {
            file: None,
            line: None,
            column: None,
            path: path.into(),
            message: message.into(),
        }
    }

    /// The same error, attributed to `file`.
    pub fn with_file(mut self, file: impl Into<PathBuf>) -> Self {
        self.file = Some(file.into());
        self
    }

    /// The same error at a 1-based line and column.
    pub fn at(mut self, line: usize, column: usize) -> Self {
        self.line = Some(line);
        self.column = Some(column);
        self
    }
}

impl fmt::Display for ValidationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut prefix = false;
        if let Some(file) = &self.file {
            write!(f, "{}", file.display())?;
            prefix = true;
        }
        if let Some(line) = self.line {
            if prefix {
                f.write_str(":")?;
            } else {
                f.write_str("line ")?;
            }
            write!(f, "{line}")?;
            if let Some(col) = self.column {
                write!(f, ":{col}")?;
            }
            prefix = true;
        }
        if prefix {
            f.write_str(": ")?;
        }
        if !self.path.is_empty() {
            write!(f, "{}: ", self.path)?;
        }
        f.write_str(&self.message)
    }
}

impl std::error::Error for ValidationError {}

/// Errors of [`MarsDb`](super::MarsDb) operations.
#[derive(Debug, thiserror::Error)]
pub enum MarsDbError {
    /// The change would leave the database invalid; nothing was changed.
    /// The REST layer maps it to 400.
    #[error("invalid change: {0}")]
    Invalid(ValidationError),
    /// The database file holds an edit that does not validate; writes are
    /// refused until it is fixed, so the admin's file is not overwritten.
    /// Also returned (with a message saying so) when the file was edited
    /// while the change was being saved: the edit is kept and loaded, the
    /// change dropped, and retrying applies it on top of the edit. The REST
    /// layer maps it to 409.
    #[error(
        "the MarsDB file has an invalid edit, refusing to overwrite it until it is fixed: {0}"
    )]
    InvalidFile(ValidationError),
    /// The change closure itself refused; nothing was changed.
    #[error("change refused: {0}")]
    Rejected(Box<dyn std::error::Error + Send + Sync>),
    /// Reading or writing the file failed; nothing was changed.
    #[error("MarsDB I/O error on {}: {source}", path.display())]
    Io {
        /// The file or directory concerned.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
}

/// Error of [`MarsDbExt::update`](super::MarsDbExt::update): either the
/// closure's own error, or a database error. Nothing was changed in both
/// cases.
#[derive(Debug, thiserror::Error)]
pub enum UpdateError<E> {
    /// The closure returned this error.
    #[error("{0}")]
    Rejected(E),
    /// The database refused the change (invalid result, invalid file, I/O).
    #[error(transparent)]
    Db(MarsDbError),
}
