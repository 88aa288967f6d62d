//! One HTTP POST (sync `ureq`, run on a blocking thread) and what its answer means for the
//! notification: delivered, try again, or give up. Error texts never carry the URL or a
//! secret, only the host.

use std::time::Duration;

/// A request ready to send.
pub struct Request {
    pub url: String,
    /// Name, value. Values may be secrets.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

/// How one attempt ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// 2xx.
    Delivered { status: u16 },
    /// 5xx, 408, 429, or no answer (connection, timeout): try again, after at least
    /// `retry_after` when the receiver said so.
    Retry { why: String, retry_after: Option<Duration> },
    /// Any other answer (4xx, 3xx): trying again would not help.
    Permanent { why: String },
}

/// The longest `Retry-After` honoured.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);

/// Checks that `url` is an absolute `http(s)` URL with a host. The message never repeats the
/// URL (it may be a secret).
pub fn check_url(url: &str) -> Result<(), String> {
    let uri: ureq::http::Uri = url.parse().map_err(|_| "not a valid URL".to_string())?;
    match uri.scheme_str() {
        Some("http") | Some("https") => {}
        _ => return Err("wants an http:// or https:// URL".into()),
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err("the URL has no host".into());
    }
    Ok(())
}

/// The host of `url`, what logs say instead of the URL.
pub fn host(url: &str) -> String {
    url.parse::<ureq::http::Uri>().ok().and_then(|u| u.host().map(str::to_owned)).unwrap_or_else(|| "?".into())
}

/// An agent for notifications: `timeout` for the whole request, statuses as answers rather
/// than errors, no redirects (a webhook that moved is a configuration to fix).
pub fn agent(timeout: Duration) -> ureq::Agent {
    ureq::Agent::config_builder()
        .timeout_global(Some(timeout))
        .http_status_as_error(false)
        .max_redirects(0)
        .build()
        .into()
}

/// `Retry-After` in seconds (the HTTP-date form is not read: then the usual backoff applies).
pub fn parse_retry_after(v: &str) -> Option<Duration> {
    v.trim().parse::<u64>().ok().map(|s| Duration::from_secs(s).min(MAX_RETRY_AFTER))
}

/// What a status means.
pub fn classify(status: u16, retry_after: Option<Duration>) -> Outcome {
    match status {
        200..=299 => Outcome::Delivered { status },
        408 | 429 | 500..=599 => Outcome::Retry { why: format!("HTTP {status}"), retry_after },
        _ => Outcome::Permanent { why: format!("HTTP {status}") },
    }
}

/// Sends `req` (blocking). `secrets` are scrubbed from any error text, as is the URL.
pub fn send(agent: &ureq::Agent, req: &Request, secrets: &[&str]) -> Outcome {
    let mut b = agent.post(&req.url).header("content-type", "application/json");
    for (k, v) in &req.headers {
        b = b.header(k.as_str(), v.as_str());
    }
    match b.send(&req.body[..]) {
        Ok(resp) => {
            let retry_after =
                resp.headers().get("retry-after").and_then(|v| v.to_str().ok()).and_then(parse_retry_after);
            classify(resp.status().as_u16(), retry_after)
        }
        Err(e) => {
            let why = match &e {
                ureq::Error::Timeout(t) => format!("timed out ({t})"),
                ureq::Error::Io(io) => format!("I/O error: {}", io.kind()),
                ureq::Error::HostNotFound => "host not found".into(),
                ureq::Error::ConnectionFailed => "connection failed".into(),
                other => scrub(&other.to_string(), &req.url, secrets),
            };
            Outcome::Retry { why, retry_after: None }
        }
    }
}

/// `text` with the URL, its path and every secret replaced by `***`.
pub fn scrub(text: &str, url: &str, secrets: &[&str]) -> String {
    let mut out = text.replace(url, "***");
    if let Ok(u) = url.parse::<ureq::http::Uri>() {
        if let Some(pq) = u.path_and_query().map(|p| p.as_str()).filter(|p| p.len() > 1) {
            out = out.replace(pq, "/***");
        }
    }
    for s in secrets.iter().filter(|s| !s.is_empty()) {
        out = out.replace(s, "***");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_are_classified() {
        for s in [200, 201, 204, 299] {
            assert_eq!(classify(s, None), Outcome::Delivered { status: s });
        }
        for s in [408, 429, 500, 502, 503, 599] {
            assert!(matches!(classify(s, None), Outcome::Retry { .. }), "{s}");
        }
        for s in [301, 400, 401, 403, 404, 410, 413, 422] {
            assert!(matches!(classify(s, None), Outcome::Permanent { .. }), "{s}");
        }
        assert_eq!(parse_retry_after(" 7 "), Some(Duration::from_secs(7)));
        assert_eq!(parse_retry_after("999999"), Some(MAX_RETRY_AFTER));
        assert_eq!(parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"), None);
    }

    #[test]
    fn urls_are_checked_and_scrubbed() {
        assert!(check_url("https://hooks.slack.com/services/A/B/C").is_ok());
        assert!(check_url("http://127.0.0.1:8080/x").is_ok());
        for bad in ["", "hooks.slack.com/x", "ftp://h/x", "https:///x", "not a url"] {
            let e = check_url(bad).unwrap_err();
            assert!(bad.is_empty() || !e.contains(bad), "{e}");
        }
        assert_eq!(host("https://hooks.slack.com/services/A/B/C"), "hooks.slack.com");
        let url = "https://hooks.slack.com/services/A/B/C";
        let s =
            scrub("failed to reach https://hooks.slack.com/services/A/B/C and /services/A/B/C with tok", url, &["tok"]);
        assert!(!s.contains("/services/A") && !s.contains("tok"), "{s}");
    }

    #[test]
    fn connection_refused_is_retried_without_the_url() {
        // A port nothing listens on (bound, then closed).
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let url = format!("http://127.0.0.1:{port}/secret-path");
        let req = Request { url: url.clone(), headers: vec![], body: b"{}".to_vec() };
        match send(&agent(Duration::from_secs(2)), &req, &[]) {
            Outcome::Retry { why, retry_after: None } => assert!(!why.contains("secret-path"), "{why}"),
            other => panic!("{other:?}"),
        }
    }
}
