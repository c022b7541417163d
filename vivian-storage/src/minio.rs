//! The MinIO admin API backend ([`MinioAdmin`]): the eight calls the
//! reference makes through `mcli admin` (object-storage.md §1.3), each one
//! signed request under `/minio/admin/v3`, bodies encrypted with the
//! signing secret where MinIO wants them ([`crate::sio`]).

use async_trait::async_trait;
use reqwest::Method;
use serde_json::json;

use vivian_core::storage::{
    policy, random_secret, AccessSpec, Credentials, IdentityAdmin, IpPolicyStyle,
    ScopedCredentials, ScopedUser, StorageError,
};

use crate::http::{Answer, SignedClient};
use crate::sio;

/// The admin API prefix.
pub const ADMIN_PREFIX: &str = "/minio/admin/v3";

/// A MinIO server administered with its root credentials.
#[derive(Debug, Clone)]
pub struct MinioAdmin {
    client: SignedClient,
}

/// A MinIO admin error answer.
fn error_of(what: &str, a: &Answer) -> StorageError {
    let v: serde_json::Value = serde_json::from_slice(&a.body).unwrap_or_default();
    let code = v["Code"].as_str().unwrap_or("").to_string();
    let msg = v["Message"]
        .as_str()
        .map(str::to_string)
        .unwrap_or_else(|| a.text());
    let text = format!("MinIO admin {what}: {} {code}: {msg}", a.status);
    match code.as_str() {
        "XMinioAdminNoSuchUser" | "XMinioAdminNoSuchGroup" | "XMinioAdminNoSuchPolicy" => {
            StorageError::NotFound(text)
        }
        "InvalidAccessKeyId" | "SignatureDoesNotMatch" => StorageError::BadCredentials(text),
        "AccessDenied" => StorageError::Denied(text),
        _ if a.status == 404 => StorageError::NotFound(text),
        _ if a.status == 403 => StorageError::Denied(text),
        _ => StorageError::Backend(text),
    }
}

fn already_applied(e: &StorageError) -> bool {
    let s = e.to_string();
    s.contains("XMinioAdminPolicyChangeAlreadyApplied") || s.contains("XMinioPolicyAlreadyAttached")
}

impl MinioAdmin {
    /// A client of the server at `endpoint` with the root credentials.
    pub fn new(endpoint: &url::Url, root: &Credentials) -> Result<Self, StorageError> {
        Ok(MinioAdmin {
            client: SignedClient::new(endpoint, root, "us-east-1", "s3", None)?,
        })
    }

    async fn call_as(
        &self,
        client: &SignedClient,
        method: Method,
        call: &str,
        query: &[(&str, &str)],
        headers: &[(&str, &str)],
        body: Vec<u8>,
    ) -> Result<Answer, StorageError> {
        let a = client
            .send(
                method,
                &format!("{ADMIN_PREFIX}/{call}"),
                query,
                headers,
                body,
            )
            .await?;
        if (200..300).contains(&a.status) {
            Ok(a)
        } else {
            Err(error_of(call, &a))
        }
    }

    async fn call(
        &self,
        method: Method,
        call: &str,
        query: &[(&str, &str)],
        body: Vec<u8>,
    ) -> Result<Answer, StorageError> {
        self.call_as(&self.client, method, call, query, &[], body)
            .await
    }

    fn encrypt(&self, v: &serde_json::Value) -> Vec<u8> {
        sio::encrypt(
            self.client.credentials().secret_key.expose(),
            v.to_string().as_bytes(),
            sio::Algorithm::Argon2idAesGcm,
        )
    }

    /// `add-user`: creates (or updates) a user with its secret.
    pub async fn add_user(&self, user: &str, secret: &str) -> Result<(), StorageError> {
        let body = self.encrypt(&json!({"secretKey": secret, "status": "enabled"}));
        self.call(Method::PUT, "add-user", &[("accessKey", user)], body)
            .await
            .map(|_| ())
    }

    /// `remove-user` (a missing user is fine).
    pub async fn remove_user(&self, user: &str) -> Result<(), StorageError> {
        match self
            .call(
                Method::DELETE,
                "remove-user",
                &[("accessKey", user)],
                vec![],
            )
            .await
        {
            Ok(_) | Err(StorageError::NotFound(_)) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// `add-canned-policy`.
    pub async fn add_policy(
        &self,
        name: &str,
        doc: &serde_json::Value,
    ) -> Result<(), StorageError> {
        self.call(
            Method::PUT,
            "add-canned-policy",
            &[("name", name)],
            doc.to_string().into_bytes(),
        )
        .await
        .map(|_| ())
    }

    /// `remove-canned-policy` (a missing policy is fine).
    pub async fn remove_policy(&self, name: &str) -> Result<(), StorageError> {
        match self
            .call(
                Method::DELETE,
                "remove-canned-policy",
                &[("name", name)],
                vec![],
            )
            .await
        {
            Ok(_) | Err(StorageError::NotFound(_)) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// `idp/builtin/policy/attach` or `detach` of `policy` for `user`
    /// (already applied is fine; 200 with an encrypted answer, 201 and 204
    /// are all success).
    pub async fn set_policy_attached(
        &self,
        policy: &str,
        user: &str,
        attach: bool,
    ) -> Result<(), StorageError> {
        let call = if attach {
            "idp/builtin/policy/attach"
        } else {
            "idp/builtin/policy/detach"
        };
        let body = self.encrypt(&json!({"policies": [policy], "user": user}));
        let r = self
            .call_as(
                &self.client,
                Method::POST,
                call,
                &[],
                &[("content-type", "application/octet-stream")],
                body,
            )
            .await;
        match r {
            Ok(a) => {
                if a.status == 200 && !a.body.is_empty() {
                    // The answer is encrypted; reading it proves both ends
                    // agree on the key.
                    sio::decrypt(self.client.credentials().secret_key.expose(), &a.body).map_err(
                        |e| StorageError::Backend(format!("MinIO admin {call}: the answer: {e}")),
                    )?;
                }
                Ok(())
            }
            Err(e) if already_applied(&e) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// `update-group-members`: adds (or removes) `user` to `group`.
    pub async fn group_members(
        &self,
        group: &str,
        user: &str,
        remove: bool,
    ) -> Result<(), StorageError> {
        let body =
            json!({"group": group, "members": [user], "groupStatus": "", "isRemove": remove});
        self.call(
            Method::PUT,
            "update-group-members",
            &[],
            body.to_string().into_bytes(),
        )
        .await
        .map(|_| ())
    }

    /// `user-info` of `access_key`, signed with `as_creds` (a user may read
    /// its own); returns its groups (`memberOf`).
    pub async fn user_groups(
        &self,
        as_creds: &Credentials,
        access_key: &str,
    ) -> Result<Vec<String>, StorageError> {
        let client = self.client.with_credentials(as_creds);
        let a = self
            .call_as(
                &client,
                Method::GET,
                "user-info",
                &[("accessKey", access_key)],
                &[],
                vec![],
            )
            .await?;
        let v: serde_json::Value = serde_json::from_slice(&a.body)
            .map_err(|e| StorageError::Backend(format!("MinIO admin user-info: not JSON: {e}")))?;
        // memberOf: strings, or objects with a name (older servers).
        Ok(v["memberOf"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|g| {
                        g.as_str()
                            .or_else(|| g["name"].as_str())
                            .map(str::to_string)
                    })
                    .collect()
            })
            .unwrap_or_default())
    }
}

#[async_trait]
impl IdentityAdmin for MinioAdmin {
    async fn check_root(&self) -> Result<(), StorageError> {
        match self.call(Method::GET, "info", &[], vec![]).await {
            Ok(_) => Ok(()),
            Err(StorageError::Denied(m)) => Err(StorageError::BadCredentials(m)),
            Err(e) => Err(e),
        }
    }

    async fn create_scoped_user(
        &self,
        spec: &AccessSpec,
    ) -> Result<ScopedCredentials, StorageError> {
        let user = spec.user_name();
        let secret = random_secret();
        let policy_name = format!("policy_{user}");
        self.add_user(&user, secret.expose()).await?;
        let mut scoped = ScopedUser {
            user: user.clone(),
            access_key: user.clone(),
            policy: None,
            groups: vec![],
        };
        let r: Result<(), StorageError> = async {
            let doc =
                policy::bucket_policy(&spec.bucket, &spec.source_ips, IpPolicyStyle::DenyOutsideIp);
            self.add_policy(&policy_name, &doc).await?;
            scoped.policy = Some(policy_name.clone());
            self.set_policy_attached(&policy_name, &user, true).await?;
            for g in &spec.groups {
                self.group_members(g, &user, false).await?;
                scoped.groups.push(g.clone());
            }
            Ok(())
        }
        .await;
        match r {
            Ok(()) => Ok(ScopedCredentials {
                user: scoped,
                secret_key: secret,
            }),
            Err(e) => {
                if let Err(e2) = self.delete_scoped_user(&scoped).await {
                    tracing::error!(user, "cannot remove a half-created user: {e2}");
                }
                Err(e)
            }
        }
    }

    async fn delete_scoped_user(&self, user: &ScopedUser) -> Result<(), StorageError> {
        let ok_if_gone = |r: Result<(), StorageError>| match r {
            Ok(()) | Err(StorageError::NotFound(_)) => Ok(()),
            Err(e) => Err(e),
        };
        for g in &user.groups {
            ok_if_gone(self.group_members(g, &user.user, true).await)?;
        }
        if let Some(p) = &user.policy {
            ok_if_gone(self.set_policy_attached(p, &user.user, false).await)?;
            self.remove_policy(p).await?;
        }
        self.remove_user(&user.user).await
    }

    async fn verify_membership(
        &self,
        submitter: &Credentials,
        groups: &[String],
    ) -> Result<(), StorageError> {
        let member_of = match self.user_groups(submitter, &submitter.access_key).await {
            Ok(g) => g,
            Err(StorageError::Denied(m)) | Err(StorageError::NotFound(m)) => {
                return Err(StorageError::BadCredentials(m))
            }
            Err(e) => return Err(e),
        };
        let missing: Vec<String> = groups
            .iter()
            .filter(|g| !member_of.contains(g))
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
