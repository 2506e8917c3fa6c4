//! Where the dashboard listens and whom it answers: the `--listen` address
//! (loopback unless `--allow-remote`), and the checks on each request's
//! `Host` and `Origin` that keep other web pages from reaching it through
//! the browser (DNS rebinding, cross-site POSTs).
//!
//! Pure functions only; the server applies them.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

/// The default `--listen`.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:7878";

/// Parse `--listen`: `IP:PORT`, `[IPv6]:PORT`, `localhost:PORT`, or a bare
/// `PORT` (on 127.0.0.1). Port 0 picks a free port (printed at start).
pub fn parse_listen(s: &str) -> Result<SocketAddr, String> {
    let s = s.trim();
    if let Ok(port) = s.parse::<u16>() {
        return Ok(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port));
    }
    if let Some(port) = s.strip_prefix("localhost:") {
        let port = port
            .parse::<u16>()
            .map_err(|_| format!("`{s}`: the port must be a number from 0 to 65535"))?;
        return Ok(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port));
    }
    s.parse::<SocketAddr>().map_err(|_| {
        format!("`{s}`: expected IP:PORT (127.0.0.1:7878, [::1]:7878), localhost:PORT or a port")
    })
}

/// Refuse a non-loopback address unless `allow_remote`: the dashboard has
/// no login, so serving it to the network is a decision to say out loud.
pub fn check_listen(addr: SocketAddr, allow_remote: bool) -> Result<(), String> {
    if addr.ip().is_loopback() || allow_remote {
        return Ok(());
    }
    Err(format!(
        "refusing to listen on {addr}: not a loopback address, and the dashboard has no login \
         (anyone who reaches it sees every topic, group and dead letter). Pass --allow-remote \
         to serve it anyway (behind a proxy that authenticates), or listen on 127.0.0.1"
    ))
}

/// Whether a request's `Host` header names this machine's loopback
/// (`localhost`, `127.0.0.1`, `[::1]`, any port). A dashboard listening on
/// the loopback answers only those: a page of another site that rebinds
/// its name to 127.0.0.1 sends its own name and is refused.
pub fn is_loopback_host(host: &str) -> bool {
    let name = match host.strip_prefix('[') {
        Some(rest) => rest.split(']').next().unwrap_or(""),
        None => host.rsplit_once(':').map_or(host, |(name, _)| name),
    };
    name.eq_ignore_ascii_case("localhost")
        || name.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// Whether a state-changing request came from the dashboard's own page: a
/// browser sends `Origin` on a POST, and it must name the host the request
/// went to. No `Origin` (curl, scripts) is allowed: only browsers carry a
/// victim's reach to the loopback.
pub fn same_origin(origin: Option<&str>, host: Option<&str>) -> bool {
    let Some(origin) = origin else {
        return true;
    };
    let Some(host) = host else {
        return false;
    };
    let authority = origin
        .strip_prefix("http://")
        .or_else(|| origin.strip_prefix("https://"));
    authority.is_some_and(|a| a.trim_end_matches('/').eq_ignore_ascii_case(host))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_addresses_parse_in_the_usual_forms() {
        assert_eq!(
            parse_listen(DEFAULT_LISTEN).unwrap(),
            "127.0.0.1:7878".parse().unwrap()
        );
        assert_eq!(
            parse_listen("9000").unwrap(),
            "127.0.0.1:9000".parse().unwrap()
        );
        assert_eq!(
            parse_listen("localhost:0").unwrap(),
            "127.0.0.1:0".parse().unwrap()
        );
        assert_eq!(
            parse_listen("[::1]:80").unwrap(),
            "[::1]:80".parse().unwrap()
        );
        assert!(parse_listen("localhost:http").unwrap_err().contains("port"));
        assert!(parse_listen("example.com:80").is_err());
        assert!(parse_listen("").is_err());
    }

    #[test]
    fn only_loopback_unless_allowed() {
        assert!(check_listen("127.0.0.1:1".parse().unwrap(), false).is_ok());
        assert!(check_listen("127.8.0.1:1".parse().unwrap(), false).is_ok());
        assert!(check_listen("[::1]:1".parse().unwrap(), false).is_ok());
        let refused = check_listen("0.0.0.0:7878".parse().unwrap(), false).unwrap_err();
        assert!(refused.contains("--allow-remote"), "{refused}");
        assert!(check_listen("192.168.1.2:80".parse().unwrap(), false).is_err());
        assert!(check_listen("0.0.0.0:7878".parse().unwrap(), true).is_ok());
    }

    #[test]
    fn host_headers_of_the_loopback_only() {
        for ok in [
            "localhost",
            "localhost:7878",
            "LOCALHOST:1",
            "127.0.0.1:7878",
            "127.0.0.1",
            "[::1]:7878",
            "[::1]",
        ] {
            assert!(is_loopback_host(ok), "{ok}");
        }
        for refused in [
            "evil.example:7878",
            "evil.example",
            "10.0.0.1:7878",
            "localhost.evil.example:80",
            "",
            "[::2]:1",
        ] {
            assert!(!is_loopback_host(refused), "{refused}");
        }
    }

    #[test]
    fn posts_from_another_origin_are_refused() {
        assert!(same_origin(None, Some("127.0.0.1:7878")));
        assert!(same_origin(
            Some("http://127.0.0.1:7878"),
            Some("127.0.0.1:7878")
        ));
        assert!(!same_origin(
            Some("http://evil.example"),
            Some("127.0.0.1:7878")
        ));
        assert!(!same_origin(
            Some("http://127.0.0.1:9999"),
            Some("127.0.0.1:7878")
        ));
        assert!(!same_origin(Some("null"), Some("127.0.0.1:7878")));
        assert!(!same_origin(Some("http://127.0.0.1:7878"), None));
    }
}
