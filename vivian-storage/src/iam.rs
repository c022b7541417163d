//! The AWS IAM Query API backend ([`IamAdmin`]): for S3 servers that
//! speak it (AWS, SeaweedFS, moto).
//!
//! Users are `<bucket>-<role>` (cut to IAM's 64 characters), with an access
//! key IAM generates and an inline user policy `policy_<user>`. Deleting
//! follows IAM's order (groups, policy, keys, then the user), since IAM
//! refuses to delete a user that still has any of them.

use async_trait::async_trait;
use quick_xml::events::Event;
use reqwest::Method;

use vivian_core::storage::{
    policy, AccessSpec, Credentials, IdentityAdmin, IpPolicyStyle, ScopedCredentials, ScopedUser,
    Secret, StorageError,
};

use crate::http::{Answer, SignedClient};

/// IAM's longest user name.
pub const MAX_USER_NAME: usize = 64;

/// An IAM Query API server.
#[derive(Debug, Clone)]
pub struct IamAdmin {
    client: SignedClient,
    style: IpPolicyStyle,
}

/// The texts of every `<tag>` element of an XML document.
pub fn xml_texts(xml: &[u8], tag: &str) -> Vec<String> {
    let mut r = quick_xml::Reader::from_reader(xml);
    let mut out = Vec::new();
    let mut current: Option<String> = None;
    let mut buf = Vec::new();
    // Bounded by the document: every event consumes input.
    loop {
        match r.read_event_into(&mut buf) {
            Ok(Event::Start(e)) => {
                current = (e.local_name().as_ref() == tag.as_bytes()).then(String::new);
            }
            Ok(Event::Text(t)) => {
                if let Some(c) = current.as_mut() {
                    c.push_str(&String::from_utf8_lossy(t.as_ref()));
                }
            }
            Ok(Event::GeneralRef(g)) => {
                if let Some(c) = current.as_mut() {
                    let name = String::from_utf8_lossy(g.as_ref()).into_owned();
                    let ch = match name.as_str() {
                        "amp" => "&".to_string(),
                        "lt" => "<".to_string(),
                        "gt" => ">".to_string(),
                        "quot" => "\"".to_string(),
                        "apos" => "'".to_string(),
                        _ => name
                            .strip_prefix('#')
                            .and_then(|n| match n.strip_prefix('x') {
                                Some(h) => u32::from_str_radix(h, 16).ok(),
                                None => n.parse().ok(),
                            })
                            .and_then(char::from_u32)
                            .map(String::from)
                            .unwrap_or_default(),
                    };
                    c.push_str(&ch);
                }
            }
            Ok(Event::End(_)) => {
                if let Some(c) = current.take() {
                    out.push(c);
                }
            }
            Ok(Event::Eof) | Err(_) => break,
            _ => {}
        }
        buf.clear();
    }
    out
}

impl IamAdmin {
    /// A client of the IAM API at `endpoint` with the administrator's
    /// credentials; `style` says how source-IP restrictions are written
    /// ([`IpPolicyStyle::AllowOnlyIp`] for SeaweedFS, which refuses `Deny`).
    pub fn new(
        endpoint: &url::Url,
        admin: &Credentials,
        style: IpPolicyStyle,
    ) -> Result<Self, StorageError> {
        Ok(IamAdmin {
            client: SignedClient::new(endpoint, admin, "us-east-1", "iam", None)?,
            style,
        })
    }

    /// Calls `action` with `params`, signed as `client`.
    async fn call_as(
        &self,
        client: &SignedClient,
        action: &str,
        params: &[(&str, &str)],
    ) -> Result<Answer, StorageError> {
        let mut form = vec![("Action", action), ("Version", "2010-05-08")];
        form.extend_from_slice(params);
        let body = form
            .iter()
            .map(|(k, v)| {
                format!(
                    "{}={}",
                    crate::sigv4::uri_encode(k, false),
                    crate::sigv4::uri_encode(v, false)
                )
            })
            .collect::<Vec<_>>()
            .join("&");
        let a = client
            .send(
                Method::POST,
                "/",
                &[],
                &[(
                    "content-type",
                    "application/x-www-form-urlencoded; charset=utf-8",
                )],
                body.into_bytes(),
            )
            .await?;
        if (200..300).contains(&a.status) {
            return Ok(a);
        }
        let code = xml_texts(&a.body, "Code")
            .into_iter()
            .next()
            .unwrap_or_default();
        let msg = xml_texts(&a.body, "Message")
            .into_iter()
            .next()
            .unwrap_or_else(|| a.text());
        let text = format!(
            "IAM {}: {action}: {} {code}: {msg}",
            client.endpoint(),
            a.status
        );
        Err(match code.as_str() {
            "NoSuchEntity" => StorageError::NotFound(text),
            "EntityAlreadyExists" => StorageError::AlreadyExists(text),
            "InvalidClientTokenId" | "SignatureDoesNotMatch" | "InvalidAccessKeyId" => {
                StorageError::BadCredentials(text)
            }
            "AccessDenied" => StorageError::Denied(text),
            _ if a.status == 404 => StorageError::NotFound(text),
            _ if a.status == 403 => StorageError::Denied(text),
            _ => StorageError::Backend(text),
        })
    }

    async fn call(&self, action: &str, params: &[(&str, &str)]) -> Result<Answer, StorageError> {
        self.call_as(&self.client, action, params).await
    }

    /// Every user name (`ListUsers`).
    pub async fn list_users(&self) -> Result<Vec<String>, StorageError> {
        let a = self.call("ListUsers", &[]).await?;
        Ok(xml_texts(&a.body, "UserName"))
    }

    /// Creates a group (`CreateGroup`; an existing one is fine).
    pub async fn create_group(&self, group: &str) -> Result<(), StorageError> {
        match self.call("CreateGroup", &[("GroupName", group)]).await {
            Ok(_) | Err(StorageError::AlreadyExists(_)) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Creates a user with an access key (for a submitter in tests and
    /// tools): returns its credentials.
    pub async fn create_user_with_key(&self, user: &str) -> Result<Credentials, StorageError> {
        self.call("CreateUser", &[("UserName", user)]).await?;
        let a = self.call("CreateAccessKey", &[("UserName", user)]).await?;
        let ak = xml_texts(&a.body, "AccessKeyId").into_iter().next();
        let sk = xml_texts(&a.body, "SecretAccessKey").into_iter().next();
        match (ak, sk) {
            (Some(ak), Some(sk)) => Ok(Credentials::new(ak, sk)),
            _ => Err(StorageError::Backend(format!(
                "IAM CreateAccessKey: no key in the answer: {}",
                a.text()
            ))),
        }
    }

    /// Adds a user to a group.
    pub async fn add_user_to_group(&self, user: &str, group: &str) -> Result<(), StorageError> {
        self.call(
            "AddUserToGroup",
            &[("UserName", user), ("GroupName", group)],
        )
        .await
        .map(|_| ())
    }

    /// Removes a user and whatever IAM requires removing first.
    pub async fn delete_user_fully(&self, user: &str) -> Result<(), StorageError> {
        let ignore_missing = |r: Result<Answer, StorageError>| match r {
            Ok(_) | Err(StorageError::NotFound(_)) => Ok(()),
            Err(e) => Err(e),
        };
        match self.call("ListGroupsForUser", &[("UserName", user)]).await {
            Ok(a) => {
                for g in xml_texts(&a.body, "GroupName") {
                    ignore_missing(
                        self.call(
                            "RemoveUserFromGroup",
                            &[("UserName", user), ("GroupName", &g)],
                        )
                        .await,
                    )?;
                }
            }
            Err(StorageError::NotFound(_)) => return Ok(()),
            Err(e) => return Err(e),
        }
        if let Ok(a) = self.call("ListUserPolicies", &[("UserName", user)]).await {
            for p in xml_texts(&a.body, "member") {
                ignore_missing(
                    self.call(
                        "DeleteUserPolicy",
                        &[("UserName", user), ("PolicyName", &p)],
                    )
                    .await,
                )?;
            }
        }
        if let Ok(a) = self.call("ListAccessKeys", &[("UserName", user)]).await {
            for k in xml_texts(&a.body, "AccessKeyId") {
                ignore_missing(
                    self.call(
                        "DeleteAccessKey",
                        &[("UserName", user), ("AccessKeyId", &k)],
                    )
                    .await,
                )?;
            }
        }
        ignore_missing(self.call("DeleteUser", &[("UserName", user)]).await)
    }
}

/// `<bucket>-<role>`, the bucket cut so that it fits IAM's 64 characters.
fn user_name(spec: &AccessSpec) -> String {
    let suffix = format!("-{}", spec.role.as_str());
    let mut user = spec.bucket.to_string();
    user.truncate(MAX_USER_NAME - suffix.len());
    user.push_str(&suffix);
    user
}

#[async_trait]
impl IdentityAdmin for IamAdmin {
    fn planned_user(&self, spec: &AccessSpec) -> ScopedUser {
        let user = user_name(spec);
        ScopedUser {
            access_key: user.clone(),
            policy: Some(format!("policy_{user}")),
            groups: spec.groups.clone(),
            user,
        }
    }

    async fn check_root(&self) -> Result<(), StorageError> {
        self.call("ListUsers", &[]).await.map(|_| ())
    }

    async fn create_scoped_user(
        &self,
        spec: &AccessSpec,
    ) -> Result<ScopedCredentials, StorageError> {
        let user = user_name(spec);
        let policy_name = format!("policy_{user}");
        self.call("CreateUser", &[("UserName", &user)]).await?;
        let mut scoped = ScopedUser {
            user: user.clone(),
            access_key: String::new(),
            policy: None,
            groups: vec![],
        };
        let result: Result<Secret, StorageError> = async {
            let a = self.call("CreateAccessKey", &[("UserName", &user)]).await?;
            let ak = xml_texts(&a.body, "AccessKeyId").into_iter().next();
            let sk = xml_texts(&a.body, "SecretAccessKey").into_iter().next();
            let (Some(ak), Some(sk)) = (ak, sk) else {
                return Err(StorageError::Backend(format!(
                    "IAM CreateAccessKey for {user}: no key in the answer"
                )));
            };
            scoped.access_key = ak;
            let doc = policy::bucket_policy(&spec.bucket, &spec.source_ips, self.style).to_string();
            self.call(
                "PutUserPolicy",
                &[
                    ("UserName", &user),
                    ("PolicyName", &policy_name),
                    ("PolicyDocument", &doc),
                ],
            )
            .await?;
            scoped.policy = Some(policy_name.clone());
            for g in &spec.groups {
                self.call("AddUserToGroup", &[("UserName", &user), ("GroupName", g)])
                    .await?;
                scoped.groups.push(g.clone());
            }
            Ok(Secret::new(sk))
        }
        .await;
        match result {
            Ok(secret_key) => Ok(ScopedCredentials {
                user: scoped,
                secret_key,
            }),
            Err(e) => {
                if let Err(e2) = self.delete_user_fully(&user).await {
                    tracing::error!(user, "cannot remove a half-created user: {e2}");
                }
                Err(e)
            }
        }
    }

    async fn delete_scoped_user(&self, user: &ScopedUser) -> Result<(), StorageError> {
        self.delete_user_fully(&user.user).await
    }

    async fn verify_membership(
        &self,
        submitter: &Credentials,
        groups: &[String],
    ) -> Result<(), StorageError> {
        // Who the keys belong to (and whether they are valid at all).
        let own = self.client.with_credentials(submitter);
        let a = match self.call_as(&own, "GetUser", &[]).await {
            Ok(a) => a,
            Err(StorageError::Denied(m)) | Err(StorageError::BadCredentials(m)) => {
                return Err(StorageError::BadCredentials(m))
            }
            Err(e) => return Err(e),
        };
        let Some(user) = xml_texts(&a.body, "UserName").into_iter().next() else {
            return Err(StorageError::Backend(format!(
                "IAM GetUser: no user name in the answer: {}",
                a.text()
            )));
        };
        let a = self
            .call("ListGroupsForUser", &[("UserName", &user)])
            .await?;
        let member_of = xml_texts(&a.body, "GroupName");
        let missing: Vec<String> = groups
            .iter()
            .filter(|g| !member_of.contains(g))
            .cloned()
            .collect();
        if missing.is_empty() {
            Ok(())
        } else {
            Err(StorageError::NotMember { user, missing })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xml_texts_reads_elements() {
        let x = br#"<ListGroupsForUserResponse xmlns="https://iam.amazonaws.com/doc/2010-05-08/"><ListGroupsForUserResult><Groups><member><GroupName>g1</GroupName></member><member><GroupName>a&amp;b&#x41;</GroupName></member></Groups></ListGroupsForUserResult></ListGroupsForUserResponse>"#;
        assert_eq!(xml_texts(x, "GroupName"), vec!["g1", "a&bA"]);
        assert!(xml_texts(b"<<<not xml", "GroupName").is_empty());
    }
}
