//! How Vivian builds its outgoing HTTP clients (reqwest), in one place.
//!
//! Building a reqwest client loads the system trust store (on Linux,
//! `/etc/ssl/certs`, or `SSL_CERT_FILE`/`SSL_CERT_DIR` when set) and fails
//! when it holds no certificate at all (no `ca-certificates` package). An
//! executor must still start on such a machine: SALAD, the artifact
//! downloads and GitLab over plain `http://` need no TLS roots. [`build`]
//! and [`build_with`] therefore build the client again without any TLS root
//! in that case, log a warning naming what the client is for, and report it
//! with [`TlsRoots::Missing`]; `https://` requests of such a client then fail
//! with a certificate error naming the URL.
//!
//! Each build parses the trust store again, so a process should build few
//! clients and share them: cloning a [`reqwest::Client`] is cheap (it is
//! reference counted) and clones share their connection pool.
//!
//! Available with the `http-client` feature.

use std::time::Duration;

/// Time limit to establish a connection, in clients from [`builder`].
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Time limit of one read (waiting for the answer's head, or for the next
/// piece of its body) in clients from [`builder`]. It resets after every
/// successful read, so a long download that keeps moving is not cut.
pub const READ_TIMEOUT: Duration = Duration::from_secs(60);

/// The TLS roots a client was built with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TlsRoots {
    /// The system trust store.
    System,
    /// None: the system has no CA certificate, so `https://` requests fail
    /// with a certificate error (`http://` ones work).
    Missing,
}

/// A builder with Vivian's defaults: [`CONNECT_TIMEOUT`], [`READ_TIMEOUT`],
/// redirects followed (reqwest's default, up to 10), no total time limit:
/// callers set one per request with [`reqwest::RequestBuilder::timeout`]
/// (or on the builder, for a client of their own).
pub fn builder() -> reqwest::ClientBuilder {
    reqwest::Client::builder()
        .connect_timeout(CONNECT_TIMEOUT)
        .read_timeout(READ_TIMEOUT)
}

/// A client with the defaults of [`builder`], for `purpose` (named in the
/// warning logged when the system has no CA certificate).
pub fn build(purpose: &str) -> Result<(reqwest::Client, TlsRoots), reqwest::Error> {
    build_with(purpose, builder)
}

/// Builds the client that `make` configures (usually starting from
/// [`builder`]). If that fails, it is built again from `make()` without
/// any TLS root: when the system has no CA certificate, the client works
/// for `http://` and reports [`TlsRoots::Missing`], with a warning naming
/// `purpose` logged. An error is returned only if even that build fails
/// (the settings of `make` themselves are refused).
pub fn build_with(
    purpose: &str,
    make: impl Fn() -> reqwest::ClientBuilder,
) -> Result<(reqwest::Client, TlsRoots), reqwest::Error> {
    match make().build() {
        Ok(client) => Ok((client, TlsRoots::System)),
        Err(first) => {
            let client = make().tls_certs_only([]).build()?;
            tracing::warn!(
                error = %first,
                "no TLS root certificates (install ca-certificates): the {purpose} client works over http only, https requests will fail"
            );
            Ok((client, TlsRoots::Missing))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    /// Set in the child process that runs a test with a chosen trust store.
    const CHILD: &str = "VIVIAN_HTTP_CLIENT_TEST_EXPECT";

    /// A self-signed CA certificate (any valid one makes a trust store).
    const CA_PEM: &str = "-----BEGIN CERTIFICATE-----
MIIBlzCCAT2gAwIBAgIUWN6d2sBy4khkmvtCw3L9Cwlgyo0wCgYIKoZIzj0EAwIw
ITEfMB0GA1UEAwwWdml2aWFuIHRlc3QgdHJ1c3Qgcm9vdDAeFw0yNjExMjgwODA1
NTFaFw0zNjExMjUwODA1NTFaMCExHzAdBgNVBAMMFnZpdmlhbiB0ZXN0IHRydXN0
IHJvb3QwWTATBgcqhkjOPQIBBggqhkjOPQMBBwNCAAQbRhsLUViF5dW0NNDrgbPH
810RToUoNO6dAPPLBcqeXfvArmE7GTxE9PQtmHDpPFZk1i4WPQjvN+v5JOc6XEFy
o1MwUTAdBgNVHQ4EFgQUr++6LsKKXbPCbQfZlAh4esZHui0wHwYDVR0jBBgwFoAU
r++6LsKKXbPCbQfZlAh4esZHui0wDwYDVR0TAQH/BAUwAwEB/zAKBggqhkjOPQQD
AgNIADBFAiEA/QZxMxXEyjf6zt9n0wtL8z0jrqBgQG52S+IZJ8EfX7kCIG0raYwH
JlxVkFmeYrbjFe0mq9323UJ4l0pttWErMD8p
-----END CERTIFICATE-----
";

    /// Runs `test` in a child process of this test binary whose trust store
    /// (`SSL_CERT_FILE`, `SSL_CERT_DIR`) holds `certs` (PEM, may be empty);
    /// panics with its output unless it passed.
    fn run_with_trust_store(test: &str, certs: &str, expect: &str) {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("roots.pem");
        std::fs::write(&file, certs).unwrap();
        let empty = dir.path().join("certs");
        std::fs::create_dir(&empty).unwrap();
        let out = Command::new(std::env::current_exe().unwrap())
            .args([test, "--exact", "--nocapture", "--test-threads=1"])
            .env(CHILD, expect)
            .env("SSL_CERT_FILE", &file)
            .env("SSL_CERT_DIR", &empty)
            .output()
            .expect("run the test binary again");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && stdout.contains("1 passed"),
            "{test} with trust store {expect:?} failed:\n{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// In the child: builds with whatever trust store it was given and
    /// checks the outcome. In the parent: runs itself as that child, with
    /// an empty trust store, then with one certificate.
    #[test]
    fn a_client_is_built_with_or_without_system_roots() {
        let name = "http_client::tests::a_client_is_built_with_or_without_system_roots";
        match std::env::var(CHILD).as_deref() {
            Ok("missing") => {
                // What the fallback exists for: reqwest alone refuses.
                assert!(
                    reqwest::Client::builder().build().is_err(),
                    "reqwest built a client from an empty trust store"
                );
                let (_, roots) = build("test").expect("the fallback must build");
                assert_eq!(roots, TlsRoots::Missing);
                let (_, roots) = build_with("test", || builder().user_agent("x")).unwrap();
                assert_eq!(roots, TlsRoots::Missing);
            }
            Ok("system") => {
                let (_, roots) = build("test").expect("build with one root");
                assert_eq!(roots, TlsRoots::System);
            }
            Ok(other) => panic!("unknown {CHILD}={other}"),
            Err(_) => {
                run_with_trust_store(name, "", "missing");
                run_with_trust_store(name, CA_PEM, "system");
            }
        }
    }
}
