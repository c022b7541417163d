//! The U-Boot path (IN B.7): what the TFTP server answers for the dynamic
//! names of [`UbootPath`].
//!
//! The DHCP server gives a U-Boot client (option 93 = 0x15/0x16) the boot
//! file `/dyn/bootloader/u-boot/<ARCH>/<mac>/boot.scr`. On request, the TFTP
//! server renders that machine's boot configuration (its running job's
//! deployment, else the `BOOTS_DEFAULT_*` defaults with bootloader `uboot`
//! and platform `uboot`) as a U-Boot script image. The script downloads
//! `kernel` and `initrd` from the same directory; those names resolve to
//! the URLs of the same boot configuration: an `http://`/`https://` URL is
//! fetched through the [`ArtifactFetcher`] (plain HTTP by default, an
//! artifact cache when one is installed), anything else is a file of the
//! TFTP root. A machine can thus only ever download what it is configured
//! to boot: the TFTP server is not a general HTTP proxy.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock, RwLock};

use async_trait::async_trait;
use tokio::io::AsyncWriteExt;
use tracing::{debug, warn};
use vivian_core::marsdb::MacAddr;
use vivian_core::netboot::{
    ArtifactError, ArtifactFetcher, BootRequest, DutLookup, Netboot, UbootFile, UbootPath,
};

use crate::tftp::{open_in_root, DynamicFiles, TftpContent};

/// Serves the U-Boot names of the TFTP server. The boot configuration
/// source is set once the executor has one ([`UbootFiles::set_netboot`]);
/// until then the names are refused with a clear log line.
pub struct UbootFiles {
    netboot: RwLock<Option<Arc<dyn Netboot>>>,
    fetcher: RwLock<Arc<dyn ArtifactFetcher>>,
    duts: Arc<dyn DutLookup>,
    root: PathBuf,
}

impl UbootFiles {
    /// Files for the DUTs of `duts`; artifacts given as paths are looked up
    /// in `root` (the TFTP root, canonicalized by the caller or here).
    pub fn new(duts: Arc<dyn DutLookup>, root: PathBuf) -> Self {
        let root = root.canonicalize().unwrap_or(root);
        UbootFiles {
            netboot: RwLock::new(None),
            fetcher: RwLock::new(Arc::new(HttpFetcher::default())),
            duts,
            root,
        }
    }

    /// Sets what decides a machine's boot configuration.
    pub fn set_netboot(&self, netboot: Arc<dyn Netboot>) {
        *self.netboot.write().unwrap_or_else(|e| e.into_inner()) = Some(netboot);
    }

    /// Replaces the plain HTTP download of artifacts (by a cache, say).
    pub fn set_fetcher(&self, fetcher: Arc<dyn ArtifactFetcher>) {
        *self.fetcher.write().unwrap_or_else(|e| e.into_inner()) = fetcher;
    }

    async fn content(&self, path: &UbootPath) -> Result<TftpContent, String> {
        let netboot = self
            .netboot
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .ok_or("no boot configuration source is set up for U-Boot clients")?;
        // The path names the machine by MAC (what the DHCP server saw).
        let dut_id = path
            .machine_id
            .parse::<MacAddr>()
            .ok()
            .and_then(|m| self.duts.by_mac(m))
            .map(|d| d.id);
        let dut_id = dut_id.as_deref();
        if path.file == UbootFile::Script {
            let image = netboot
                .uboot_script(dut_id, &path.machine_id, path.arch)
                .await
                .map_err(|e| e.to_string())?;
            return Ok(TftpContent::Memory(image));
        }
        let config = netboot
            .boot_config(dut_id, &BootRequest::uboot(path.arch))
            .await
            .map_err(|e| e.to_string())?;
        let location = match path.file {
            UbootFile::Kernel => config.kernel,
            _ => config.initrd,
        };
        if is_http_url(&location) {
            let fetcher = self
                .fetcher
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .clone();
            let file = fetcher.fetch(&location).await.map_err(|e| e.to_string())?;
            TftpContent::from_file(file)
        } else {
            let name = location
                .strip_prefix("tftp://")
                .map_or(location.as_str(), |rest| {
                    rest.split_once('/').map_or("", |(_host, p)| p)
                });
            open_in_root(&self.root, name)
                .map(|(f, n)| TftpContent::File(f, n))
                .map_err(|e| format!("{location} in the TFTP root: {e}"))
        }
    }
}

fn is_http_url(s: &str) -> bool {
    let lower = s.get(..8).unwrap_or(s).to_ascii_lowercase();
    lower.starts_with("http://") || lower.starts_with("https://")
}

#[async_trait]
impl DynamicFiles for UbootFiles {
    async fn open(&self, name: &str, client: SocketAddr) -> Option<Result<TftpContent, String>> {
        let path = UbootPath::parse(name)?;
        let result = self.content(&path).await;
        match &result {
            Ok(c) => debug!(%client, file = name, bytes = c.len(), "U-Boot file ready"),
            Err(e) => warn!(%client, file = name, "U-Boot file refused: {e}"),
        }
        Some(result)
    }
}

/// Downloads artifacts over HTTP into an unnamed temporary file (nothing is
/// left on disk when the transfer ends).
///
/// [`HttpFetcher::default`] builds its HTTP client on the first download
/// ([`vivian_core::http_client::build`]: 10 s to connect, 60 s per read,
/// redirects followed), so a fetcher that is replaced before any download
/// (by an artifact cache, or by one sharing the process' client) costs no
/// trust-store parsing. Clones share the client.
#[derive(Debug, Clone, Default)]
pub struct HttpFetcher {
    client: Arc<OnceLock<Result<reqwest::Client, String>>>,
}

impl HttpFetcher {
    /// A fetcher downloading with `client` (a clone of a client shared with
    /// the rest of the process, say). Its timeouts apply as they are: give
    /// it a connect and a per-read timeout rather than a total one, which
    /// would cut large downloads (the clients of
    /// [`vivian_core::http_client::builder`] have those), and let it follow
    /// redirects (artifact URLs often redirect to a storage service).
    pub fn with_client(client: reqwest::Client) -> Self {
        HttpFetcher {
            client: Arc::new(OnceLock::from(Ok(client))),
        }
    }

    fn client(&self) -> Result<&reqwest::Client, String> {
        self.client
            .get_or_init(|| {
                vivian_core::http_client::build("U-Boot artifact download")
                    .map(|(client, _roots)| client)
                    .map_err(|e| format!("cannot set up an HTTP client: {e}"))
            })
            .as_ref()
            .map_err(Clone::clone)
    }
}

#[async_trait]
impl ArtifactFetcher for HttpFetcher {
    async fn fetch(&self, url: &str) -> Result<std::fs::File, ArtifactError> {
        let err = |reason: String| ArtifactError {
            url: url.to_string(),
            reason,
        };
        let mut resp = self
            .client()
            .map_err(err)?
            .get(url)
            .send()
            .await
            .map_err(|e| err(e.to_string()))?;
        if !resp.status().is_success() {
            return Err(err(format!("HTTP status {}", resp.status())));
        }
        let file = tempfile::tempfile().map_err(|e| err(format!("temporary file: {e}")))?;
        let mut out = tokio::fs::File::from_std(file);
        let mut total = 0u64;
        while let Some(chunk) = resp.chunk().await.map_err(|e| err(e.to_string()))? {
            total += chunk.len() as u64;
            out.write_all(&chunk)
                .await
                .map_err(|e| err(format!("temporary file: {e}")))?;
        }
        out.flush()
            .await
            .map_err(|e| err(format!("temporary file: {e}")))?;
        debug!(url, bytes = total, "artifact downloaded");
        Ok(out.into_std().await)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader, Read, Seek, Write};
    use std::net::TcpListener;

    /// A one-thread HTTP server answering `connections` requests, one per
    /// connection: `/a` redirects to `/b`, `/b` is `body`, anything else
    /// is a 404.
    fn serve(body: &'static [u8], connections: usize) -> String {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        std::thread::spawn(move || {
            for _ in 0..connections {
                let Ok((stream, _)) = listener.accept() else {
                    return;
                };
                let mut reader = BufReader::new(stream);
                let mut request = String::new();
                let _ = reader.read_line(&mut request);
                let mut line = String::new();
                while reader.read_line(&mut line).map(|n| n > 2).unwrap_or(false) {
                    line.clear();
                }
                let mut stream = reader.into_inner();
                let head = match request.split(' ').nth(1) {
                    Some("/a") => "302 Found\r\nLocation: /b\r\nContent-Length: 0".to_string(),
                    Some("/b") => format!("200 OK\r\nContent-Length: {}", body.len()),
                    _ => "404 Not Found\r\nContent-Length: 0".to_string(),
                };
                let _ = write!(stream, "HTTP/1.1 {head}\r\nConnection: close\r\n\r\n");
                if request.contains(" /b ") {
                    let _ = stream.write_all(body);
                }
            }
        });
        url
    }

    fn read_all(mut file: std::fs::File) -> Vec<u8> {
        file.rewind().unwrap();
        let mut data = Vec::new();
        file.read_to_end(&mut data).unwrap();
        data
    }

    #[tokio::test]
    async fn the_default_fetcher_builds_its_client_on_first_use_and_follows_redirects() {
        let url = serve(b"kernel bytes", 3);
        let fetcher = HttpFetcher::default();
        assert!(fetcher.client.get().is_none(), "built before any download");
        let file = fetcher.fetch(&format!("{url}/a")).await.unwrap();
        assert_eq!(read_all(file), b"kernel bytes");
        let err = fetcher.fetch(&format!("{url}/missing")).await.unwrap_err();
        assert!(err.reason.contains("404"), "{err:?}");
    }

    #[tokio::test]
    async fn a_fetcher_downloads_with_the_client_it_is_given() {
        let url = serve(b"initrd bytes", 1);
        // A client that follows no redirect: the fetcher uses it as is.
        let (client, _) = vivian_core::http_client::build_with("test", || {
            vivian_core::http_client::builder().redirect(reqwest::redirect::Policy::none())
        })
        .unwrap();
        let fetcher = HttpFetcher::with_client(client);
        let err = fetcher.fetch(&format!("{url}/a")).await.unwrap_err();
        assert!(err.reason.contains("302"), "{err:?}");
    }
}
