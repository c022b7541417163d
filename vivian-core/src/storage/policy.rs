//! IAM-style policy documents (IN D): `{"Version": "2012-10-17",
//! "Statement": [...]}`, shared by every identity backend.

use std::net::IpAddr;

use serde_json::{json, Value};

use super::BucketName;

/// How a source-IP restriction is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum IpPolicyStyle {
    /// The reference's form (MinIO, AWS): Allow on the bucket from the IPs,
    /// plus Deny on everything from any other IP (so group policies cannot
    /// widen the credential either).
    #[default]
    DenyOutsideIp,
    /// Allow on the bucket from the IPs only (servers that refuse `Deny`,
    /// such as SeaweedFS). Weaker: a group policy then applies from any IP.
    AllowOnlyIp,
}

/// One statement.
#[derive(Debug, Clone, PartialEq)]
pub struct Statement {
    /// `Allow` (true) or `Deny`.
    pub allow: bool,
    /// Actions (`["s3:*"]` by default).
    pub actions: Vec<String>,
    /// Buckets the statement covers (`*` for all); each gives
    /// `arn:aws:s3:::<b>` and `arn:aws:s3:::<b>/*`.
    pub buckets: Vec<String>,
    /// `IpAddress` condition: source IPs (CIDR) the statement applies to.
    pub ip_in: Vec<String>,
    /// `NotIpAddress` condition.
    pub ip_not_in: Vec<String>,
}

impl Statement {
    /// `s3:*` on `buckets`, no condition.
    pub fn new(allow: bool, buckets: &[&str]) -> Self {
        Statement {
            allow,
            actions: vec!["s3:*".into()],
            buckets: buckets.iter().map(|b| b.to_string()).collect(),
            ip_in: vec![],
            ip_not_in: vec![],
        }
    }

    /// The statement as JSON.
    pub fn to_json(&self) -> Value {
        let mut resources = Vec::new();
        for b in &self.buckets {
            resources.push(format!("arn:aws:s3:::{b}"));
            resources.push(format!("arn:aws:s3:::{b}/*"));
        }
        let mut st = json!({
            "Action": self.actions,
            "Effect": if self.allow { "Allow" } else { "Deny" },
            "Resource": resources,
        });
        let mut cond = serde_json::Map::new();
        if !self.ip_in.is_empty() {
            cond.insert("IpAddress".into(), json!({"aws:SourceIp": self.ip_in}));
        }
        if !self.ip_not_in.is_empty() {
            cond.insert(
                "NotIpAddress".into(),
                json!({"aws:SourceIp": self.ip_not_in}),
            );
        }
        if !cond.is_empty() {
            st["Condition"] = Value::Object(cond);
        }
        st
    }
}

/// A policy document.
pub fn document(statements: &[Statement]) -> Value {
    json!({
        "Version": "2012-10-17",
        "Statement": statements.iter().map(Statement::to_json).collect::<Vec<_>>(),
    })
}

/// The CIDR of one address (`/32` or `/128`).
pub fn host_cidr(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v) => format!("{v}/32"),
        IpAddr::V6(v) => format!("{v}/128"),
    }
}

/// The policy of a job-bucket credential: everything on `bucket`, only from
/// `source_ips` when not empty.
pub fn bucket_policy(bucket: &BucketName, source_ips: &[IpAddr], style: IpPolicyStyle) -> Value {
    let cidrs: Vec<String> = source_ips.iter().copied().map(host_cidr).collect();
    let mut allow = Statement::new(true, &[bucket.as_str()]);
    if cidrs.is_empty() {
        return document(&[allow]);
    }
    allow.ip_in = cidrs.clone();
    match style {
        IpPolicyStyle::AllowOnlyIp => document(&[allow]),
        IpPolicyStyle::DenyOutsideIp => {
            let mut deny = Statement::new(false, &["*"]);
            deny.ip_not_in = cidrs;
            document(&[allow, deny])
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dut_policy_in_the_reference_form() {
        let b = BucketName::new("job-b1").unwrap();
        let p = bucket_policy(
            &b,
            &["10.42.0.5".parse().unwrap()],
            IpPolicyStyle::DenyOutsideIp,
        );
        assert_eq!(
            p,
            json!({"Version": "2012-10-17", "Statement": [
                {"Action": ["s3:*"], "Effect": "Allow",
                 "Resource": ["arn:aws:s3:::job-b1", "arn:aws:s3:::job-b1/*"],
                 "Condition": {"IpAddress": {"aws:SourceIp": ["10.42.0.5/32"]}}},
                {"Action": ["s3:*"], "Effect": "Deny",
                 "Resource": ["arn:aws:s3:::*", "arn:aws:s3:::*/*"],
                 "Condition": {"NotIpAddress": {"aws:SourceIp": ["10.42.0.5/32"]}}}
            ]})
        );
        let allow_only = bucket_policy(
            &b,
            &["10.42.0.5".parse().unwrap()],
            IpPolicyStyle::AllowOnlyIp,
        );
        assert_eq!(allow_only["Statement"].as_array().unwrap().len(), 1);
        assert!(!allow_only.to_string().contains("Deny"));
    }

    #[test]
    fn client_policy_has_no_condition() {
        let b = BucketName::new("job-b1").unwrap();
        let p = bucket_policy(&b, &[], IpPolicyStyle::DenyOutsideIp);
        let st = &p["Statement"][0];
        assert_eq!(st["Effect"], "Allow");
        assert!(st.get("Condition").is_none());
        assert_eq!(p["Statement"].as_array().unwrap().len(), 1);
    }
}
