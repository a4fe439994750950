//! Who is calling: the principal of a connection, from its transport.
//!
//! | transport                 | principal                                     |
//! |---------------------------|-----------------------------------------------|
//! | a plugin's callback socket| `plugin:<name>` (the socket is the plugin's)  |
//! | Unix socket               | `unix:uid:<uid>` (SO_PEERCRED; pid, gid kept) |
//! | TLS with a client cert    | its URI SAN as is (`spiffe://…`), else `dns:<first DNS SAN>`, else `cn:<subject CN>` |
//! | TCP, or TLS without cert  | `anonymous`                                   |

use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

/// What the data plane knows about the peer of one connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Peer {
    pub principal: String,
    /// `127.0.0.1:5555`, or `unix:pid=1,uid=2,gid=3` (empty for an unnamed peer).
    pub address: String,
    pub pid: Option<i32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
}

pub const ANONYMOUS: &str = "anonymous";

impl Peer {
    /// A TCP peer (before TLS).
    pub fn tcp(address: std::net::SocketAddr) -> Self {
        Peer {
            principal: ANONYMOUS.into(),
            address: address.to_string(),
            pid: None,
            uid: None,
            gid: None,
        }
    }

    /// A Unix socket peer with its kernel-given credentials.
    pub fn unix(pid: Option<i32>, uid: u32, gid: u32) -> Self {
        let address = format!("unix:pid={},uid={uid},gid={gid}", pid.unwrap_or(0));
        Peer {
            principal: format!("unix:uid:{uid}"),
            address,
            pid,
            uid: Some(uid),
            gid: Some(gid),
        }
    }

    /// The principal a callback listener gives every caller: the plugin it belongs to.
    pub fn as_plugin(mut self, plugin: &str) -> Self {
        self.principal = format!("plugin:{plugin}");
        self
    }
}

/// The principal a client certificate (DER) names; `None` when it names nothing usable.
pub fn certificate_principal(der: &[u8]) -> Option<String> {
    let (_, cert) = X509Certificate::from_der(der).ok()?;
    let mut dns = None;
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            match name {
                GeneralName::URI(uri) => return Some((*uri).to_string()),
                GeneralName::DNSName(name) if dns.is_none() => dns = Some(format!("dns:{name}")),
                _ => {}
            }
        }
    }
    if dns.is_some() {
        return dns;
    }
    let cn = cert.subject().iter_common_name().next()?.as_str().ok()?;
    Some(format!("cn:{cn}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair, SanType};

    fn cert(sans: Vec<SanType>, cn: Option<&str>) -> Vec<u8> {
        let mut params = CertificateParams::default();
        params.subject_alt_names = sans;
        let mut dn = DistinguishedName::new();
        if let Some(cn) = cn {
            dn.push(DnType::CommonName, cn);
        }
        params.distinguished_name = dn;
        let key = KeyPair::generate().unwrap();
        params.self_signed(&key).unwrap().der().to_vec()
    }

    #[test]
    fn uri_san_wins_then_dns_then_cn() {
        let spiffe = "spiffe://example.org/ns/x".to_string();
        let both = cert(
            vec![
                SanType::DnsName("a.example".try_into().unwrap()),
                SanType::URI(spiffe.clone().try_into().unwrap()),
            ],
            Some("agent"),
        );
        assert_eq!(
            certificate_principal(&both).as_deref(),
            Some(spiffe.as_str())
        );
        let dns = cert(
            vec![SanType::DnsName("a.example".try_into().unwrap())],
            Some("agent"),
        );
        assert_eq!(
            certificate_principal(&dns).as_deref(),
            Some("dns:a.example")
        );
        let cn = cert(vec![], Some("agent-7"));
        assert_eq!(certificate_principal(&cn).as_deref(), Some("cn:agent-7"));
        assert_eq!(certificate_principal(&cert(vec![], None)), None);
        assert_eq!(certificate_principal(b"not a certificate"), None);
    }

    #[test]
    fn unix_and_plugin_principals() {
        let peer = Peer::unix(Some(42), 1000, 100);
        assert_eq!(peer.principal, "unix:uid:1000");
        assert_eq!(peer.address, "unix:pid=42,uid=1000,gid=100");
        assert_eq!(peer.as_plugin("files").principal, "plugin:files");
        let tcp = Peer::tcp("127.0.0.1:9".parse().unwrap());
        assert_eq!(
            (tcp.principal.as_str(), tcp.address.as_str()),
            (ANONYMOUS, "127.0.0.1:9")
        );
    }
}
