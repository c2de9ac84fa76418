//! Endpoints: `http://HOST:PORT` where HOST is an IPv4 address in 127.0.0.0/8 or
//! `localhost`. The bench never sends traffic anywhere else.

use std::fmt;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::str::FromStr;

/// Why an endpoint string was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EndpointError {
    /// Only plain `http://` is supported.
    #[error("endpoint {0:?}: only http:// URLs are supported")]
    Scheme(String),
    /// The URL has a path, query or user info, which an endpoint must not have.
    #[error("endpoint {0:?}: expected http://HOST:PORT with no path")]
    Shape(String),
    /// The port is missing or not a number in 1..=65535.
    #[error("endpoint {0:?}: missing or invalid port")]
    Port(String),
    /// The host is not a loopback IPv4 address.
    #[error("endpoint {0:?}: host must be in 127.0.0.0/8 or \"localhost\" (the bench only talks to loopback)")]
    NotLoopback(String),
}

/// A validated loopback endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// The socket address to connect to.
    pub addr: SocketAddr,
    /// The value of the `Host` header (`host:port` as given).
    pub authority: String,
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "http://{}", self.authority)
    }
}

impl FromStr for Endpoint {
    type Err = EndpointError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let raw = s.trim();
        let rest = raw
            .strip_prefix("http://")
            .ok_or_else(|| EndpointError::Scheme(raw.to_string()))?;
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        if rest.is_empty() || rest.contains(['/', '?', '#', '@']) {
            return Err(EndpointError::Shape(raw.to_string()));
        }
        let (host, port) = rest
            .rsplit_once(':')
            .ok_or_else(|| EndpointError::Port(raw.to_string()))?;
        let port: u16 = port
            .parse()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| EndpointError::Port(raw.to_string()))?;
        let ip = if host.eq_ignore_ascii_case("localhost") {
            Ipv4Addr::LOCALHOST
        } else {
            host.parse::<Ipv4Addr>()
                .map_err(|_| EndpointError::NotLoopback(raw.to_string()))?
        };
        if !ip.is_loopback() {
            return Err(EndpointError::NotLoopback(raw.to_string()));
        }
        Ok(Endpoint {
            addr: SocketAddr::V4(SocketAddrV4::new(ip, port)),
            authority: rest.to_string(),
        })
    }
}

/// Parses a comma-separated endpoint list; empty entries are refused.
pub fn parse_list(s: &str) -> Result<Vec<Endpoint>, EndpointError> {
    s.split(',').map(str::parse).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_loopback_addresses() {
        let e: Endpoint = "http://127.0.0.1:2379".parse().unwrap();
        assert_eq!(e.addr, "127.0.0.1:2379".parse().unwrap());
        assert_eq!(e.authority, "127.0.0.1:2379");
        let e: Endpoint = "http://127.3.4.5:80/".parse().unwrap();
        assert_eq!(e.addr, "127.3.4.5:80".parse().unwrap());
        let e: Endpoint = "http://localhost:9121".parse().unwrap();
        assert_eq!(e.addr, "127.0.0.1:9121".parse().unwrap());
        assert_eq!(e.to_string(), "http://localhost:9121");
    }

    #[test]
    fn refuses_non_loopback_and_malformed() {
        assert!(matches!(
            "http://10.0.0.1:2379".parse::<Endpoint>(),
            Err(EndpointError::NotLoopback(_))
        ));
        assert!(matches!(
            "http://example.com:2379".parse::<Endpoint>(),
            Err(EndpointError::NotLoopback(_))
        ));
        assert!(matches!(
            "http://[::1]:2379".parse::<Endpoint>(),
            Err(EndpointError::NotLoopback(_))
        ));
        assert!(matches!(
            "https://127.0.0.1:2379".parse::<Endpoint>(),
            Err(EndpointError::Scheme(_))
        ));
        assert!(matches!(
            "http://127.0.0.1".parse::<Endpoint>(),
            Err(EndpointError::Port(_))
        ));
        assert!(matches!(
            "http://127.0.0.1:0".parse::<Endpoint>(),
            Err(EndpointError::Port(_))
        ));
        assert!(matches!(
            "http://127.0.0.1:99999".parse::<Endpoint>(),
            Err(EndpointError::Port(_))
        ));
        assert!(matches!(
            "http://127.0.0.1:80/v1".parse::<Endpoint>(),
            Err(EndpointError::Shape(_))
        ));
        assert!(matches!(
            "http://u@127.0.0.1:80".parse::<Endpoint>(),
            Err(EndpointError::Shape(_))
        ));
    }

    #[test]
    fn parses_lists() {
        let l = parse_list("http://127.0.0.1:1,http://127.0.0.1:2").unwrap();
        assert_eq!(l.len(), 2);
        assert!(parse_list("http://127.0.0.1:1,").is_err());
        assert!(parse_list("http://127.0.0.1:1,http://8.8.8.8:53").is_err());
    }
}
