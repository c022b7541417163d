//! Bucket names: the reference's sanitiser (IN D) and job-bucket names.

use std::fmt;

use super::StorageError;

/// The longest valid S3 bucket name.
pub const MAX_BUCKET_NAME: usize = 63;

/// How many characters of `job-<dut id>-<job id>` a job-bucket name keeps
/// before its random suffix.
pub const JOB_PREFIX_LEN: usize = 56;

/// Length of the random suffix of a job-bucket name (before sanitising,
/// which may cut it: the reference keeps that quirk).
pub const JOB_RANDOM_LEN: usize = 32;

/// Turns any string into a valid S3 bucket name, exactly as the reference
/// does:
///
/// 1. lower-case; characters outside `[a-z0-9.-]` become `-`;
/// 2. `..`, `.-` and `-.` are replaced by `-` until none is left;
/// 3. shorter than 3 characters: prefixed with `b--`;
/// 4. starting with `xn--`, `.` or `-`: prefixed with `x`;
/// 5. an IP address: prefixed with `ip-`;
/// 6. cut to 63 characters;
/// 7. ending with `.` or `-`: an `x` is appended (it replaces the last
///    character when the name is already 63 characters long).
///
/// Vectors: `""` → `b--x`, `"ab"` → `b--ab`, `"/*_~!@#$%^&*()_+|"` →
/// `x-----------------x`, `"192.168.5.4"` → `ip-192.168.5.4`.
pub fn sanitize_bucket_name(name: &str) -> String {
    let mut s: String = name
        .to_lowercase()
        .chars()
        .map(|c| {
            if c.is_ascii_lowercase() || c.is_ascii_digit() || c == '.' || c == '-' {
                c
            } else {
                '-'
            }
        })
        .collect();
    loop {
        let next = s.replace("..", "-").replace(".-", "-").replace("-.", "-");
        if next == s {
            break;
        }
        s = next;
    }
    if s.len() < 3 {
        s = format!("b--{s}");
    }
    if s.starts_with("xn--") || s.starts_with('.') || s.starts_with('-') {
        s = format!("x{s}");
    }
    if s.parse::<std::net::IpAddr>().is_ok() {
        s = format!("ip-{s}");
    }
    s.truncate(MAX_BUCKET_NAME);
    if s.ends_with('.') || s.ends_with('-') {
        if s.len() == MAX_BUCKET_NAME {
            s.pop();
        }
        s.push('x');
    }
    s
}

/// A valid S3 bucket name: 3 to 63 characters of `[a-z0-9.-]`, starting
/// and ending with a letter or digit, no `..`, not an IP address.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BucketName(String);

impl BucketName {
    /// Validates `name` (it is not sanitised: see [`sanitize_bucket_name`]).
    pub fn new(name: impl Into<String>) -> Result<Self, StorageError> {
        let name = name.into();
        let bad = |why: &str| {
            Err(StorageError::InvalidName(format!(
                "bucket name {name:?}: {why}"
            )))
        };
        if name.len() < 3 || name.len() > MAX_BUCKET_NAME {
            return bad("must be 3 to 63 characters long");
        }
        if !name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '.' || c == '-')
        {
            return bad("only lower-case letters, digits, '.' and '-' are allowed");
        }
        let first_last_ok = |c: Option<char>| c.is_some_and(|c| c.is_ascii_alphanumeric());
        if !first_last_ok(name.chars().next()) || !first_last_ok(name.chars().last()) {
            return bad("must start and end with a letter or a digit");
        }
        if name.contains("..") {
            return bad("must not contain '..'");
        }
        if name.parse::<std::net::IpAddr>().is_ok() {
            return bad("must not be an IP address");
        }
        Ok(BucketName(name))
    }

    /// The sanitised form of any string ([`sanitize_bucket_name`]), which is
    /// always valid.
    pub fn sanitized(name: &str) -> Self {
        BucketName(sanitize_bucket_name(name))
    }

    /// The name of a job's bucket: `job-<dut id>-<job id>` cut to 56
    /// characters, `-`, then `random` (32 characters of `[a-z0-9-]`), all
    /// sanitised.
    pub fn for_job(dut_id: &str, job_id: &str, random: &str) -> Self {
        let prefix: String = format!("job-{dut_id}-{job_id}")
            .chars()
            .take(JOB_PREFIX_LEN)
            .collect();
        Self::sanitized(&format!("{prefix}-{random}"))
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for BucketName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for BucketName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

/// `len` random characters of `[a-z0-9-]` (from the OS random source).
pub fn random_suffix(len: usize) -> String {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789-";
    let bytes = super::random_bytes(len * 2);
    // Rejection sampling keeps the distribution uniform: 37 * 6 = 222.
    let mut out = String::with_capacity(len);
    let mut pool = bytes.into_iter();
    while out.len() < len {
        let b = match pool.next() {
            Some(b) => b,
            None => {
                pool = super::random_bytes(len).into_iter();
                continue;
            }
        };
        if b < 222 {
            out.push(ALPHABET[(b % 37) as usize] as char);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reference_vectors() {
        assert_eq!(sanitize_bucket_name(""), "b--x");
        assert_eq!(sanitize_bucket_name("ab"), "b--ab");
        assert_eq!(
            sanitize_bucket_name("/*_~!@#$%^&*()_+|"),
            "x-----------------x"
        );
        assert_eq!(sanitize_bucket_name("192.168.5.4"), "ip-192.168.5.4");
    }

    #[test]
    fn sanitised_names_are_valid() {
        let long = "A".repeat(100) + "-";
        for input in [
            "",
            "a",
            "ab",
            "xn--foo",
            ".lead",
            "trail.",
            "a..b.-c-.d",
            "UPPER_case name",
            "192.168.5.4",
            "::1",
            long.as_str(),
            "job-52:54:00:11:22:00-untitled-1700000000",
            "ümlaut",
        ] {
            let s = sanitize_bucket_name(input);
            BucketName::new(s.clone()).unwrap_or_else(|e| panic!("{input:?} -> {s:?}: {e}"));
        }
        assert_eq!(sanitize_bucket_name(&long).len(), 63);
        let full = "a".repeat(62) + "-";
        assert_eq!(sanitize_bucket_name(&full), "a".repeat(62) + "x");
    }

    #[test]
    fn job_names() {
        let r = random_suffix(JOB_RANDOM_LEN);
        assert_eq!(r.len(), 32);
        assert!(r
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-'));
        let b = BucketName::for_job("52:54:00:11:22:00", "my job", "abc");
        assert_eq!(b.as_str(), "job-52-54-00-11-22-00-my-job-abc");
        let long = BucketName::for_job("52:54:00:11:22:00", &"j".repeat(80), &r);
        assert!(long.as_str().len() <= 63);
        assert!(long.as_str().starts_with("job-52-54-00-11-22-00-jjj"));
        assert_ne!(random_suffix(32), random_suffix(32));
    }

    #[test]
    fn invalid_names_are_refused_with_the_reason() {
        for (n, why) in [
            ("ab", "3 to 63"),
            ("Abc", "lower-case"),
            ("-abc", "start and end"),
            ("a..b", "'..'"),
            ("10.0.0.1", "IP address"),
        ] {
            let e = BucketName::new(n).unwrap_err().to_string();
            assert!(e.contains(why), "{n}: {e}");
        }
    }
}
