//! Offline mode, and giving up quickly where there is no network.
//!
//! `--offline`, `TOKENTOP_OFFLINE=1` or Hugging Face's own `HF_HUB_OFFLINE=1` promise that
//! tokentop opens no network connection: every source that needs the network asks
//! `before_*_download` first and is skipped with one line. Without the promise the same
//! checks make a machine without a network fail at once instead of after retries and long
//! timeouts: a route lookup (which sends nothing) tells "no network at all" apart, and the
//! Hugging Face host gets one connection attempt of a few seconds before the download
//! (catalog/hf.rs, which waits 10 s to connect and 60 s for each read) starts.

use std::net::{SocketAddr, TcpStream, ToSocketAddrs, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

static FORCED: AtomicBool = AtomicBool::new(false);

/// How long the one quick connection attempt may take, name lookup included.
pub const QUICK: Duration = Duration::from_secs(5);

/// pip's network options: one retry (a transient error on a long download is survived), a
/// 10 s socket timeout instead of pip's 15 s (or a configured 180 s) per attempt. With no
/// network pip then fails in about a second instead of eight.
pub const PIP_ARGS: [&str; 4] = ["--retries", "1", "--timeout", "10"];

/// Offline from now on, whatever the environment says (`--offline`).
pub fn force() {
    FORCED.store(true, Ordering::SeqCst);
}

/// Whether tokentop must not touch the network.
pub fn is_offline() -> bool {
    FORCED.load(Ordering::SeqCst) || env_on("TOKENTOP_OFFLINE") || env_on("HF_HUB_OFFLINE")
}

/// huggingface_hub's reading of a boolean variable: 1, true, yes or on.
fn env_on(name: &str) -> bool {
    std::env::var(name).is_ok_and(|v| {
        matches!(
            v.trim().to_ascii_lowercase().as_str(),
            "1" | "true" | "yes" | "on"
        )
    })
}

/// A network source that was not tried; its `Display` is the line the user sees.
#[derive(Debug, thiserror::Error)]
#[error("{why}: skipping {what}")]
pub struct Skipped {
    pub what: &'static str,
    pub why: String,
}

/// The error for a catalog model that is not on disk when every source was skipped.
pub fn needs_download(id: &str) -> anyhow::Error {
    let why = if is_offline() {
        "offline"
    } else {
        "no network"
    };
    anyhow::anyhow!("{id} needs download, {why}")
}

/// Called before anything opens a connection for `what`.
fn check(what: &'static str) -> Result<(), Skipped> {
    let skip = |why: &str| {
        Err(Skipped {
            what,
            why: why.to_string(),
        })
    };
    if is_offline() {
        return skip("offline");
    }
    // A proxy may sit on this machine or a local network without a default route.
    if proxy().is_none() && !has_route() {
        return skip("no network");
    }
    Ok(())
}

/// Before Hugging Face downloads: offline, no route, or one quick failed connection skips
/// it (a loopback `HF_ENDPOINT`, a local mirror, needs no route).
pub fn before_hf_download() -> Result<(), Skipped> {
    let what = "Hugging Face download";
    let endpoint =
        std::env::var("HF_ENDPOINT").unwrap_or_else(|_| "https://huggingface.co".to_string());
    let target = proxy().unwrap_or(endpoint);
    let Some((host, port)) = host_port(&target) else {
        check(what)?;
        return Ok(()); // Not understood here: let the download report it.
    };
    // A mirror on this machine needs no route to the internet.
    let loopback = host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    if !loopback || is_offline() {
        check(what)?;
    }
    match connect_quickly(&host, port, QUICK) {
        Ok(()) => Ok(()),
        Err(e) => Err(Skipped {
            what,
            why: format!("{host}:{port} unreachable ({e})"),
        }),
    }
}

/// Before pip downloads: offline or no route skips it. pip's own index settings (pip.conf,
/// PIP_INDEX_URL, find-links) decide where it connects, so the quick failure of a
/// connection is left to pip with `PIP_ARGS`.
pub fn before_pip_download() -> Result<(), Skipped> {
    check("pip download")
}

/// Whether the kernel has a route to the internet, over IPv4 or IPv6. Connecting a UDP
/// socket sends no packet; it only picks a route, and fails at once without one (no
/// interfaces, airplane mode). The addresses are documentation ones (RFC 5737, RFC 3849).
pub fn has_route() -> bool {
    let try_route =
        |bind: &str, to: &str| UdpSocket::bind(bind).and_then(|s| s.connect(to)).is_ok();
    try_route("0.0.0.0:0", "192.0.2.1:443") || try_route("[::]:0", "[2001:db8::1]:443")
}

/// The proxy ureq (the download client) would use, from the same variables in the same order.
fn proxy() -> Option<String> {
    [
        "ALL_PROXY",
        "all_proxy",
        "HTTPS_PROXY",
        "https_proxy",
        "HTTP_PROXY",
        "http_proxy",
    ]
    .iter()
    .find_map(|v| std::env::var(v).ok().filter(|s| !s.trim().is_empty()))
}

/// Host and port of `scheme://user:pass@host:port/path`, every part but the host optional
/// (the forms ureq accepts for a proxy). Written here because `url` rejects the bare
/// `host:port` form that proxies are often given in.
fn host_port(s: &str) -> Option<(String, u16)> {
    let (scheme, rest) = match s.split_once("://") {
        Some((sc, r)) => (sc.to_ascii_lowercase(), r),
        None => ("http".to_string(), s),
    };
    let authority = rest.split(['/', '?', '#']).next()?;
    let hostport = authority.rsplit('@').next()?;
    let default = match scheme.as_str() {
        "https" => 443,
        "http" => {
            if s.contains("://") {
                80
            } else {
                8080
            }
        }
        _ => 1080, // socks
    };
    let (host, port) = if let Some(v6) = hostport.strip_prefix('[') {
        let (h, after) = v6.split_once(']')?;
        let port = after.strip_prefix(':').and_then(|p| p.parse().ok());
        (h.to_string(), port)
    } else {
        match hostport.rsplit_once(':') {
            Some((h, p)) => (h.to_string(), Some(p.parse().ok()?)),
            None => (hostport.to_string(), None),
        }
    };
    (!host.is_empty()).then(|| (host, port.unwrap_or(default)))
}

/// One TCP connection to `host:port`, name lookup included, given up after `limit`. The
/// lookup runs on its own thread because the system resolver has no timeout of its own.
fn connect_quickly(host: &str, port: u16, limit: Duration) -> std::io::Result<()> {
    let start = Instant::now();
    let (tx, rx) = std::sync::mpsc::channel();
    let name = format!("{host}:{port}");
    std::thread::spawn(move || {
        let _ = tx.send(
            name.to_socket_addrs()
                .map(|a| a.collect::<Vec<SocketAddr>>()),
        );
    });
    let timed_out = || std::io::Error::new(std::io::ErrorKind::TimedOut, "timed out");
    let addrs = rx.recv_timeout(limit).map_err(|_| timed_out())??;
    let mut last = std::io::Error::new(std::io::ErrorKind::NotFound, "no address");
    for addr in addrs {
        let left = limit.saturating_sub(start.elapsed());
        if left.is_zero() {
            return Err(timed_out());
        }
        match TcpStream::connect_timeout(&addr, left) {
            Ok(_) => return Ok(()),
            Err(e) => last = e,
        }
    }
    Err(last)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_and_port_of_endpoints_and_proxies() {
        let hp = |s| host_port(s);
        assert_eq!(
            hp("https://huggingface.co"),
            Some(("huggingface.co".into(), 443))
        );
        assert_eq!(
            hp("http://mirror.lan:8000/hf"),
            Some(("mirror.lan".into(), 8000))
        );
        assert_eq!(hp("http://u:p@proxy:3128"), Some(("proxy".into(), 3128)));
        assert_eq!(hp("proxy.corp"), Some(("proxy.corp".into(), 8080)));
        assert_eq!(hp("socks5://[::1]:9050"), Some(("::1".into(), 9050)));
        assert_eq!(hp("http://host:notaport"), None);
    }

    #[test]
    fn a_closed_port_fails_at_once_and_an_open_one_connects() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        assert!(connect_quickly("127.0.0.1", port, QUICK).is_ok());
        drop(listener);
        let t = Instant::now();
        assert!(connect_quickly("127.0.0.1", port, QUICK).is_err());
        assert!(t.elapsed() < QUICK);
    }

    #[test]
    fn skipped_reads_as_one_line() {
        let e = Skipped {
            what: "pip download",
            why: "offline".into(),
        };
        assert_eq!(e.to_string(), "offline: skipping pip download");
    }
}
