//! MarsDB: the live-editable YAML database of the farm (PDUs, DUTs, GitLab
//! instances).
//!
//! # Model
//!
//! * [`Database`] is the validated, in-memory form of the file: maps in file
//!   order of [`Pdu`]s by name, [`Dut`]s by [`MacAddr`] and
//!   [`GitlabInstance`]s by name. Snapshots are shared as `Arc<Database>`
//!   and never mutated in place.
//! * [`MarsDb`] is the storage trait: read a snapshot, subscribe to
//!   changes, apply a change atomically, and read the current "database
//!   error" (an invalid edit of the file). [`MarsDbExt::update`] is the
//!   convenient generic form of [`MarsDb::apply`].
//! * [`MemoryMarsDb`] keeps the database in memory (tests, embedding);
//!   [`FileMarsDb`] is the YAML file backend with live reload.
//!
//! # Invariants
//!
//! * Every snapshot a backend publishes passed [`Database::validate`] and
//!   the backend's extra [`Validator`], if any.
//! * A change is all or nothing: the closure works on a copy; if it fails,
//!   or the result does not validate, or it cannot be persisted, nothing
//!   changes (neither memory nor file).
//! * Changes are serialised: two concurrent [`MarsDb::apply`] calls never
//!   lose one another's update.
//! * While the file holds an invalid edit, the last good database stays in
//!   force and every write fails with [`MarsDbError::InvalidFile`]: the
//!   admin's file is never overwritten.
//!
//! # Example
//!
//! ```
//! use std::sync::Arc;
//! use vivian_core::marsdb::{Database, Dut, MarsDb, MarsDbExt, MemoryMarsDb};
//!
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! let db: Arc<dyn MarsDb> = Arc::new(MemoryMarsDb::new(Database::new()));
//! let mut changes = db.subscribe();
//! let mac = "52:54:00:11:22:33".parse().unwrap();
//! db.update(|db| {
//!     db.duts.insert(mac, Dut::new(mac, "gfx9", "10.0.0.9".parse().unwrap(), vec![]));
//!     Ok::<_, std::convert::Infallible>(())
//! })
//! .await
//! .unwrap();
//! changes.changed().await.unwrap();
//! assert_eq!(db.snapshot().full_name(&mac, "farm").unwrap(), "farm-gfx9-1");
//! # });
//! ```

mod error;
mod file;
mod memory;
mod types;
mod wire;
mod yaml;

use std::sync::Arc;

use async_trait::async_trait;
use tokio::sync::watch;

pub use error::{MarsDbError, UpdateError, ValidationError};
pub use file::{FileMarsDb, FileOptions};
pub use memory::MemoryMarsDb;
pub use types::{
    now_micros, Database, Dut, GitlabInstance, GitlabRunner, MacAddr, ParseMacError, Pdu,
    PduConfig, PortId, RunnerType, DEFAULT_MAXIMUM_TIMEOUT, DEFAULT_PDU_OFF_DELAY,
    PLACEHOLDER_TOKEN, VPDU_DRIVER, VPDU_NAME,
};

/// An extra validation run on every database before it is accepted (loaded
/// from the file or produced by a change), after [`Database::validate`].
///
/// Other layers use it to refuse what only they know is wrong, e.g. the PDU
/// layer refusing an unknown driver name:
///
/// ```
/// use std::sync::Arc;
/// use vivian_core::marsdb::{Validator, ValidationError};
///
/// let known = ["apc_masterswitch", "vpdu"];
/// let v: Validator = Arc::new(move |db| {
///     for (name, pdu) in &db.pdus {
///         if !known.contains(&pdu.driver.as_str()) {
///             return Err(ValidationError::new(
///                 format!("pdus.{name}.driver"),
///                 format!("unknown PDU driver {:?}", pdu.driver),
///             ));
///         }
///     }
///     Ok(())
/// });
/// ```
///
/// Return the error with its dotted field `path`; the file backend adds
/// the file name, line and column.
pub type Validator = Arc<dyn Fn(&Database) -> Result<(), ValidationError> + Send + Sync>;

/// The closure given to [`MarsDb::apply`]: it edits a copy of the database,
/// or refuses with an error (then nothing changes).
pub type Change<'a> = Box<
    dyn FnOnce(&mut Database) -> Result<(), Box<dyn std::error::Error + Send + Sync>> + Send + 'a,
>;

/// Storage of the farm database. Object-safe: use it as `Arc<dyn MarsDb>`.
///
/// See the [module documentation](self) for the invariants every
/// implementation keeps.
#[async_trait]
pub trait MarsDb: Send + Sync {
    /// The current (last good) database. Cheap: an `Arc` clone.
    fn snapshot(&self) -> Arc<Database>;

    /// A receiver that sees every new database, whether it comes from an
    /// API change or an edit of the file. It is only notified when the
    /// content changed.
    fn subscribe(&self) -> watch::Receiver<Arc<Database>>;

    /// The current database error: the reason the file's content is not in
    /// force (an invalid edit, with file, line and column), or `None` when
    /// the file and the database agree.
    fn error(&self) -> Option<ValidationError>;

    /// A receiver of [`MarsDb::error`] changes.
    fn subscribe_error(&self) -> watch::Receiver<Option<ValidationError>>;

    /// Applies `change` atomically: the closure edits a copy, the result is
    /// validated, persisted (file backend: only when it differs), then
    /// published. Returns the new snapshot (the current one if nothing
    /// changed). On any error nothing changed.
    ///
    /// Errors: [`MarsDbError::Rejected`] (the closure's error),
    /// [`MarsDbError::Invalid`] (the result does not validate),
    /// [`MarsDbError::InvalidFile`] (the file has an invalid edit),
    /// [`MarsDbError::Io`].
    ///
    /// A caller that drops the returned future after its closure ran may
    /// still see its change committed (with the next write).
    async fn apply<'a>(&'a self, change: Change<'a>) -> Result<Arc<Database>, MarsDbError>;
}

/// Typed conveniences over [`MarsDb`], for every implementation and for
/// `dyn MarsDb`.
pub trait MarsDbExt: MarsDb {
    /// Like [`MarsDb::apply`] with a closure returning any value `T` or
    /// error `E`: `Ok(T)` once the change is committed (or found to change
    /// nothing), `Err(UpdateError::Rejected(E))` when the closure refused,
    /// `Err(UpdateError::Db(_))` when the database refused.
    fn update<'a, T, E, F>(
        &'a self,
        f: F,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<T, UpdateError<E>>> + Send + 'a>>
    where
        F: FnOnce(&mut Database) -> Result<T, E> + Send + 'a,
        T: Send + 'a,
        E: Send + 'a,
    {
        Box::pin(async move {
            let mut out: Option<Result<T, E>> = None;
            let slot = &mut out;
            let change: Change<'_> = Box::new(move |db: &mut Database| {
                let r = f(db);
                let failed = r.is_err();
                *slot = Some(r);
                if failed {
                    Err(Box::new(ClosureRefused) as Box<dyn std::error::Error + Send + Sync>)
                } else {
                    Ok(())
                }
            });
            let res = self.apply(change).await;
            match (res, out) {
                (_, Some(Err(e))) => Err(UpdateError::Rejected(e)),
                (Ok(_), Some(Ok(v))) => Ok(v),
                (Err(e), _) => Err(UpdateError::Db(e)),
                (Ok(_), None) => Err(UpdateError::Db(MarsDbError::Rejected(
                    "the MarsDb backend did not run the change".into(),
                ))),
            }
        })
    }
}

impl<D: MarsDb + ?Sized> MarsDbExt for D {}

/// Marker error used by [`MarsDbExt::update`] when its closure refused.
#[derive(Debug, thiserror::Error)]
#[error("the change was refused")]
struct ClosureRefused;

impl Database {
    /// Parses and validates a MarsDB YAML document. `previous` supplies
    /// `first_seen` for DUTs whose entry lacks it (else: now). Errors carry
    /// the line, column and field path; no file name.
    pub fn from_yaml(text: &str, previous: Option<&Database>) -> Result<Database, ValidationError> {
        yaml::parse(text, previous, &yaml::ParseOptions::default())
    }

    /// The YAML document of this database, in schema key order, with every
    /// field written and strings quoted so that YAML 1.1 readers (the
    /// reference) read them back as strings.
    pub fn to_yaml(&self) -> String {
        yaml::emit(self)
    }
}
