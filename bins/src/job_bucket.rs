//! Job buckets in the job engine (EX C.4, IN D).
//!
//! [`JobBuckets`] is the executor's object storage (from `MINIO_URL`,
//! `MINIO_ROOT_USER`, `MINIO_ROOT_PASSWORD`); [`SessionBucket`] is one
//! job's bucket through the engine's steps:
//!
//! * submission: [`check_submission`] refuses (403, with the reason) a job
//!   asking for MinIO groups its submitter is not a member of;
//! * setup: [`SessionBucket::setup`] creates the bucket and the "dut"
//!   credential (usable only from the DUT's IP, member of the groups),
//!   uploads the share-directory tarball, and gives the template variables
//!   `job_bucket`, `job_bucket_access_key`, `job_bucket_secret_key`;
//! * end of the job: [`SessionBucket::session_end_message`] creates the
//!   "client" credential and puts its URL in `session_end`;
//! * teardown, on every path out: [`SessionBucket::teardown`] removes the
//!   bucket, users and policies (the engine has already waited, bounded by
//!   the job's `infra_teardown`, for the client to download the bucket and
//!   close the connection).
//!
//! A journal (JSON, written atomically) lists what live jobs created, so
//! that an executor killed mid-job has its leftovers removed at the next
//! start ([`JobBuckets::recover`]).

use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context as _;

use vivian_core::farm::{FarmError, JobSubmission};
use vivian_core::job::{JobBucketVars, JobStatus};
use vivian_core::protocol::{self, Message, Payload};
use vivian_core::storage::{
    Credentials, IdentityAdmin, IpPolicyStyle, JobBucket, JobResources, JobStorage, MinioRequest,
    StorageError,
};

/// The journal of live jobs' resources: a JSON list of
/// [`JobResources`], written atomically (temp + fsync + rename).
struct Journal {
    path: PathBuf,
    lock: std::sync::Mutex<()>,
}

impl Journal {
    fn read(&self) -> Vec<JobResources> {
        match std::fs::read(&self.path) {
            Ok(data) => serde_json::from_slice(&data).unwrap_or_else(|e| {
                tracing::error!(
                    "the job-bucket journal {} is unreadable: {e}",
                    self.path.display()
                );
                Vec::new()
            }),
            Err(_) => Vec::new(),
        }
    }

    fn write(&self, entries: &[JobResources]) -> std::io::Result<()> {
        use std::io::Write;
        let tmp = self.path.with_extension("tmp");
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&serde_json::to_vec_pretty(entries).unwrap_or_default())?;
        f.sync_all()?;
        std::fs::rename(&tmp, &self.path)
    }

    /// Adds or replaces (by bucket) an entry; `None` removes the bucket's
    /// entry.
    fn set(&self, bucket: &str, entry: Option<&JobResources>) {
        let _g = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        let mut entries = self.read();
        let before = entries.clone();
        entries.retain(|e| e.bucket != bucket);
        entries.extend(entry.cloned());
        if entries == before {
            return;
        }
        if let Err(e) = self.write(&entries) {
            tracing::error!(
                "cannot write the job-bucket journal {}: {e}",
                self.path.display()
            );
        }
    }
}

/// The executor's object storage for job buckets.
pub struct JobBuckets {
    storage: JobStorage,
    journal: Option<Arc<Journal>>,
}

impl std::fmt::Debug for JobBuckets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JobBuckets")
            .field("storage", &self.storage)
            .field("journal", &self.journal.as_ref().map(|j| &j.path))
            .finish()
    }
}

impl JobBuckets {
    /// Job buckets on `storage`, without a journal.
    pub fn new(storage: JobStorage) -> Self {
        JobBuckets {
            storage,
            journal: None,
        }
    }

    /// Records live jobs' resources in `path`, each before it is created
    /// (so that nothing a killed executor's jobs created goes unlisted).
    pub fn with_journal(mut self, path: impl Into<PathBuf>) -> Self {
        let j = Arc::new(Journal {
            path: path.into(),
            lock: std::sync::Mutex::new(()),
        });
        let hook = j.clone();
        self.storage = self
            .storage
            .with_resource_hook(Arc::new(move |bucket, entry| hook.set(bucket, entry)));
        self.journal = Some(j);
        self
    }

    /// The storage.
    pub fn storage(&self) -> &JobStorage {
        &self.storage
    }

    /// Removes what the journal lists (a previous executor's leftovers);
    /// returns how many job buckets were removed.
    pub async fn recover(&self) -> usize {
        let Some(journal) = &self.journal else {
            return 0;
        };
        let entries = journal.read();
        let mut removed = 0;
        for e in entries {
            // Removed from the journal by the storage once all is gone.
            match self.storage.remove(&e).await {
                Ok(()) => {
                    removed += 1;
                }
                Err(err) => tracing::error!(
                    bucket = %e.bucket,
                    "cannot remove a job bucket left by a previous run: {err}"
                ),
            }
        }
        if removed > 0 {
            tracing::info!("removed {removed} job bucket(s) left by a previous run");
        }
        removed
    }
}

/// How the identity side is administered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdminApi {
    /// The MinIO admin API (`/minio/admin/v3`).
    Minio,
    /// The AWS IAM Query API (SeaweedFS, AWS), policies with Allow-only IP
    /// conditions or the reference's Allow + Deny.
    Iam(IpPolicyStyle),
}

/// The executor's start-up: with `MINIO_URL` set, checks the root
/// credentials (a clear error when refused), removes the leftovers listed
/// in `journal`, and returns the job buckets. Without `MINIO_URL` in the
/// environment, jobs run without buckets (`None`), as before.
///
/// `VIVIAN_STORAGE_ADMIN_API` chooses the identity API: `minio` (default),
/// `iam` (Allow + Deny policies) or `iam-allow-only` (SeaweedFS).
pub async fn from_env(
    config: &vivian_core::config::Config,
    minio_url_set: bool,
    journal: PathBuf,
) -> anyhow::Result<Option<Arc<JobBuckets>>> {
    if !minio_url_set {
        tracing::warn!(
            "MINIO_URL is not set: jobs run without a job bucket (no share-directory upload \
             or download, empty job_bucket template variables, MinIO groups refused)"
        );
        return Ok(None);
    }
    let api = match config.vivian_storage_admin_api.as_str() {
        "minio" => AdminApi::Minio,
        "iam" => AdminApi::Iam(IpPolicyStyle::DenyOutsideIp),
        "iam-allow-only" => AdminApi::Iam(IpPolicyStyle::AllowOnlyIp),
        other => anyhow::bail!(
            "VIVIAN_STORAGE_ADMIN_API={other:?}: expected minio, iam or iam-allow-only"
        ),
    };
    let url: url::Url = config
        .minio_url
        .as_str()
        .parse()
        .with_context(|| format!("MINIO_URL={}", config.minio_url.as_str()))?;
    let root = Credentials::new(
        config.minio_root_user.clone(),
        config.minio_root_password.expose(),
    );
    let buckets = connect(&url, &root, api).await?.with_journal(journal);
    buckets.recover().await;
    Ok(Some(Arc::new(buckets)))
}

/// Job buckets on the server at `url` administered with `root`; checks
/// the credentials first.
pub async fn connect(
    url: &url::Url,
    root: &Credentials,
    api: AdminApi,
) -> anyhow::Result<JobBuckets> {
    let identity: Arc<dyn IdentityAdmin> = match api {
        AdminApi::Iam(style) => Arc::new(
            vivian_storage::IamAdmin::new(url, root, style).map_err(|e| anyhow::anyhow!("{e}"))?,
        ),
        AdminApi::Minio => Arc::new(
            vivian_storage::MinioAdmin::new(url, root).map_err(|e| anyhow::anyhow!("{e}"))?,
        ),
    };
    identity.check_root().await.map_err(|e| {
        anyhow::anyhow!(
            "Invalid (MinIO) credentials: {url} refused MINIO_ROOT_USER={} with \
             MINIO_ROOT_PASSWORD: {e}",
            root.access_key
        )
    })?;
    let objects = Arc::new(vivian_storage::S3Store::new(url, root, "us-east-1"));
    Ok(JobBuckets::new(JobStorage::new(
        objects,
        identity,
        url.clone(),
    )))
}

/// The submission-time check (EX C.1 `minio`): malformed metadata is 400;
/// groups the submitter cannot prove membership of are 403 with the
/// reason; groups on an executor without object storage are 403 too.
pub async fn check_submission(
    buckets: Option<&Arc<JobBuckets>>,
    sub: &JobSubmission,
) -> Result<(), FarmError> {
    let req = match &sub.minio {
        None => return Ok(()),
        Some(v) => MinioRequest::from_json(v).map_err(|e| FarmError::Invalid(e.to_string()))?,
    };
    if req.groups.is_empty() {
        return Ok(());
    }
    let Some(b) = buckets else {
        return Err(FarmError::Forbidden(
            "This executor has no object storage (MINIO_URL is not set): the MinIO groups \
             of the job cannot be granted"
                .into(),
        ));
    };
    match b.storage.check_submission(&req).await {
        Ok(()) => Ok(()),
        Err(e @ (StorageError::BadCredentials(_) | StorageError::NotMember { .. })) => Err(
            FarmError::Forbidden(format!("MinIO group membership check failed: {e}")),
        ),
        Err(e) => Err(FarmError::Unavailable(format!(
            "cannot check the MinIO group membership: {e}"
        ))),
    }
}

#[derive(Default)]
struct State {
    bucket: Option<JobBucket>,
}

/// One job's bucket, through the engine's steps (see the module
/// documentation). Without object storage every step does nothing.
pub struct SessionBucket {
    buckets: Option<Arc<JobBuckets>>,
    state: tokio::sync::Mutex<State>,
}

impl SessionBucket {
    /// The bucket of a job run by an engine with `buckets`.
    pub fn new(buckets: Option<Arc<JobBuckets>>) -> Self {
        SessionBucket {
            buckets,
            state: tokio::sync::Mutex::new(State::default()),
        }
    }

    /// Whether the engine has object storage.
    pub fn enabled(&self) -> bool {
        self.buckets.is_some()
    }

    /// Creates the bucket and the DUT's credential, seeds the bucket from
    /// the submission's tarball; returns the template variables. `Ok(None)`
    /// without object storage; `Err` (an infrastructure error, nothing
    /// left behind) otherwise.
    pub async fn setup(
        &self,
        sub: &JobSubmission,
        dut_id: &str,
        dut_ip: IpAddr,
    ) -> Result<Option<JobBucketVars>, String> {
        let Some(b) = &self.buckets else {
            return Ok(None);
        };
        let groups = sub
            .minio
            .as_ref()
            .and_then(|v| MinioRequest::from_json(v).ok())
            .map(|r| r.groups)
            .unwrap_or_default();
        let jb = b
            .storage
            .open_job_bucket(dut_id, &sub.job_id, dut_ip, &groups)
            .await
            .map_err(|e| format!("cannot create the job bucket: {e}"))?;
        if let Some(tar) = &sub.tarball {
            match b.storage.seed_from_tar(&jb, tar).await {
                Ok(n) => {
                    tracing::info!(bucket = %jb.name, "{n} file(s) of the share directory uploaded")
                }
                Err(e) => {
                    // Dropped from the journal once removed.
                    let _ = b.storage.close(jb).await;
                    return Err(format!(
                        "cannot upload the share directory into the job bucket: {e}"
                    ));
                }
            }
        }
        let vars = JobBucketVars {
            name: jb.name.to_string(),
            access_key: jb.dut.user.access_key.clone(),
            secret_key: jb.dut.secret_key.expose().to_string(),
        };
        self.state.lock().await.bucket = Some(jb);
        Ok(Some(vars))
    }

    /// The `session_end` message of a job that reached its end: with a
    /// bucket, the "client" credential is created and its URL offered
    /// (`host`: the host the client reached the executor with, else the
    /// storage's own).
    pub async fn session_end_message(&self, status: JobStatus, host: Option<&str>) -> Message {
        let mut msg = Message::session_end(status);
        let Some(b) = &self.buckets else { return msg };
        let mut st = self.state.lock().await;
        let Some(jb) = st.bucket.as_mut() else {
            return msg;
        };
        match b.storage.client_credentials(jb).await {
            Ok(c) => {
                if let Payload::SessionEnd(end) = &mut msg.payload {
                    end.job_bucket = Some(protocol::JobBucket {
                        minio_access_url: b.storage.access_url(&c.credentials(), host),
                        bucket_name: jb.name.to_string(),
                    });
                }
            }
            Err(e) => {
                tracing::error!(bucket = %jb.name, "cannot create the client credential: {e}")
            }
        }
        msg
    }

    /// Removes the bucket and every credential. Safe to call on every path
    /// out, more than once.
    pub async fn teardown(&self) {
        let Some(b) = &self.buckets else { return };
        let mut st = self.state.lock().await;
        if let Some(jb) = st.bucket.take() {
            let name = jb.name.to_string();
            // Dropped from the journal once removed.
            match b.storage.close(jb).await {
                Ok(()) => {}
                Err(e) => {
                    tracing::error!(bucket = %name, "the job bucket was not fully removed (kept in the journal for the next start): {e}")
                }
            }
        }
    }
}
