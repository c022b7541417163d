//! S3 data operations through `aws-sdk-s3` ([`S3Store`]).

use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_s3::config::http::HttpResponse;
use aws_sdk_s3::config::{BehaviorVersion, Credentials as AwsCredentials, Region};
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::Client;

use vivian_core::storage::{BucketName, Credentials, ObjectInfo, ObjectStore, StorageError};

/// An S3 server (path-style addressing, as MinIO, SeaweedFS and moto
/// serve it).
#[derive(Clone, Debug)]
pub struct S3Store {
    client: Client,
    endpoint: String,
}

impl S3Store {
    /// A client of `endpoint` (`http://host:port`) with `creds`, signing
    /// for `region` (`us-east-1` when unsure: MinIO accepts any).
    pub fn new(endpoint: &url::Url, creds: &Credentials, region: &str) -> Self {
        let endpoint_s = endpoint.as_str().trim_end_matches('/').to_string();
        let conf = aws_sdk_s3::config::Builder::new()
            .behavior_version(BehaviorVersion::latest())
            .endpoint_url(&endpoint_s)
            .force_path_style(true)
            .region(Region::new(region.to_string()))
            .credentials_provider(AwsCredentials::new(
                creds.access_key.clone(),
                creds.secret_key.expose().to_string(),
                None,
                None,
                "vivian",
            ))
            // Checksums only where S3 requires them: S3-compatible servers
            // differ in their support of the newer flexible checksums.
            .request_checksum_calculation(
                aws_sdk_s3::config::RequestChecksumCalculation::WhenRequired,
            )
            .response_checksum_validation(
                aws_sdk_s3::config::ResponseChecksumValidation::WhenRequired,
            )
            .retry_config(aws_sdk_s3::config::retry::RetryConfig::standard().with_max_attempts(3))
            .timeout_config(
                aws_sdk_s3::config::timeout::TimeoutConfig::builder()
                    .connect_timeout(Duration::from_secs(10))
                    .operation_attempt_timeout(Duration::from_secs(300))
                    .build(),
            )
            .build();
        S3Store {
            client: Client::from_conf(conf),
            endpoint: endpoint_s,
        }
    }

    /// The underlying SDK client.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Every bucket (for the start-up check and the leftovers sweep).
    pub async fn list_buckets(&self) -> Result<Vec<String>, StorageError> {
        let out = self
            .client
            .list_buckets()
            .send()
            .await
            .map_err(|e| map_err(&self.endpoint, "list the buckets", e))?;
        Ok(out
            .buckets()
            .iter()
            .filter_map(|b| b.name().map(str::to_string))
            .collect())
    }
}

fn map_err<E>(endpoint: &str, what: &str, e: SdkError<E, HttpResponse>) -> StorageError
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
{
    let status = e.raw_response().map(|r| r.status().as_u16());
    let code = e.code().map(str::to_string);
    let msg = e
        .message()
        .map(str::to_string)
        .unwrap_or_else(|| format!("{}", aws_sdk_s3::error::DisplayErrorContext(&e)));
    let text = format!(
        "S3 {endpoint}: cannot {what}: {}{msg}",
        code.as_deref()
            .map(|c| format!("{c}: "))
            .unwrap_or_default()
    );
    match (code.as_deref(), status) {
        (Some("BucketAlreadyExists" | "BucketAlreadyOwnedByYou"), _) => {
            StorageError::AlreadyExists(text)
        }
        (Some("NoSuchBucket" | "NoSuchKey" | "NotFound"), _) | (_, Some(404)) => {
            StorageError::NotFound(text)
        }
        (Some("InvalidAccessKeyId" | "SignatureDoesNotMatch"), _) => {
            StorageError::BadCredentials(text)
        }
        (Some("AccessDenied"), _) | (_, Some(403)) => StorageError::Denied(text),
        _ => StorageError::Backend(text),
    }
}

#[async_trait]
impl ObjectStore for S3Store {
    async fn create_bucket(&self, bucket: &BucketName) -> Result<(), StorageError> {
        // AWS in us-east-1 (and moto) answer 200 to creating a bucket the
        // caller already owns: look first, so that a job never takes over
        // another job's bucket.
        if self.bucket_exists(bucket).await? {
            return Err(StorageError::AlreadyExists(format!("the bucket {bucket}")));
        }
        self.client
            .create_bucket()
            .bucket(bucket.as_str())
            .send()
            .await
            .map_err(|e| map_err(&self.endpoint, &format!("create the bucket {bucket}"), e))?;
        Ok(())
    }

    async fn delete_bucket_force(&self, bucket: &BucketName) -> Result<(), StorageError> {
        // Empty it first: AWS, MinIO and moto refuse to delete a bucket
        // that is not empty.
        let objects = match self.list_objects(bucket, "").await {
            Ok(o) => o,
            Err(StorageError::NotFound(_)) => return Ok(()),
            Err(e) => return Err(e),
        };
        for o in objects {
            self.delete_object(bucket, &o.key).await?;
        }
        match self
            .client
            .delete_bucket()
            .bucket(bucket.as_str())
            .send()
            .await
        {
            Ok(_) => Ok(()),
            Err(e) => match map_err(&self.endpoint, &format!("delete the bucket {bucket}"), e) {
                StorageError::NotFound(_) => Ok(()),
                e => Err(e),
            },
        }
    }

    async fn bucket_exists(&self, bucket: &BucketName) -> Result<bool, StorageError> {
        match self
            .client
            .head_bucket()
            .bucket(bucket.as_str())
            .send()
            .await
        {
            Ok(_) => Ok(true),
            Err(e) => match map_err(&self.endpoint, &format!("look up the bucket {bucket}"), e) {
                StorageError::NotFound(_) => Ok(false),
                e => Err(e),
            },
        }
    }

    async fn put_object(
        &self,
        bucket: &BucketName,
        key: &str,
        body: Vec<u8>,
        metadata: &[(String, String)],
    ) -> Result<(), StorageError> {
        let mut req = self
            .client
            .put_object()
            .bucket(bucket.as_str())
            .key(key)
            .body(ByteStream::from(body));
        for (k, v) in metadata {
            req = req.metadata(k, v);
        }
        req.send()
            .await
            .map_err(|e| map_err(&self.endpoint, &format!("write {bucket}/{key}"), e))?;
        Ok(())
    }

    async fn get_object(&self, bucket: &BucketName, key: &str) -> Result<Vec<u8>, StorageError> {
        let out = self
            .client
            .get_object()
            .bucket(bucket.as_str())
            .key(key)
            .send()
            .await
            .map_err(|e| map_err(&self.endpoint, &format!("read {bucket}/{key}"), e))?;
        let data = out.body.collect().await.map_err(|e| {
            StorageError::Backend(format!("S3 {}: reading {bucket}/{key}: {e}", self.endpoint))
        })?;
        Ok(data.into_bytes().to_vec())
    }

    async fn list_objects(
        &self,
        bucket: &BucketName,
        prefix: &str,
    ) -> Result<Vec<ObjectInfo>, StorageError> {
        let mut out = Vec::new();
        let mut token: Option<String> = None;
        // Bounded: 10 000 pages of up to 1000 keys.
        for _ in 0..10_000 {
            let mut req = self.client.list_objects_v2().bucket(bucket.as_str());
            if !prefix.is_empty() {
                req = req.prefix(prefix);
            }
            if let Some(t) = &token {
                req = req.continuation_token(t);
            }
            let page = req
                .send()
                .await
                .map_err(|e| map_err(&self.endpoint, &format!("list the bucket {bucket}"), e))?;
            for o in page.contents() {
                if let Some(k) = o.key() {
                    out.push(ObjectInfo {
                        key: k.to_string(),
                        size: o.size().unwrap_or(0).max(0) as u64,
                        etag: o.e_tag().map(|e| e.trim_matches('"').to_string()),
                    });
                }
            }
            match page.next_continuation_token() {
                Some(t) if page.is_truncated() == Some(true) => token = Some(t.to_string()),
                _ => return Ok(out),
            }
        }
        Err(StorageError::Backend(format!(
            "S3 {}: the listing of {bucket} never ends",
            self.endpoint
        )))
    }

    async fn delete_object(&self, bucket: &BucketName, key: &str) -> Result<(), StorageError> {
        match self
            .client
            .delete_object()
            .bucket(bucket.as_str())
            .key(key)
            .send()
            .await
        {
            Ok(_) => Ok(()),
            Err(e) => match map_err(&self.endpoint, &format!("delete {bucket}/{key}"), e) {
                StorageError::NotFound(_) => Ok(()),
                e => Err(e),
            },
        }
    }
}
