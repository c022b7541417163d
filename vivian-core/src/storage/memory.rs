//! In-memory [`ObjectStore`] and [`IdentityAdmin`]: for unit tests of code
//! built on [`JobStorage`](super::JobStorage), and a record of what exists
//! so tests can check that nothing is left. Source IPs are recorded, not
//! enforced (use a real server for that).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;

use async_trait::async_trait;

use super::*;

/// An object's content and metadata.
type Stored = (Vec<u8>, Vec<(String, String)>);

/// Buckets and objects in memory.
#[derive(Debug, Default)]
pub struct MemoryObjectStore {
    buckets: Mutex<BTreeMap<String, BTreeMap<String, Stored>>>,
    /// Bucket names `create_bucket` reports as existing (collisions).
    pub taken: Mutex<BTreeSet<String>>,
}

impl MemoryObjectStore {
    /// The existing buckets.
    pub fn buckets(&self) -> Vec<String> {
        self.buckets.lock().unwrap().keys().cloned().collect()
    }

    /// The metadata of an object.
    pub fn metadata(&self, bucket: &str, key: &str) -> Option<Vec<(String, String)>> {
        let b = self.buckets.lock().unwrap();
        b.get(bucket)?.get(key).map(|(_, m)| m.clone())
    }
}

fn no_bucket(b: &BucketName) -> StorageError {
    StorageError::NotFound(format!("bucket {b}"))
}

#[async_trait]
impl ObjectStore for MemoryObjectStore {
    async fn create_bucket(&self, bucket: &BucketName) -> Result<(), StorageError> {
        let mut b = self.buckets.lock().unwrap();
        if b.contains_key(bucket.as_str()) || self.taken.lock().unwrap().contains(bucket.as_str()) {
            return Err(StorageError::AlreadyExists(format!("bucket {bucket}")));
        }
        b.insert(bucket.to_string(), BTreeMap::new());
        Ok(())
    }
    async fn delete_bucket_force(&self, bucket: &BucketName) -> Result<(), StorageError> {
        self.buckets.lock().unwrap().remove(bucket.as_str());
        Ok(())
    }
    async fn bucket_exists(&self, bucket: &BucketName) -> Result<bool, StorageError> {
        Ok(self.buckets.lock().unwrap().contains_key(bucket.as_str()))
    }
    async fn put_object(
        &self,
        bucket: &BucketName,
        key: &str,
        body: Vec<u8>,
        metadata: &[(String, String)],
    ) -> Result<(), StorageError> {
        let mut b = self.buckets.lock().unwrap();
        let objs = b
            .get_mut(bucket.as_str())
            .ok_or_else(|| no_bucket(bucket))?;
        objs.insert(key.to_string(), (body, metadata.to_vec()));
        Ok(())
    }
    async fn get_object(&self, bucket: &BucketName, key: &str) -> Result<Vec<u8>, StorageError> {
        let b = self.buckets.lock().unwrap();
        let objs = b.get(bucket.as_str()).ok_or_else(|| no_bucket(bucket))?;
        objs.get(key)
            .map(|(d, _)| d.clone())
            .ok_or_else(|| StorageError::NotFound(format!("object {key}")))
    }
    async fn list_objects(
        &self,
        bucket: &BucketName,
        prefix: &str,
    ) -> Result<Vec<ObjectInfo>, StorageError> {
        let b = self.buckets.lock().unwrap();
        let objs = b.get(bucket.as_str()).ok_or_else(|| no_bucket(bucket))?;
        Ok(objs
            .iter()
            .filter(|(k, _)| k.starts_with(prefix))
            .map(|(k, (d, _))| ObjectInfo {
                key: k.clone(),
                size: d.len() as u64,
                etag: None,
            })
            .collect())
    }
    async fn delete_object(&self, bucket: &BucketName, key: &str) -> Result<(), StorageError> {
        let mut b = self.buckets.lock().unwrap();
        if let Some(objs) = b.get_mut(bucket.as_str()) {
            objs.remove(key);
        }
        Ok(())
    }
}

/// A user of [`MemoryIdentity`].
#[derive(Debug, Clone)]
pub struct MemoryUser {
    /// Its secret.
    pub secret: String,
    /// Its policy document.
    pub policy: Option<serde_json::Value>,
    /// Its groups.
    pub groups: BTreeSet<String>,
}

/// Users, policies and groups in memory.
#[derive(Debug, Default)]
pub struct MemoryIdentity {
    /// Users by access key.
    pub users: Mutex<BTreeMap<String, MemoryUser>>,
    /// How policies are written.
    pub style: IpPolicyStyle,
    /// Makes the next `create_scoped_user` fail.
    pub fail_next_create: Mutex<bool>,
}

impl MemoryIdentity {
    /// Adds a user (e.g. a submitter) with groups.
    pub fn add_user(&self, access_key: &str, secret: &str, groups: &[&str]) {
        self.users.lock().unwrap().insert(
            access_key.to_string(),
            MemoryUser {
                secret: secret.to_string(),
                policy: None,
                groups: groups.iter().map(|g| g.to_string()).collect(),
            },
        );
    }
}

#[async_trait]
impl IdentityAdmin for MemoryIdentity {
    async fn check_root(&self) -> Result<(), StorageError> {
        Ok(())
    }
    async fn create_scoped_user(
        &self,
        spec: &AccessSpec,
    ) -> Result<ScopedCredentials, StorageError> {
        if std::mem::take(&mut *self.fail_next_create.lock().unwrap()) {
            return Err(StorageError::Backend("injected failure".into()));
        }
        let name = spec.user_name();
        let secret = random_secret();
        let policy = policy::bucket_policy(&spec.bucket, &spec.source_ips, self.style);
        self.users.lock().unwrap().insert(
            name.clone(),
            MemoryUser {
                secret: secret.expose().to_string(),
                policy: Some(policy),
                groups: spec.groups.iter().cloned().collect(),
            },
        );
        Ok(ScopedCredentials {
            user: ScopedUser {
                user: name.clone(),
                access_key: name.clone(),
                policy: Some(format!("policy_{name}")),
                groups: spec.groups.clone(),
            },
            secret_key: secret,
        })
    }
    async fn delete_scoped_user(&self, user: &ScopedUser) -> Result<(), StorageError> {
        self.users.lock().unwrap().remove(&user.access_key);
        Ok(())
    }
    async fn verify_membership(
        &self,
        submitter: &Credentials,
        groups: &[String],
    ) -> Result<(), StorageError> {
        let users = self.users.lock().unwrap();
        let Some(u) = users
            .get(&submitter.access_key)
            .filter(|u| u.secret == submitter.secret_key.expose())
        else {
            return Err(StorageError::BadCredentials(format!(
                "the access key {} or its secret is wrong",
                submitter.access_key
            )));
        };
        let missing: Vec<String> = groups
            .iter()
            .filter(|g| !u.groups.contains(*g))
            .cloned()
            .collect();
        if missing.is_empty() {
            Ok(())
        } else {
            Err(StorageError::NotMember {
                user: submitter.access_key.clone(),
                missing,
            })
        }
    }
}
