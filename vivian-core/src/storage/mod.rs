//! Object storage for jobs (IN D, EX C.4): every job gets its own bucket
//! that only its DUT can reach.
//!
//! Two traits split the work, since S3 is S3 everywhere while identity
//! administration differs per server:
//!
//! * [`ObjectStore`]: plain S3 data operations (buckets and objects);
//! * [`IdentityAdmin`]: scoped users, their policies and groups, and the
//!   submitter's group-membership check (MinIO admin API, AWS IAM API).
//!
//! [`JobStorage`] is the job-bucket lifecycle over both:
//! [`JobStorage::open_job_bucket`] creates the bucket (the reference's
//! name rules, [`BucketName::for_job`]) and the "dut" credential usable
//! only from the DUT's IP; [`JobStorage::seed_from_tar`] fills it from the
//! submitter's share directory with `X-Amz-Meta-Mc-Attrs` metadata;
//! [`JobStorage::client_credentials`] makes the unrestricted "client"
//! credential whose URL goes into `session_end`; [`JobStorage::close`]
//! removes the bucket and every user and policy the job created.
//! [`JobResources`] lists those, serialisable, so that an executor that
//! restarts can remove what a killed one left behind.
//!
//! Secrets are [`Secret`]s: `Debug` and `Display` mask them.

pub mod memory;
mod name;
pub mod policy;
mod tarball;

use std::net::IpAddr;
use std::sync::Arc;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

pub use crate::config::Secret;
pub use name::{random_suffix, sanitize_bucket_name, BucketName, JOB_PREFIX_LEN, JOB_RANDOM_LEN};
pub use policy::IpPolicyStyle;
pub use tarball::{mc_attrs, read_tarball, TarFile};

/// How many bucket names a job tries before giving up (reference: 5).
pub const JOB_BUCKET_ATTEMPTS: usize = 5;

/// Why a storage operation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StorageError {
    /// A bucket, user or policy name that is not valid.
    #[error("{0}")]
    InvalidName(String),
    /// Bad input (a tarball that cannot be read, malformed credentials).
    #[error("{0}")]
    InvalidInput(String),
    /// The bucket (or user) exists already.
    #[error("{0} already exists")]
    AlreadyExists(String),
    /// No such bucket, object, user, group or policy.
    #[error("{0} does not exist")]
    NotFound(String),
    /// The server refused the credentials (unknown key, wrong secret).
    #[error("invalid credentials: {0}")]
    BadCredentials(String),
    /// The credentials are valid but not allowed to do this.
    #[error("access denied: {0}")]
    Denied(String),
    /// The submitter is not a member of every group it asked for.
    #[error("the user {user} is not a member of the group(s) {}", missing.join(", "))]
    NotMember {
        /// The submitter's access key.
        user: String,
        /// The groups it is not a member of.
        missing: Vec<String>,
    },
    /// The server could not be reached or answered something unexpected.
    #[error("{0}")]
    Backend(String),
}

/// An access key and its secret.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    /// Access key (user name for MinIO).
    pub access_key: String,
    /// Secret key.
    pub secret_key: Secret,
}

impl Credentials {
    /// Credentials from their two parts.
    pub fn new(access_key: impl Into<String>, secret_key: impl Into<String>) -> Self {
        Credentials {
            access_key: access_key.into(),
            secret_key: Secret::new(secret_key),
        }
    }
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("access_key", &self.access_key)
            .field("secret_key", &self.secret_key)
            .finish()
    }
}

/// The two credentials of a job bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Used by the DUT: restricted to the DUT's IP.
    Dut,
    /// Given to the submitter at the end of the job: no IP restriction.
    Client,
}

impl Role {
    /// `dut` or `client`, the suffix of the user name.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Dut => "dut",
            Role::Client => "client",
        }
    }
}

/// What a scoped credential may do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessSpec {
    /// The only bucket it may use.
    pub bucket: BucketName,
    /// Its role; the user is called `<bucket>-<role>`.
    pub role: Role,
    /// When not empty, the only addresses it may be used from.
    pub source_ips: Vec<IpAddr>,
    /// Groups the user joins (the job's MinIO groups).
    pub groups: Vec<String>,
}

impl AccessSpec {
    /// The user name the reference gives it: `<bucket>-<role>`.
    pub fn user_name(&self) -> String {
        format!("{}-{}", self.bucket, self.role.as_str())
    }
}

/// A user the executor created, with what must be removed with it (no
/// secret: this is what the restart journal keeps).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScopedUser {
    /// User name.
    pub user: String,
    /// Its access key (the user name for MinIO; generated for IAM).
    pub access_key: String,
    /// Its policy's name, when the policy is a separate object.
    pub policy: Option<String>,
    /// Groups it was added to.
    pub groups: Vec<String>,
}

/// A created user and its secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScopedCredentials {
    /// What to remove later.
    pub user: ScopedUser,
    /// The secret key.
    pub secret_key: Secret,
}

impl ScopedCredentials {
    /// As plain credentials.
    pub fn credentials(&self) -> Credentials {
        Credentials {
            access_key: self.user.access_key.clone(),
            secret_key: self.secret_key.clone(),
        }
    }
}

/// An object of a listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectInfo {
    /// Its key.
    pub key: String,
    /// Its size in bytes.
    pub size: u64,
    /// Its ETag, as the server gives it (used to skip unchanged files).
    pub etag: Option<String>,
}

/// Plain S3 data operations.
#[async_trait]
pub trait ObjectStore: Send + Sync {
    /// Creates a bucket; [`StorageError::AlreadyExists`] when it exists.
    async fn create_bucket(&self, bucket: &BucketName) -> Result<(), StorageError>;
    /// Removes a bucket and everything in it; a missing bucket is fine.
    async fn delete_bucket_force(&self, bucket: &BucketName) -> Result<(), StorageError>;
    /// Whether the bucket exists.
    async fn bucket_exists(&self, bucket: &BucketName) -> Result<bool, StorageError>;
    /// Stores an object with user metadata (`(name, value)`, sent as
    /// `X-Amz-Meta-<name>`).
    async fn put_object(
        &self,
        bucket: &BucketName,
        key: &str,
        body: Vec<u8>,
        metadata: &[(String, String)],
    ) -> Result<(), StorageError>;
    /// Reads an object.
    async fn get_object(&self, bucket: &BucketName, key: &str) -> Result<Vec<u8>, StorageError>;
    /// Lists every object whose key starts with `prefix`.
    async fn list_objects(
        &self,
        bucket: &BucketName,
        prefix: &str,
    ) -> Result<Vec<ObjectInfo>, StorageError>;
    /// Deletes an object (a missing one is fine).
    async fn delete_object(&self, bucket: &BucketName, key: &str) -> Result<(), StorageError>;
}

/// Identity administration.
#[async_trait]
pub trait IdentityAdmin: Send + Sync {
    /// Checks the administrator credentials (at start-up).
    async fn check_root(&self) -> Result<(), StorageError>;
    /// Creates the user of `spec`, its policy and its group memberships.
    /// On failure, whatever it created is removed again.
    async fn create_scoped_user(
        &self,
        spec: &AccessSpec,
    ) -> Result<ScopedCredentials, StorageError>;
    /// The user [`IdentityAdmin::create_scoped_user`] would create for
    /// `spec` (without its generated access key: the user name stands in),
    /// so that a journal can list it before it exists. The default is the
    /// reference's naming: user `<bucket>-<role>`, policy `policy_<user>`.
    fn planned_user(&self, spec: &AccessSpec) -> ScopedUser {
        let user = spec.user_name();
        ScopedUser {
            access_key: user.clone(),
            policy: Some(format!("policy_{user}")),
            groups: spec.groups.clone(),
            user,
        }
    }
    /// Removes a user created by [`IdentityAdmin::create_scoped_user`]:
    /// group memberships, policy, keys, user. Idempotent: what is already
    /// gone is not an error.
    async fn delete_scoped_user(&self, user: &ScopedUser) -> Result<(), StorageError>;
    /// Checks that `submitter` are valid credentials of a user that is a
    /// member of every group in `groups`: [`StorageError::BadCredentials`]
    /// or [`StorageError::NotMember`] otherwise.
    async fn verify_membership(
        &self,
        submitter: &Credentials,
        groups: &[String],
    ) -> Result<(), StorageError>;
}

/// The `minio` part of a job submission's metadata (EX C.1):
/// `{"credentials": {"access_key", "secret_key"}, "groups": [...]}`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct MinioRequest {
    /// The submitter's credentials (`-a`).
    pub credentials: Option<Credentials>,
    /// Groups the job's user must join (`-g`).
    pub groups: Vec<String>,
}

impl MinioRequest {
    /// Reads the metadata's `minio` value; the error names the bad field.
    pub fn from_json(v: &serde_json::Value) -> Result<Self, StorageError> {
        let bad = |m: &str| Err(StorageError::InvalidInput(format!("metadata minio: {m}")));
        if v.is_null() {
            return Ok(MinioRequest::default());
        }
        let Some(obj) = v.as_object() else {
            return bad("must be an object");
        };
        let mut out = MinioRequest::default();
        match obj.get("groups") {
            None | Some(serde_json::Value::Null) => {}
            Some(serde_json::Value::Array(a)) => {
                for g in a {
                    match g.as_str() {
                        Some(s) if !s.is_empty() => out.groups.push(s.to_string()),
                        _ => return bad("groups must be a list of non-empty strings"),
                    }
                }
            }
            Some(_) => return bad("groups must be a list of strings"),
        }
        match obj.get("credentials") {
            None | Some(serde_json::Value::Null) => {}
            // The reference client sends `{}` without `-a`.
            Some(serde_json::Value::Object(c)) if c.is_empty() => {}
            Some(serde_json::Value::Object(c)) => {
                let ak = c.get("access_key").and_then(|x| x.as_str());
                let sk = c.get("secret_key").and_then(|x| x.as_str());
                match (ak, sk) {
                    (Some(a), Some(s)) => out.credentials = Some(Credentials::new(a, s)),
                    _ => return bad("credentials need the strings access_key and secret_key"),
                }
            }
            Some(_) => return bad("credentials must be an object"),
        }
        Ok(out)
    }
}

/// Everything a job created in the storage, in creation order: what
/// [`JobStorage::remove`] deletes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobResources {
    /// The bucket.
    pub bucket: String,
    /// The users.
    pub users: Vec<ScopedUser>,
}

/// A job's bucket and its credentials. Close it with [`JobStorage::close`];
/// dropping it open logs what is left behind.
#[must_use = "a job bucket must be closed with JobStorage::close"]
#[derive(Debug)]
pub struct JobBucket {
    /// The bucket.
    pub name: BucketName,
    /// The DUT's credential (restricted to the DUT's IP).
    pub dut: ScopedCredentials,
    /// The client's credential, once made.
    pub client: Option<ScopedCredentials>,
    closed: bool,
}

impl JobBucket {
    /// What must be removed at the end.
    pub fn resources(&self) -> JobResources {
        let mut users = vec![self.dut.user.clone()];
        if let Some(c) = &self.client {
            users.push(c.user.clone());
        }
        JobResources {
            bucket: self.name.to_string(),
            users,
        }
    }
}

impl Drop for JobBucket {
    fn drop(&mut self) {
        if !self.closed {
            tracing::error!(
                bucket = %self.name,
                "a job bucket was dropped without being closed: its bucket and users are left behind"
            );
        }
    }
}

/// Told what a job is about to create, before each creation: `(bucket,
/// Some(resources))` records (or replaces) the bucket's entry, `(bucket,
/// None)` drops it (nothing of it is left). A journal written from it lets
/// an executor killed at any point remove what its jobs created.
pub type ResourceHook = Arc<dyn Fn(&str, Option<&JobResources>) + Send + Sync>;

/// The job-bucket lifecycle over an [`ObjectStore`] and an
/// [`IdentityAdmin`].
#[derive(Clone)]
pub struct JobStorage {
    objects: Arc<dyn ObjectStore>,
    identity: Arc<dyn IdentityAdmin>,
    url: url::Url,
    hook: Option<ResourceHook>,
}

impl std::fmt::Debug for JobStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JobStorage")
            .field("url", &self.url.as_str())
            .finish_non_exhaustive()
    }
}

impl JobStorage {
    /// A job storage on `url` (`MINIO_URL`: how DUTs and clients reach the
    /// S3 server).
    pub fn new(
        objects: Arc<dyn ObjectStore>,
        identity: Arc<dyn IdentityAdmin>,
        url: url::Url,
    ) -> Self {
        JobStorage {
            objects,
            identity,
            url,
            hook: None,
        }
    }

    /// Tells `hook` what jobs are about to create (and what is gone).
    pub fn with_resource_hook(mut self, hook: ResourceHook) -> Self {
        self.hook = Some(hook);
        self
    }

    fn record(&self, bucket: &str, res: Option<&JobResources>) {
        if let Some(h) = &self.hook {
            h(bucket, res);
        }
    }

    /// The S3 data side.
    pub fn objects(&self) -> &Arc<dyn ObjectStore> {
        &self.objects
    }

    /// The identity side.
    pub fn identity(&self) -> &Arc<dyn IdentityAdmin> {
        &self.identity
    }

    /// The server's URL.
    pub fn url(&self) -> &url::Url {
        &self.url
    }

    /// The submission-time check: with groups, the submitter's credentials
    /// are required and must be those of a member of every group.
    pub async fn check_submission(&self, req: &MinioRequest) -> Result<(), StorageError> {
        if req.groups.is_empty() {
            return Ok(());
        }
        let Some(creds) = &req.credentials else {
            return Err(StorageError::BadCredentials(format!(
                "the job asks for the MinIO group(s) {} but the submission has no MinIO \
                 credentials (executorctl -a ACCESS:SECRET)",
                req.groups.join(", ")
            )));
        };
        self.identity.verify_membership(creds, &req.groups).await
    }

    /// Creates the job's bucket and its DUT credential (usable only from
    /// `dut_ip`, member of `groups`). Tries up to
    /// [`JOB_BUCKET_ATTEMPTS`] random names; on any failure nothing is left.
    pub async fn open_job_bucket(
        &self,
        dut_id: &str,
        job_id: &str,
        dut_ip: IpAddr,
        groups: &[String],
    ) -> Result<JobBucket, StorageError> {
        let spec_for = |bucket: &BucketName| AccessSpec {
            bucket: bucket.clone(),
            role: Role::Dut,
            source_ips: vec![dut_ip],
            groups: groups.to_vec(),
        };
        let planned = |bucket: &BucketName| JobResources {
            bucket: bucket.to_string(),
            users: vec![self.identity.planned_user(&spec_for(bucket))],
        };
        let mut name = None;
        let mut last = None;
        for _ in 0..JOB_BUCKET_ATTEMPTS {
            let candidate = BucketName::for_job(dut_id, job_id, &random_suffix(JOB_RANDOM_LEN));
            // Recorded before it exists: a kill right after the creation
            // leaves nothing unlisted.
            self.record(candidate.as_str(), Some(&planned(&candidate)));
            match self.objects.create_bucket(&candidate).await {
                Ok(()) => {
                    name = Some(candidate);
                    break;
                }
                // Another's: never remove it later.
                Err(e @ StorageError::AlreadyExists(_)) => {
                    self.record(candidate.as_str(), None);
                    last = Some(e);
                }
                // It may exist (a lost answer): remove it, or leave it
                // recorded for a later removal.
                Err(e) => {
                    let _ = self.remove(&planned(&candidate)).await;
                    return Err(e);
                }
            }
        }
        let Some(name) = name else {
            return Err(last.unwrap_or_else(|| StorageError::Backend("no bucket name".into())));
        };
        let spec = spec_for(&name);
        match self.identity.create_scoped_user(&spec).await {
            Ok(dut) => {
                tracing::info!(bucket = %name, user = %dut.user.user, "job bucket created");
                let jb = JobBucket {
                    name,
                    dut,
                    client: None,
                    closed: false,
                };
                self.record(jb.name.as_str(), Some(&jb.resources()));
                Ok(jb)
            }
            Err(e) => {
                // The bucket and whatever of the user is left; recorded
                // until everything is gone.
                let _ = self.remove(&planned(&name)).await;
                Err(e)
            }
        }
    }

    /// Uploads every regular file of `tarball` (plain or gzip-compressed
    /// tar) into the bucket at its path, with the `mc-attrs` metadata.
    /// Returns the number of files.
    pub async fn seed_from_tar(
        &self,
        jb: &JobBucket,
        tarball: &[u8],
    ) -> Result<usize, StorageError> {
        let files = read_tarball(tarball)?;
        let n = files.len();
        for f in files {
            let meta = vec![("mc-attrs".to_string(), f.mc_attrs.clone())];
            self.objects
                .put_object(&jb.name, &f.path, f.data, &meta)
                .await?;
        }
        Ok(n)
    }

    /// Creates (once) the "client" credential: the bucket, from anywhere.
    pub async fn client_credentials(
        &self,
        jb: &mut JobBucket,
    ) -> Result<ScopedCredentials, StorageError> {
        if let Some(c) = &jb.client {
            return Ok(c.clone());
        }
        let spec = AccessSpec {
            bucket: jb.name.clone(),
            role: Role::Client,
            source_ips: vec![],
            groups: vec![],
        };
        let mut res = jb.resources();
        res.users.push(self.identity.planned_user(&spec));
        self.record(jb.name.as_str(), Some(&res));
        let c = self.identity.create_scoped_user(&spec).await?;
        jb.client = Some(c.clone());
        self.record(jb.name.as_str(), Some(&jb.resources()));
        Ok(c)
    }

    /// `<scheme>://<access key>:<secret>@<host>:<port>`: the server's URL
    /// with `creds`, the host replaced by `host` when given (the host the
    /// client reached the executor with).
    pub fn access_url(&self, creds: &Credentials, host: Option<&str>) -> String {
        let mut u = self.url.clone();
        if let Some(h) = host.filter(|h| !h.is_empty()) {
            let _ = u.set_host(Some(h));
        }
        let port = u.port_or_known_default();
        let _ = u.set_port(port);
        let _ = u.set_username(&creds.access_key);
        let _ = u.set_password(Some(creds.secret_key.expose()));
        u.set_path("");
        let mut s = u.to_string();
        // `Url` always writes a path: the reference's URL has none.
        if s.ends_with('/') {
            s.pop();
        }
        // `Url` drops a default port; the reference always writes one.
        if self.url.port().is_none() && !s.rsplit('@').next().unwrap_or("").contains(':') {
            if let Some(p) = port {
                s.push_str(&format!(":{p}"));
            }
        }
        s
    }

    /// Removes the bucket, then every user (and policy) of the job. Every
    /// removal is tried; the first error is returned.
    pub async fn close(&self, mut jb: JobBucket) -> Result<(), StorageError> {
        jb.closed = true;
        self.remove(&jb.resources()).await
    }

    /// Removes what [`JobBucket::resources`] listed (also for a previous
    /// executor's leftovers). What is already gone is not an error.
    pub async fn remove(&self, res: &JobResources) -> Result<(), StorageError> {
        let mut first = None;
        match BucketName::new(res.bucket.clone()) {
            Ok(b) => {
                if let Err(e) = self.objects.delete_bucket_force(&b).await {
                    tracing::error!(bucket = %b, "cannot remove the job bucket: {e}");
                    first.get_or_insert(e);
                }
            }
            Err(e) => {
                first.get_or_insert(e);
            }
        }
        for u in &res.users {
            if let Err(e) = self.identity.delete_scoped_user(u).await {
                tracing::error!(user = %u.user, "cannot remove the job bucket user: {e}");
                first.get_or_insert(e);
            }
        }
        match first {
            None => {
                tracing::info!(bucket = %res.bucket, "job bucket removed");
                self.record(&res.bucket, None);
                Ok(())
            }
            Some(e) => Err(e),
        }
    }
}

/// `n` bytes from the operating system's random source.
pub fn random_bytes(n: usize) -> Vec<u8> {
    let mut b = vec![0u8; n];
    if let Err(e) = getrandom::getrandom(&mut b) {
        // No OS randomness means no safe secret: never go on silently.
        panic!("the operating system's random source failed: {e}");
    }
    b
}

/// A secret key as the reference makes them: 16 random bytes as 32
/// lower-case hex characters.
pub fn random_secret() -> Secret {
    let b = random_bytes(16);
    Secret::new(b.iter().map(|x| format!("{x:02x}")).collect::<String>())
}

#[cfg(test)]
mod tests;
