//! Submitting a job: `POST /api/v1/jobs` as `multipart/form-data` (EX C.1)
//! with a callback listener opened first (EX C.2).

use std::io::Write;
use std::time::Duration;

use anyhow::{bail, Context};
use bytes::Bytes;
use reqwest::multipart::{Form, Part};
use reqwest::StatusCode;
use tokio::net::{TcpListener, TcpStream};
use vivian_core::protocol::{
    submission_error_message, MinioCredentials, SubmissionMetadata, TargetOverride, MIME_JOB,
    MIME_METADATA, MIME_TARBALL, PART_JOB, PART_METADATA, PART_TARBALL,
};

use super::{api_url, share, JobStatus, RunOptions};

/// How many more times a 420 ("Invalid tarball file") is retried.
pub const TARBALL_RETRIES: u32 = 4;

/// A submission ready to send (everything but the callback port).
#[derive(Debug, Clone)]
pub struct Prepared {
    /// The metadata; its callback port is set when the listener is open.
    pub metadata: SubmissionMetadata,
    /// The raw job text.
    pub job: String,
    /// The share directory as a tar archive.
    pub tarball: Option<Bytes>,
}

/// Parses `-a access:secret`.
pub fn parse_minio_auth(text: &str) -> anyhow::Result<MinioCredentials> {
    let fields: Vec<&str> = text.split(':').collect();
    match fields.as_slice() {
        [access, secret] => Ok(MinioCredentials {
            access_key: access.to_string(),
            secret_key: secret.to_string(),
        }),
        _ => bail!(
            "Incorrect format for the --minio-auth parameter. Format: <Access Key>:<Secret Key>"
        ),
    }
}

/// Reads the job, validates the options and packs the share directory.
pub fn prepare(opts: &RunOptions) -> anyhow::Result<Prepared> {
    let job = std::fs::read_to_string(&opts.job_path)
        .with_context(|| format!("cannot read the job file '{}'", opts.job_path.display()))?;
    let mut metadata = SubmissionMetadata::new(0);
    metadata.job_id = opts.job_id.clone();
    metadata.callback.host = opts.callback_host.clone();
    if opts.machine_id.is_some() || !opts.machine_tags.is_empty() {
        metadata.target = Some(TargetOverride {
            id: opts.machine_id.clone(),
            tags: (!opts.machine_tags.is_empty()).then(|| opts.machine_tags.clone()),
        });
    }
    if let Some(auth) = &opts.minio_auth {
        metadata.minio.credentials = Some(parse_minio_auth(auth)?);
    }
    metadata.minio.groups = opts.minio_groups.clone();
    let tarball = match &opts.share_directory {
        None => None,
        Some(dir) => {
            share::prepare_dir(dir).map_err(anyhow::Error::msg)?;
            println!("Packing up the share directory '{}'", dir.display());
            let data =
                share::pack(dir).with_context(|| format!("cannot pack '{}'", dir.display()))?;
            println!("--> Wrote {} bytes into the tar archive", data.len());
            println!(
                "NOTE: the share directory is sent as the job bucket's initial state; the job bucket is mirrored back into it at the end of the job."
            );
            Some(Bytes::from(data))
        }
    };
    Ok(Prepared {
        metadata,
        job,
        tarball,
    })
}

/// A submission the executor accepted: the listener it will connect to.
#[derive(Debug)]
pub struct Accepted {
    listener: TcpListener,
}

impl Accepted {
    /// The local port the executor connects to.
    pub fn port(&self) -> u16 {
        self.listener.local_addr().map(|a| a.port()).unwrap_or(0)
    }

    /// Waits for the executor's connection.
    pub async fn wait_for_callback(self, timeout: Duration) -> Result<TcpStream, String> {
        println!(
            "Waiting for the executor to connect to our local port {}",
            self.port()
        );
        let start = std::time::Instant::now();
        match tokio::time::timeout(timeout, self.listener.accept()).await {
            Ok(Ok((stream, _))) => {
                println!(
                    "Connection established after {:.3} s: switch to proxy mode",
                    start.elapsed().as_secs_f64()
                );
                let _ = stream.set_nodelay(true);
                Ok(stream)
            }
            Ok(Err(e)) => Err(format!("accepting the executor's connection failed: {e}")),
            Err(_) => Err(format!(
                "The server failed to initiate a connection within {} s",
                timeout.as_secs_f64()
            )),
        }
    }
}

/// The callback listener on an ephemeral port: dual-stack (IPv6 with
/// IPv4-mapped addresses) when the host has IPv6, since the executor
/// connects to the address our request came from; else IPv4 only, like the
/// reference client.
fn callback_listener() -> std::io::Result<TcpListener> {
    use socket2::{Domain, Socket, Type};
    let dual = (|| {
        let s = Socket::new(Domain::IPV6, Type::STREAM, None)?;
        s.set_only_v6(false)?;
        s.bind(&std::net::SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, 0)).into())?;
        Ok::<_, std::io::Error>(s)
    })();
    let socket = match dual {
        Ok(s) => s,
        Err(_) => {
            let s = Socket::new(Domain::IPV4, Type::STREAM, None)?;
            s.bind(&std::net::SocketAddr::from((std::net::Ipv4Addr::UNSPECIFIED, 0)).into())?;
            s
        }
    };
    socket.listen(8)?;
    socket.set_nonblocking(true)?;
    TcpListener::from_std(socket.into())
}

fn form(p: &Prepared) -> anyhow::Result<Form> {
    let meta = serde_json::to_vec(&p.metadata)?;
    let mut form = Form::new()
        .part(
            PART_METADATA,
            Part::bytes(meta)
                .file_name(PART_METADATA)
                .mime_str(MIME_METADATA)?,
        )
        .part(
            PART_JOB,
            Part::bytes(p.job.clone().into_bytes())
                .file_name(PART_JOB)
                .mime_str(MIME_JOB)?,
        );
    if let Some(t) = &p.tarball {
        form = form.part(
            PART_TARBALL,
            Part::stream(t.clone())
                .file_name(PART_TARBALL)
                .mime_str(MIME_TARBALL)?,
        );
    }
    Ok(form)
}

/// Opens the callback listener and posts the job, retrying on 409 with
/// `--wait` and on 420 a few times. Errors are printed; the status says how
/// the client must exit.
pub async fn submit(opts: &RunOptions, mut prepared: Prepared) -> Result<Accepted, JobStatus> {
    let listener = callback_listener();
    let listener = match listener {
        Ok(l) => l,
        Err(e) => {
            eprintln!("ERROR: cannot open a local port for the executor to connect back to: {e}");
            return Err(JobStatus::SetupFail);
        }
    };
    prepared.metadata.callback.port = listener.local_addr().map(|a| a.port()).unwrap_or(0);
    let url = api_url(&opts.executor_url, "/api/v1/jobs");
    // Without CA certificates on the machine, still a client for http://.
    let client = match vivian_core::http_client::build_with("executorctl", || {
        reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .timeout(Duration::from_secs(120))
    }) {
        Ok((c, _)) => c,
        Err(e) => {
            eprintln!("ERROR: cannot create an HTTP client: {e}");
            return Err(JobStatus::SetupFail);
        }
    };
    let mut waiting = false;
    let mut tarball_retries = 0;
    loop {
        let body = match form(&prepared) {
            Ok(f) => f,
            Err(e) => {
                eprintln!("ERROR: cannot build the submission: {e:#}");
                return Err(JobStatus::SetupFail);
            }
        };
        let resp = match client.post(&url).multipart(body).send().await {
            Ok(r) => r,
            Err(e) => {
                if waiting {
                    println!();
                }
                eprintln!(
                    "ERROR: Failed to connect to the executor at {}: {}. Is it running?",
                    opts.executor_url,
                    error_chain(&e)
                );
                return Err(JobStatus::SetupFail);
            }
        };
        let status = resp.status();
        if status == StatusCode::CONFLICT && opts.wait {
            if !waiting {
                print!("No machines available for the job, waiting: ");
                waiting = true;
            } else {
                print!(".");
            }
            let _ = std::io::stdout().flush();
            tokio::time::sleep(Duration::from_secs(1)).await;
            continue;
        }
        if waiting {
            println!("\nJob queued, the wait is over!");
            waiting = false;
        }
        if status.as_u16() == 420 && tarball_retries < TARBALL_RETRIES {
            tarball_retries += 1;
            tokio::time::sleep(Duration::from_secs(1)).await;
            continue;
        }
        let body = resp.bytes().await.unwrap_or_default();
        if status == StatusCode::OK {
            return Ok(Accepted { listener });
        }
        let reason = submission_error_message(&body);
        let reason: String = reason.lines().map(|l| format!("    {l}\n")).collect();
        eprintln!("\nERROR: Could not queue the job (HTTP {status}). Reason:\n\n{reason}");
        return Err(JobStatus::SetupFail);
    }
}

/// An error with its sources, on one line.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
