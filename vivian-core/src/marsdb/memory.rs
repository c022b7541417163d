//! In-memory [`MarsDb`]: for tests and for embedders that keep the farm
//! database elsewhere.

use std::sync::Arc;

use async_trait::async_trait;
use tokio::sync::{watch, Mutex};

use super::{Change, Database, MarsDb, MarsDbError, ValidationError, Validator};

/// A [`MarsDb`] that lives in memory only.
///
/// It validates like the file backend (with an optional extra
/// [`Validator`]), and lets a test simulate an invalid file edit with
/// [`MemoryMarsDb::set_error`]: while an error is set, writes fail with
/// [`MarsDbError::InvalidFile`], as they would on the file backend.
pub struct MemoryMarsDb {
    write: Mutex<()>,
    db: watch::Sender<Arc<Database>>,
    error: watch::Sender<Option<ValidationError>>,
    validator: Option<Validator>,
}

impl MemoryMarsDb {
    /// A backend holding `db`, which is used as given (not validated).
    pub fn new(db: Database) -> Self {
        MemoryMarsDb {
            write: Mutex::new(()),
            db: watch::Sender::new(Arc::new(db)),
            error: watch::Sender::new(None),
            validator: None,
        }
    }

    /// A backend holding `db`, after checking it with
    /// [`Database::validate`] and `validator`.
    pub fn with_validator(
        db: Database,
        validator: Option<Validator>,
    ) -> Result<Self, ValidationError> {
        db.validate()?;
        if let Some(v) = &validator {
            v(&db)?;
        }
        let mut me = Self::new(db);
        me.validator = validator;
        Ok(me)
    }

    /// Sets or clears the database error, as an invalid (or fixed) edit of a
    /// file would.
    pub fn set_error(&self, error: Option<ValidationError>) {
        self.error.send_replace(error);
    }

    /// Replaces the whole database (as an external edit would), after
    /// validation. Subscribers are notified if it differs.
    pub async fn replace(&self, db: Database) -> Result<(), ValidationError> {
        let _guard = self.write.lock().await;
        db.validate()?;
        if let Some(v) = &self.validator {
            v(&db)?;
        }
        self.db.send_if_modified(|cur| {
            if **cur == db {
                false
            } else {
                *cur = Arc::new(db);
                true
            }
        });
        Ok(())
    }
}

#[async_trait]
impl MarsDb for MemoryMarsDb {
    fn snapshot(&self) -> Arc<Database> {
        self.db.borrow().clone()
    }

    fn subscribe(&self) -> watch::Receiver<Arc<Database>> {
        self.db.subscribe()
    }

    fn error(&self) -> Option<ValidationError> {
        self.error.borrow().clone()
    }

    fn subscribe_error(&self) -> watch::Receiver<Option<ValidationError>> {
        self.error.subscribe()
    }

    async fn apply<'a>(&'a self, change: Change<'a>) -> Result<Arc<Database>, MarsDbError> {
        let _guard = self.write.lock().await;
        if let Some(e) = self.error() {
            return Err(MarsDbError::InvalidFile(e));
        }
        let current = self.snapshot();
        let mut next = (*current).clone();
        change(&mut next).map_err(MarsDbError::Rejected)?;
        if next == *current {
            return Ok(current);
        }
        next.validate().map_err(MarsDbError::Invalid)?;
        if let Some(v) = &self.validator {
            v(&next).map_err(MarsDbError::Invalid)?;
        }
        let next = Arc::new(next);
        self.db.send_replace(next.clone());
        Ok(next)
    }
}
