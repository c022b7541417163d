//! What the tests that start the real binaries share: a child process
//! killed on drop, a free loopback port, a bounded wait for a JSON
//! answer, and a whole farm of the real binaries ([`farm::RealFarm`]).
//! (Each test file compiles this module on its own and uses part of it;
//! the `vivian-tests` package compiles it too, by its path.)

#![allow(dead_code)]

pub mod farm;

use std::process::Child;
use std::time::Duration;

/// Kills the child process (SIGKILL) and reaps it when dropped, so a
/// failing test leaves nothing running.
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A TCP port free on 127.0.0.1 right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Polls `url` (bounded: 30 s) until its JSON satisfies `ok`; panics
/// naming `what` otherwise.
pub async fn wait_for(url: &str, what: &str, ok: impl Fn(&serde_json::Value) -> bool) {
    for _ in 0..300 {
        if let Ok(r) = reqwest::get(url).await {
            if let Ok(v) = r.json::<serde_json::Value>().await {
                if ok(&v) {
                    return;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{what}: {url} never answered as expected");
}
