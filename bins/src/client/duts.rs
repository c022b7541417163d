//! `executorctl duts` and `executorctl dut info <id>`.

use anyhow::{bail, Context};
use serde_json::Value;

use super::api_url;

/// Formats the reply of `GET /api/v1/duts` (`{"duts": {id: dut}}`, or the
/// V2022 `{"machines": ...}`) as a table: ID, full name, state, IP address,
/// comment.
pub fn format_duts_table(reply: &Value) -> anyhow::Result<String> {
    let duts = reply
        .get("duts")
        .or_else(|| reply.get("machines"))
        .and_then(Value::as_object)
        .context("the executor's reply has no 'duts' object")?;
    let field = |d: &Value, k: &str| match d.get(k) {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(s)) => s.clone(),
        Some(v) => v.to_string(),
    };
    let header = ["ID", "Full name", "State", "IP address", "Comment"];
    let mut rows: Vec<[String; 5]> = Vec::new();
    for (id, d) in duts {
        rows.push([
            id.clone(),
            field(d, "full_name"),
            field(d, "state"),
            field(d, "ip_address"),
            field(d, "comment").replace('\n', " "),
        ]);
    }
    let mut widths = header.map(|h| h.chars().count());
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: &[String]| {
        let mut s = String::new();
        for (i, (c, w)) in cells.iter().zip(widths).enumerate() {
            if i + 1 == cells.len() {
                s.push_str(c);
            } else {
                s.push_str(&format!("{c:<w$}  "));
            }
        }
        s.trim_end().to_string() + "\n"
    };
    let mut out = line(&header.map(String::from));
    out.push_str(&line(&widths.map(|w| "-".repeat(w))));
    for r in &rows {
        out.push_str(&line(r));
    }
    if rows.is_empty() {
        out.push_str("(no DUTs)\n");
    }
    Ok(out)
}

async fn get(url: &str) -> anyhow::Result<(reqwest::StatusCode, Vec<u8>)> {
    // Without CA certificates on the machine, still a client for http://.
    let (client, _) = vivian_core::http_client::build_with("executorctl", || {
        vivian_core::http_client::builder().timeout(std::time::Duration::from_secs(30))
    })?;
    let resp = client.get(url).send().await.map_err(|e| {
        anyhow::anyhow!(
            "cannot reach the executor at {url}: {}",
            super::submit::error_chain(&e)
        )
    })?;
    let status = resp.status();
    Ok((status, resp.bytes().await?.to_vec()))
}

/// The DUT table of the executor at `base`.
pub async fn list(base: &str) -> anyhow::Result<String> {
    let url = api_url(base, "/api/v1/duts");
    let (status, body) = get(&url).await?;
    if !status.is_success() {
        bail!(
            "the executor answered HTTP {status}: {}",
            vivian_core::protocol::submission_error_message(&body)
        );
    }
    let reply: Value = serde_json::from_slice(&body).context("the executor's reply is not JSON")?;
    format_duts_table(&reply)
}

/// Everything about one DUT, as pretty JSON; `Ok(None)` when the executor
/// does not know it.
pub async fn info(base: &str, id: &str) -> anyhow::Result<Option<String>> {
    let mut url =
        reqwest::Url::parse(base).with_context(|| format!("invalid executor URL '{base}'"))?;
    url.path_segments_mut()
        .map_err(|_| anyhow::anyhow!("invalid executor URL '{base}'"))?
        .pop_if_empty()
        .extend(["api", "v1", "dut", id]);
    let url = url.to_string();
    let (status, body) = get(&url).await?;
    if status.as_u16() == 400 || status.as_u16() == 404 {
        return Ok(None);
    }
    if !status.is_success() {
        bail!(
            "the executor answered HTTP {status}: {}",
            vivian_core::protocol::submission_error_message(&body)
        );
    }
    let v: Value = serde_json::from_slice(&body).context("the executor's reply is not JSON")?;
    Ok(Some(serde_json::to_string_pretty(&v)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table() {
        let reply = serde_json::json!({"duts": {
            "52:54:00:11:22:0a": {"full_name": "farm-gfx10-1", "state": "IDLE", "ip_address": "10.42.0.10", "comment": null},
            "52:54:00:11:22:0b": {"full_name": "farm-gfx10-2", "state": "RUNNING", "ip_address": null, "comment": "flaky\nfan"}
        }});
        let t = format_duts_table(&reply).unwrap();
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(
            lines[0],
            "ID                 Full name     State    IP address  Comment"
        );
        assert!(lines[1].starts_with("-----------------  ---------"));
        assert_eq!(
            lines[2],
            "52:54:00:11:22:0a  farm-gfx10-1  IDLE     10.42.0.10"
        );
        assert_eq!(
            lines[3],
            "52:54:00:11:22:0b  farm-gfx10-2  RUNNING              flaky fan"
        );
        assert!(format_duts_table(&serde_json::json!({})).is_err());
        assert!(format_duts_table(&serde_json::json!({"duts": {}}))
            .unwrap()
            .contains("(no DUTs)"));
    }
}
