//! The SSRF policy for webhook endpoint URLs.
//!
//! What it owns: the pure decision whether a webhook URL, or an IP address a
//! host name resolved to, is an acceptable delivery target. Webhook URLs must
//! be publicly reachable HTTPS endpoints: https only, no user name or
//! password, no port 0, no `localhost`/`*.localhost` or single-label names,
//! and no IP literal outside the public unicast address space.
//! [`WebhookUrl::parse`] applies it at create/update time; connection-time
//! code calls [`check_ip`] on every address a host name resolves to (a public
//! looking name may resolve somewhere private, and that is only knowable then).
//!
//! What it must not do: any I/O. No DNS lookups, no sockets, no reading of
//! environment variables: the dev/test allow-list
//! (`VIGNETIM_ALLOW_PRIVATE_CIDRS`) is read by the caller and handed in as a
//! string to [`AllowList::parse`].
//!
//! Hosts are always judged on what `url::Url::parse` made of them, never on
//! the input text. The WHATWG host parser turns `2130706433`, `0x7f.1`,
//! `0177.0.0.1`, `127.1`, `127.0.0.1.`, fullwidth `１２７.０.０.１` and
//! percent-encoded `%31%32%37.0.0.1` all into `Host::Ipv4(127.0.0.1)`, and
//! lower-cases and IDNA-maps names (`LOCALHOST`, `ⓛocalhost` become
//! `localhost`), so any check on the raw text would be bypassable.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use url::{Host, Url};

/// Longest URL accepted, in bytes (both as given and after normalisation).
const MAX_URL_LEN: usize = 2048;

/// CIDRs allowed despite the policy (development and tests only).
///
/// Only affects IP addresses (through [`check_ip`]); it never relaxes the
/// https, userinfo, port 0, `localhost` or single-label-name rules.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AllowList {
    nets: Vec<IpNet>,
}

impl AllowList {
    /// An allow-list of exactly these networks.
    pub fn new(nets: Vec<IpNet>) -> Self {
        Self { nets }
    }

    /// Comma-separated CIDRs (whitespace tolerated, empty string = empty
    /// list); a bare address means /32 or /128. Host bits are cleared
    /// (`127.0.0.1/8` is stored as `127.0.0.0/8`).
    ///
    /// Err(message) naming the bad entry.
    pub fn parse(s: &str) -> Result<Self, String> {
        let mut nets = Vec::new();
        for entry in s.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            let net = match entry.parse::<IpNet>() {
                Ok(net) => net.trunc(),
                Err(_) => match entry.parse::<IpAddr>() {
                    Ok(ip) => IpNet::from(ip),
                    Err(_) => {
                        return Err(format!(
                            "allow-list entry \"{entry}\" is neither a CIDR (such as 127.0.0.0/8 or fd00::/8) nor an IP address"
                        ));
                    }
                },
            };
            nets.push(net);
        }
        Ok(Self { nets })
    }

    /// True when nothing is allowed beyond the policy (the production case).
    pub fn is_empty(&self) -> bool {
        self.nets.is_empty()
    }

    /// Whether `ip` lies in one of the networks. The address is canonicalised
    /// first (`::ffff:127.0.0.1` is 127.0.0.1), and a canonical IPv4 address
    /// also matches an entry written in IPv4-mapped IPv6 form.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let canonical = ip.to_canonical();
        let mapped = match canonical {
            IpAddr::V4(v4) => Some(IpAddr::V6(v4.to_ipv6_mapped())),
            IpAddr::V6(_) => None,
        };
        self.nets
            .iter()
            .any(|net| net.contains(&canonical) || mapped.is_some_and(|m| net.contains(&m)))
    }

    /// The networks, as given (host bits cleared when parsed from a string).
    pub fn nets(&self) -> &[IpNet] {
        &self.nets
    }
}

/// Why an address is not public.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockReason {
    /// 0.0.0.0/8: "this network"; connecting to 0.0.0.0 reaches the local host.
    ThisNetwork,
    /// RFC 1918: 10/8, 172.16/12, 192.168/16.
    Private,
    /// 100.64/10, carrier-grade NAT (RFC 6598): internal to an ISP/cloud.
    SharedAddressSpace,
    /// 127/8 and ::1.
    Loopback,
    /// 169.254/16 (incl. cloud metadata 169.254.169.254) and fe80::/10.
    LinkLocal,
    /// 192.0.0/24 and 2001::/23: IETF protocol assignments.
    IetfProtocol,
    /// 192.0.2/24, 198.51.100/24, 203.0.113/24, 2001:db8::/32, 3fff::/20.
    Documentation,
    /// 198.18/15 and 2001:2::/48 (network benchmarking).
    Benchmarking,
    /// 224/4 and ff00::/8.
    Multicast,
    /// 255.255.255.255, the limited broadcast address.
    Broadcast,
    /// 240/4, reserved for future use.
    Reserved,
    /// ::, the unspecified IPv6 address.
    Unspecified,
    /// fc00::/7, unique local (the IPv6 counterpart of RFC 1918).
    UniqueLocal,
    /// 64:ff9b::/96 and 64:ff9b:1::/48: NAT64, which embeds an IPv4 address.
    Nat64,
    /// 2002::/16 and the 192.88.99/24 relay anycast: 6to4, which embeds an IPv4 address.
    SixToFour,
    /// 2001::/32: Teredo tunnelling, which embeds an IPv4 address.
    Teredo,
    /// ::/96: deprecated IPv4-compatible IPv6 addresses.
    Ipv4Compatible,
    /// Any other IPv6 address outside global unicast 2000::/3.
    NotGlobalUnicast,
}

impl fmt::Display for BlockReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Written to follow "URL host X is ...".
        f.write_str(match self {
            Self::ThisNetwork => "a \"this network\" address (0.0.0.0/8)",
            Self::Private => "a private (RFC 1918) address",
            Self::SharedAddressSpace => "a shared (carrier-grade NAT) address",
            Self::Loopback => "a loopback address",
            Self::LinkLocal => "a link-local address (includes cloud metadata)",
            Self::IetfProtocol => "an IETF protocol assignment (special-purpose) address",
            Self::Documentation => "a documentation address",
            Self::Benchmarking => "a benchmarking address",
            Self::Multicast => "a multicast address",
            Self::Broadcast => "the broadcast address",
            Self::Reserved => "a reserved (future use) address",
            Self::Unspecified => "the unspecified address",
            Self::UniqueLocal => "a unique local (private IPv6) address",
            Self::Nat64 => "a NAT64 address (embeds an IPv4 address)",
            Self::SixToFour => "a 6to4 transition address (embeds an IPv4 address)",
            Self::Teredo => "a Teredo tunnelling address",
            Self::Ipv4Compatible => "an IPv4-compatible IPv6 address (deprecated)",
            Self::NotGlobalUnicast => "not a global unicast address",
        })
    }
}

const fn v4(a: u8, b: u8, c: u8, d: u8, prefix: u8) -> Ipv4Net {
    // `new_assert` in a const: a bad prefix is a compile error, not a panic.
    Ipv4Net::new_assert(Ipv4Addr::new(a, b, c, d), prefix)
}

const fn v6(segments: [u16; 8], prefix: u8) -> Ipv6Net {
    let [a, b, c, d, e, f, g, h] = segments;
    Ipv6Net::new_assert(Ipv6Addr::new(a, b, c, d, e, f, g, h), prefix)
}

/// Non-public IPv4 ranges (IANA special-purpose registry, RFC 6890 and
/// successors). Ranges may nest; the longest matching prefix gives the reason.
const V4_BLOCKED: &[(Ipv4Net, BlockReason)] = &[
    (v4(0, 0, 0, 0, 8), BlockReason::ThisNetwork),
    (v4(10, 0, 0, 0, 8), BlockReason::Private),
    (v4(100, 64, 0, 0, 10), BlockReason::SharedAddressSpace),
    (v4(127, 0, 0, 0, 8), BlockReason::Loopback),
    // Includes 169.254.169.254, the metadata service of most clouds.
    (v4(169, 254, 0, 0, 16), BlockReason::LinkLocal),
    (v4(172, 16, 0, 0, 12), BlockReason::Private),
    (v4(192, 0, 0, 0, 24), BlockReason::IetfProtocol),
    (v4(192, 0, 2, 0, 24), BlockReason::Documentation), // TEST-NET-1
    // Deprecated 6to4 relay anycast (RFC 7526): forwards into tunnels.
    (v4(192, 88, 99, 0, 24), BlockReason::SixToFour),
    (v4(192, 168, 0, 0, 16), BlockReason::Private),
    (v4(198, 18, 0, 0, 15), BlockReason::Benchmarking),
    (v4(198, 51, 100, 0, 24), BlockReason::Documentation), // TEST-NET-2
    (v4(203, 0, 113, 0, 24), BlockReason::Documentation),  // TEST-NET-3
    (v4(224, 0, 0, 0, 4), BlockReason::Multicast),
    (v4(240, 0, 0, 0, 4), BlockReason::Reserved),
    // Inside 240/4, but deserves its own message.
    (v4(255, 255, 255, 255, 32), BlockReason::Broadcast),
];

/// Only global unicast IPv6 is ever public.
const V6_GLOBAL_UNICAST: Ipv6Net = v6([0x2000, 0, 0, 0, 0, 0, 0, 0], 3);

/// Named non-public IPv6 ranges, inside and outside 2000::/3. Ranges may
/// nest; the longest matching prefix gives the reason. Anything else outside
/// 2000::/3 is [`BlockReason::NotGlobalUnicast`]. IPv4-mapped ::ffff:0:0/96
/// never gets here: it is canonicalised to IPv4 first.
const V6_BLOCKED: &[(Ipv6Net, BlockReason)] = &[
    // Outside 2000::/3, named because they are well known.
    (v6([0, 0, 0, 0, 0, 0, 0, 0], 128), BlockReason::Unspecified),
    (v6([0, 0, 0, 0, 0, 0, 0, 1], 128), BlockReason::Loopback),
    (
        v6([0, 0, 0, 0, 0, 0, 0, 0], 96),
        BlockReason::Ipv4Compatible,
    ),
    (v6([0x64, 0xff9b, 0, 0, 0, 0, 0, 0], 96), BlockReason::Nat64),
    (v6([0x64, 0xff9b, 1, 0, 0, 0, 0, 0], 48), BlockReason::Nat64),
    (
        v6([0xfc00, 0, 0, 0, 0, 0, 0, 0], 7),
        BlockReason::UniqueLocal,
    ),
    (
        v6([0xfe80, 0, 0, 0, 0, 0, 0, 0], 10),
        BlockReason::LinkLocal,
    ),
    (v6([0xff00, 0, 0, 0, 0, 0, 0, 0], 8), BlockReason::Multicast),
    // Special-purpose blocks carved out of 2000::/3.
    (
        v6([0x2001, 0, 0, 0, 0, 0, 0, 0], 23),
        BlockReason::IetfProtocol,
    ),
    (v6([0x2001, 0, 0, 0, 0, 0, 0, 0], 32), BlockReason::Teredo),
    (
        v6([0x2001, 2, 0, 0, 0, 0, 0, 0], 48),
        BlockReason::Benchmarking,
    ),
    (
        v6([0x2001, 0xdb8, 0, 0, 0, 0, 0, 0], 32),
        BlockReason::Documentation,
    ),
    (
        v6([0x2002, 0, 0, 0, 0, 0, 0, 0], 16),
        BlockReason::SixToFour,
    ),
    (
        v6([0x3fff, 0, 0, 0, 0, 0, 0, 0], 20),
        BlockReason::Documentation,
    ), // RFC 9637
];

/// Why `ip` is not public, or `None` if it is. Ignores any allow-list.
fn classify(ip: IpAddr) -> Option<BlockReason> {
    // ::ffff:a.b.c.d is a.b.c.d on the wire (dual-stack sockets): judge it as IPv4.
    match ip.to_canonical() {
        IpAddr::V4(ip) => V4_BLOCKED
            .iter()
            .filter(|(net, _)| net.contains(&ip))
            .max_by_key(|(net, _)| net.prefix_len())
            .map(|&(_, reason)| reason),
        IpAddr::V6(ip) => V6_BLOCKED
            .iter()
            .filter(|(net, _)| net.contains(&ip))
            .max_by_key(|(net, _)| net.prefix_len())
            .map(|&(_, reason)| reason)
            .or_else(|| {
                (!V6_GLOBAL_UNICAST.contains(&ip)).then_some(BlockReason::NotGlobalUnicast)
            }),
    }
}

/// Ok(()) if `ip` is public or inside the allow-list.
pub fn check_ip(ip: IpAddr, allow: &AllowList) -> Result<(), BlockReason> {
    match classify(ip) {
        None => Ok(()),
        Some(_) if allow.contains(ip) => Ok(()),
        Some(reason) => Err(reason),
    }
}

/// Why a webhook URL was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UrlError {
    /// Not a well-formed webhook URL (API code `invalid_url`).
    #[error("{0}")]
    Invalid(String),
    /// Well-formed but not a safe, publicly reachable target (API code `unsafe_url`).
    #[error("{0}")]
    Unsafe(String),
}

impl UrlError {
    /// The API error code.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Invalid(_) => "invalid_url",
            Self::Unsafe(_) => "unsafe_url",
        }
    }
}

/// A URL that passed the policy. Displays and serialises as the normalised URL string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookUrl(Url);

impl WebhookUrl {
    /// Parses `input` and applies the policy; `allow` only lets IP literals
    /// inside its networks through.
    pub fn parse(input: &str, allow: &AllowList) -> Result<Self, UrlError> {
        // Checked before parsing, so an oversized input is never parsed.
        if input.len() > MAX_URL_LEN {
            return Err(too_long(input.len()));
        }
        let url = Url::parse(input)
            .map_err(|e| UrlError::Invalid(format!("URL is not a valid absolute URL: {e}")))?;
        // Normalisation can grow a URL (punycode, percent-encoding); what is
        // stored and sent is the normalised form.
        if url.as_str().len() > MAX_URL_LEN {
            return Err(too_long(url.as_str().len()));
        }
        if url.fragment().is_some() {
            return Err(UrlError::Invalid(
                "URL must not contain a fragment (the part after '#'); it is never sent to the server"
                    .to_owned(),
            ));
        }
        if url.scheme() != "https" {
            return Err(UrlError::Unsafe(format!(
                "URL must use https, not \"{}\"",
                url.scheme()
            )));
        }
        // The url crate drops an empty userinfo (`https://@host/`, `https://:@host/`),
        // so only a real user name or password is seen here. Never echo them.
        if !url.username().is_empty() || url.password().is_some() {
            return Err(UrlError::Unsafe(
                "URL must not contain a user name or password".to_owned(),
            ));
        }
        if url.port() == Some(0) {
            return Err(UrlError::Unsafe("URL port 0 is not allowed".to_owned()));
        }
        match url.host() {
            None => Err(UrlError::Invalid("URL has no host".to_owned())),
            Some(Host::Domain(name)) => check_host_name(name),
            Some(Host::Ipv4(ip)) => check_ip_host(IpAddr::V4(ip), allow),
            Some(Host::Ipv6(ip)) => check_ip_host(IpAddr::V6(ip), allow),
        }?;
        Ok(Self(url))
    }

    /// The normalised URL.
    pub fn as_str(&self) -> &str {
        self.0.as_str()
    }

    /// The parsed URL.
    pub fn url(&self) -> &Url {
        &self.0
    }

    /// The host as an IP literal, if it is one (connection-time code re-checks
    /// it: HTTP clients skip the resolver for literals). Returned as written
    /// (an IPv4-mapped IPv6 literal stays IPv6); [`check_ip`] canonicalises.
    pub fn ip_literal(&self) -> Option<IpAddr> {
        match self.0.host()? {
            Host::Ipv4(ip) => Some(IpAddr::V4(ip)),
            Host::Ipv6(ip) => Some(IpAddr::V6(ip)),
            Host::Domain(_) => None,
        }
    }
}

impl fmt::Display for WebhookUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

fn too_long(len: usize) -> UrlError {
    UrlError::Invalid(format!(
        "URL is too long: {len} bytes, the maximum is {MAX_URL_LEN}"
    ))
}

/// Name rules. `name` is already lower-cased and IDNA-mapped by the url
/// crate, and is never an IPv4 number (those come back as `Host::Ipv4`, and a
/// name whose last label is numeric but not a valid address fails to parse).
fn check_host_name(name: &str) -> Result<(), UrlError> {
    // One trailing dot is the DNS root: `localhost.` and `intranet.` are the
    // same hosts as without it, and the url crate keeps the dot.
    let bare = name.strip_suffix('.').unwrap_or(name);
    // The url crate accepts `a..b`, `.com`, `.` and `127.0.0.1...` (more than
    // one trailing dot keeps it a name): none is a resolvable host name.
    if bare.split('.').any(str::is_empty) {
        return Err(UrlError::Invalid(format!(
            "URL host \"{name}\" is not a valid host name: it has an empty label"
        )));
    }
    if bare == "localhost" || bare.ends_with(".localhost") {
        return Err(UrlError::Unsafe(format!(
            "URL host \"{name}\" is not allowed; localhost names refer to the webhook server itself"
        )));
    }
    // Single-label names resolve through search domains to internal hosts.
    if !bare.contains('.') {
        return Err(UrlError::Unsafe(format!(
            "URL host \"{name}\" is a single-label name; use a fully qualified public host name"
        )));
    }
    Ok(())
}

fn check_ip_host(ip: IpAddr, allow: &AllowList) -> Result<(), UrlError> {
    check_ip(ip, allow).map_err(|reason| {
        let shown = match ip {
            IpAddr::V4(v4) => v4.to_string(),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(mapped) => format!("[{v6}] (IPv4 {mapped})"),
                None => format!("[{v6}]"),
            },
        };
        UrlError::Unsafe(format!(
            "URL host {shown} is {reason}; webhook URLs must be publicly reachable"
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn allow_none() -> AllowList {
        AllowList::default()
    }

    fn parse(input: &str) -> Result<WebhookUrl, UrlError> {
        WebhookUrl::parse(input, &allow_none())
    }

    /// Expected outcome of a table case.
    enum Want {
        /// Accepted, normalising to this string.
        Ok(&'static str),
        /// `Invalid`, message containing this text.
        Invalid(&'static str),
        /// `Unsafe`, message containing this text.
        Unsafe(&'static str),
    }

    #[test]
    fn table() {
        use Want::*;
        let long_ok = format!("https://example.com/{}", "a".repeat(MAX_URL_LEN - 20));
        let long_bad = format!("https://example.com/{}", "a".repeat(MAX_URL_LEN - 19));
        assert_eq!(long_ok.len(), MAX_URL_LEN);
        // Grows past the limit only when normalised: each space becomes %20.
        let grows = format!("https://example.com/{}", " x".repeat(700));
        assert!(grows.len() <= MAX_URL_LEN);
        let owned: Vec<(String, Want)> = vec![
            (long_ok.clone(), Ok("")),
            (
                long_bad,
                Invalid("URL is too long: 2049 bytes, the maximum is 2048"),
            ),
            (grows, Invalid("URL is too long")),
        ];
        let cases: &[(&str, Want)] = &[
            // Accepted public endpoints.
            (
                "https://yourapp.com/webhooks/vignetim",
                Ok("https://yourapp.com/webhooks/vignetim"),
            ),
            (
                "https://xn--bcher-kva.example/",
                Ok("https://xn--bcher-kva.example/"),
            ),
            (
                "https://bücher.example/",
                Ok("https://xn--bcher-kva.example/"),
            ),
            (
                "HTTPS://YourApp.COM:443/x?y=1",
                Ok("https://yourapp.com/x?y=1"),
            ),
            (
                "https://yourapp.com:8443/hook",
                Ok("https://yourapp.com:8443/hook"),
            ),
            ("https://yourapp.com./hook", Ok("https://yourapp.com./hook")),
            ("https://8.8.8.8/", Ok("https://8.8.8.8/")),
            ("https://1.1.1.1/hook", Ok("https://1.1.1.1/hook")),
            (
                "https://[2606:4700:4700::1111]/",
                Ok("https://[2606:4700:4700::1111]/"),
            ),
            ("https://[::ffff:8.8.8.8]/", Ok("https://[::ffff:808:808]/")),
            ("https://134744072/", Ok("https://8.8.8.8/")),
            (
                "https://2001-db8.example.com/",
                Ok("https://2001-db8.example.com/"),
            ),
            (
                "https://localhost.example.com/",
                Ok("https://localhost.example.com/"),
            ),
            ("https://mylocalhost.com/", Ok("https://mylocalhost.com/")),
            // The url crate drops an empty userinfo entirely, so nothing is left to refuse.
            ("https://@yourapp.com/", Ok("https://yourapp.com/")),
            ("https://:@yourapp.com/", Ok("https://yourapp.com/")),
            // Public neighbours just outside blocked ranges.
            ("https://9.255.255.255/", Ok("https://9.255.255.255/")),
            ("https://11.0.0.0/", Ok("https://11.0.0.0/")),
            ("https://172.15.255.255/", Ok("https://172.15.255.255/")),
            ("https://172.32.0.0/", Ok("https://172.32.0.0/")),
            ("https://223.255.255.255/", Ok("https://223.255.255.255/")),
            ("https://[2001:200::1]/", Ok("https://[2001:200::1]/")),
            ("https://[2001:db9::1]/", Ok("https://[2001:db9::1]/")),
            ("https://[2003::1]/", Ok("https://[2003::1]/")),
            ("https://[3fff:1000::1]/", Ok("https://[3fff:1000::1]/")),
            ("https://[3ffe:ffff::1]/", Ok("https://[3ffe:ffff::1]/")),
            // Not a URL, too long, fragment.
            (
                "",
                Invalid("URL is not a valid absolute URL: relative URL without a base"),
            ),
            (
                "/webhooks",
                Invalid("URL is not a valid absolute URL: relative URL without a base"),
            ),
            ("//yourapp.com/x", Invalid("relative URL without a base")),
            (
                "yourapp.com/webhooks",
                Invalid("relative URL without a base"),
            ),
            (
                "https://",
                Invalid("URL is not a valid absolute URL: empty host"),
            ),
            ("https://yourapp.com:99999/", Invalid("invalid port number")),
            ("https://999.1.1.1/", Invalid("invalid IPv4 address")),
            ("https://4294967296/", Invalid("invalid IPv4 address")),
            ("https://[fe80::1%25eth0]/", Invalid("invalid IPv6 address")),
            (
                "https://your app.com/",
                Invalid("URL is not a valid absolute URL"),
            ),
            (
                "https://yourapp.com/x#frag",
                Invalid("must not contain a fragment"),
            ),
            (
                "https://yourapp.com/x#",
                Invalid("must not contain a fragment"),
            ),
            (
                "https://a..b.com/",
                Invalid("URL host \"a..b.com\" is not a valid host name: it has an empty label"),
            ),
            ("https://.com/", Invalid("empty label")),
            ("https://./", Invalid("empty label")),
            ("https://127.0.0.1.../", Invalid("empty label")),
            ("https://localhost../", Invalid("empty label")),
            // Scheme.
            (
                "http://yourapp.com/",
                Unsafe("URL must use https, not \"http\""),
            ),
            ("ftp://yourapp.com/", Unsafe("URL must use https")),
            ("wss://yourapp.com/", Unsafe("URL must use https")),
            ("file:///etc/passwd", Unsafe("URL must use https")),
            ("javascript:alert(1)", Unsafe("URL must use https")),
            ("http://127.0.0.1/", Unsafe("URL must use https")),
            // Userinfo (never echoed).
            (
                "https://user:s3cret@yourapp.com/",
                Unsafe("URL must not contain a user name or password"),
            ),
            ("https://user@yourapp.com/", Unsafe("user name or password")),
            (
                "https://:s3cret@yourapp.com/",
                Unsafe("user name or password"),
            ),
            (
                "https://example.com@127.0.0.1/",
                Unsafe("user name or password"),
            ),
            // Port 0.
            (
                "https://yourapp.com:0/",
                Unsafe("URL port 0 is not allowed"),
            ),
            (
                "https://yourapp.com:00/",
                Unsafe("URL port 0 is not allowed"),
            ),
            // Names.
            (
                "https://localhost/",
                Unsafe("URL host \"localhost\" is not allowed"),
            ),
            (
                "https://LOCALHOST/",
                Unsafe("URL host \"localhost\" is not allowed"),
            ),
            (
                "https://localhost./",
                Unsafe("URL host \"localhost.\" is not allowed"),
            ),
            (
                "https://localhost:8443/",
                Unsafe("\"localhost\" is not allowed"),
            ),
            (
                "https://a.b.localhost/",
                Unsafe("URL host \"a.b.localhost\" is not allowed"),
            ),
            (
                "https://App.LocalHost./",
                Unsafe("URL host \"app.localhost.\" is not allowed"),
            ),
            (
                "https://local%68ost/",
                Unsafe("\"localhost\" is not allowed"),
            ),
            ("https://ⓛocalhost/", Unsafe("\"localhost\" is not allowed")),
            (
                "https://localhost。/",
                Unsafe("\"localhost.\" is not allowed"),
            ),
            (
                "https://intranet/",
                Unsafe(
                    "URL host \"intranet\" is a single-label name; use a fully qualified public host name",
                ),
            ),
            (
                "https://intranet./",
                Unsafe("URL host \"intranet.\" is a single-label name"),
            ),
            ("https://Intranet:8443/x", Unsafe("single-label name")),
            // IPv4 literals, in every spelling the url crate accepts.
            (
                "https://127.0.0.1/",
                Unsafe(
                    "URL host 127.0.0.1 is a loopback address; webhook URLs must be publicly reachable",
                ),
            ),
            (
                "https://2130706433/",
                Unsafe("URL host 127.0.0.1 is a loopback address"),
            ),
            (
                "https://0177.0.0.1/",
                Unsafe("URL host 127.0.0.1 is a loopback address"),
            ),
            (
                "https://017700000001/",
                Unsafe("URL host 127.0.0.1 is a loopback address"),
            ),
            (
                "https://0x7f.1/",
                Unsafe("URL host 127.0.0.1 is a loopback address"),
            ),
            (
                "https://0x7f000001/",
                Unsafe("URL host 127.0.0.1 is a loopback address"),
            ),
            (
                "https://0x7f.0x00.0x00.0x01/",
                Unsafe("URL host 127.0.0.1 is a loopback address"),
            ),
            (
                "https://127.1/",
                Unsafe("URL host 127.0.0.1 is a loopback address"),
            ),
            (
                "https://127.0.1/",
                Unsafe("URL host 127.0.0.1 is a loopback address"),
            ),
            (
                "https://127.0.0.1./",
                Unsafe("URL host 127.0.0.1 is a loopback address"),
            ),
            (
                "https://１２７.０.０.１/",
                Unsafe("URL host 127.0.0.1 is a loopback address"),
            ),
            (
                "https://127。0。0。1/",
                Unsafe("URL host 127.0.0.1 is a loopback address"),
            ),
            (
                "https://%31%32%37.0.0.1/",
                Unsafe("URL host 127.0.0.1 is a loopback address"),
            ),
            (
                "https://%ef%bc%91%ef%bc%92%ef%bc%97.0.0.1/",
                Unsafe("URL host 127.0.0.1 is a loopback address"),
            ),
            (
                "https://127.0.0.1%2e/",
                Unsafe("URL host 127.0.0.1 is a loopback address"),
            ),
            ("https://127.0.0.1:8443/", Unsafe("loopback")),
            (
                "https://0.0.0.0/",
                Unsafe("URL host 0.0.0.0 is a \"this network\" address"),
            ),
            (
                "https://0/",
                Unsafe("URL host 0.0.0.0 is a \"this network\" address"),
            ),
            (
                "https://0x/",
                Unsafe("URL host 0.0.0.0 is a \"this network\" address"),
            ),
            (
                "https://10.1.2.3/",
                Unsafe("URL host 10.1.2.3 is a private (RFC 1918) address"),
            ),
            ("https://172.16.0.1/", Unsafe("private (RFC 1918)")),
            ("https://172.31.255.255/", Unsafe("private (RFC 1918)")),
            ("https://192.168.1.1/", Unsafe("private (RFC 1918)")),
            ("https://100.64.0.1/", Unsafe("shared (carrier-grade NAT)")),
            (
                "https://100.127.255.255/",
                Unsafe("shared (carrier-grade NAT)"),
            ),
            (
                "https://169.254.169.254/latest/meta-data",
                Unsafe(
                    "URL host 169.254.169.254 is a link-local address (includes cloud metadata)",
                ),
            ),
            ("https://192.0.0.8/", Unsafe("IETF protocol assignment")),
            ("https://192.0.2.1/", Unsafe("documentation")),
            ("https://198.51.100.7/", Unsafe("documentation")),
            ("https://203.0.113.9/", Unsafe("documentation")),
            ("https://192.88.99.1/", Unsafe("6to4")),
            ("https://198.18.0.1/", Unsafe("benchmarking")),
            ("https://198.19.255.255/", Unsafe("benchmarking")),
            ("https://224.0.0.1/", Unsafe("multicast")),
            ("https://239.255.255.250/", Unsafe("multicast")),
            ("https://240.0.0.1/", Unsafe("reserved (future use)")),
            ("https://255.255.255.254/", Unsafe("reserved (future use)")),
            (
                "https://255.255.255.255/",
                Unsafe("URL host 255.255.255.255 is the broadcast address"),
            ),
            ("https://4294967295/", Unsafe("the broadcast address")),
            // IPv6 literals.
            (
                "https://[::1]/",
                Unsafe(
                    "URL host [::1] is a loopback address; webhook URLs must be publicly reachable",
                ),
            ),
            (
                "https://[0000:0000:0000:0000:0000:0000:0000:0001]/",
                Unsafe("URL host [::1] is a loopback address"),
            ),
            (
                "https://[::]/",
                Unsafe("URL host [::] is the unspecified address"),
            ),
            (
                "https://[::ffff:127.0.0.1]/",
                Unsafe("URL host [::ffff:127.0.0.1] (IPv4 127.0.0.1) is a loopback address"),
            ),
            (
                "https://[::ffff:7f00:1]/",
                Unsafe("(IPv4 127.0.0.1) is a loopback address"),
            ),
            (
                "https://[0:0:0:0:0:FFFF:7F00:0001]/",
                Unsafe("(IPv4 127.0.0.1) is a loopback address"),
            ),
            (
                "https://[::ffff:169.254.169.254]/",
                Unsafe("link-local address (includes cloud metadata)"),
            ),
            ("https://[::ffff:10.0.0.1]/", Unsafe("private (RFC 1918)")),
            (
                "https://[::127.0.0.1]/",
                Unsafe("URL host [::7f00:1] is an IPv4-compatible IPv6 address (deprecated)"),
            ),
            ("https://[::8.8.8.8]/", Unsafe("IPv4-compatible")),
            (
                "https://[fd00::1]/",
                Unsafe("URL host [fd00::1] is a unique local (private IPv6) address"),
            ),
            ("https://[fc00::1]/", Unsafe("unique local")),
            (
                "https://[fe80::1]/",
                Unsafe("URL host [fe80::1] is a link-local address"),
            ),
            ("https://[FE80::1]/", Unsafe("link-local")),
            ("https://[ff02::1]/", Unsafe("multicast")),
            (
                "https://[64:ff9b::a00:1]/",
                Unsafe("URL host [64:ff9b::a00:1] is a NAT64 address"),
            ),
            ("https://[64:ff9b::8.8.8.8]/", Unsafe("NAT64")),
            ("https://[64:ff9b:1::1]/", Unsafe("NAT64")),
            (
                "https://[2002:7f00:1::]/",
                Unsafe("URL host [2002:7f00:1::] is a 6to4 transition address"),
            ),
            (
                "https://[2001::1]/",
                Unsafe("URL host [2001::1] is a Teredo tunnelling address"),
            ),
            ("https://[2001:2::1]/", Unsafe("benchmarking")),
            ("https://[2001:10::1]/", Unsafe("IETF protocol assignment")),
            (
                "https://[2001:1ff:ffff::1]/",
                Unsafe("IETF protocol assignment"),
            ),
            (
                "https://[2001:db8::1]/",
                Unsafe("URL host [2001:db8::1] is a documentation address"),
            ),
            ("https://[2001:DB8:FFFF::1]/", Unsafe("documentation")),
            ("https://[3fff::1]/", Unsafe("documentation")),
            ("https://[3fff:fff:ffff::1]/", Unsafe("documentation")),
            (
                "https://[100::1]/",
                Unsafe("URL host [100::1] is not a global unicast address"),
            ),
            ("https://[fec0::1]/", Unsafe("not a global unicast address")),
            ("https://[4000::1]/", Unsafe("not a global unicast address")),
            (
                "https://[1fff:ffff::1]/",
                Unsafe("not a global unicast address"),
            ),
            (
                "https://[::ffff:0:808:808]/",
                Unsafe("not a global unicast address"),
            ),
            ("https://[::1]:0/", Unsafe("port 0")),
        ];
        let all = owned
            .iter()
            .map(|(input, want)| (input.as_str(), want))
            .chain(cases.iter().map(|(input, want)| (*input, want)));
        for (input, want) in all {
            let got = parse(input);
            match (want, &got) {
                (Ok(expected), Result::Ok(url)) => {
                    if !expected.is_empty() {
                        assert_eq!(url.as_str(), *expected, "{input}");
                        assert_eq!(url.to_string(), *expected, "{input}");
                    }
                }
                (Invalid(text), Err(UrlError::Invalid(msg)))
                | (Unsafe(text), Err(UrlError::Unsafe(msg))) => {
                    assert!(
                        msg.contains(text),
                        "{input}: message {msg:?} lacks {text:?}"
                    );
                }
                _ => panic!("{input}: unexpected {got:?}"),
            }
        }
    }

    #[test]
    fn messages_never_echo_userinfo() {
        let err = parse("https://admin:hunter2@127.0.0.1/").expect_err("userinfo");
        let msg = err.to_string();
        assert!(!msg.contains("hunter2") && !msg.contains("admin"), "{msg}");
        assert_eq!(err.code(), "unsafe_url");
    }

    #[test]
    fn codes_and_display() {
        let invalid = parse("nope").expect_err("relative");
        assert_eq!(invalid.code(), "invalid_url");
        assert_eq!(
            invalid.to_string(),
            "URL is not a valid absolute URL: relative URL without a base"
        );
        let unsafe_ = parse("http://yourapp.com/").expect_err("http");
        assert_eq!(unsafe_.code(), "unsafe_url");
    }

    #[test]
    fn ip_literal_and_accessors() {
        let name = parse("https://yourapp.com/h").expect("public");
        assert_eq!(name.ip_literal(), None);
        assert_eq!(name.url().host_str(), Some("yourapp.com"));
        let v4 = parse("https://134744072/").expect("public");
        assert_eq!(v4.ip_literal(), Some("8.8.8.8".parse().expect("ip")));
        let mapped = parse("https://[::ffff:8.8.8.8]/").expect("public");
        assert_eq!(
            mapped.ip_literal(),
            Some("::ffff:8.8.8.8".parse().expect("ip"))
        );
        assert_eq!(
            parse("https://[2606:4700:4700::1111]/")
                .expect("public")
                .ip_literal(),
            Some("2606:4700:4700::1111".parse().expect("ip"))
        );
    }

    #[test]
    fn allow_list_parse() {
        assert!(AllowList::parse("").expect("empty").is_empty());
        assert!(AllowList::parse("  ").expect("blank").is_empty());
        let list = AllowList::parse(" 127.0.0.0/8 , ::1, 10.1.2.3,fd00::/8,").expect("valid");
        let nets: Vec<String> = list.nets().iter().map(ToString::to_string).collect();
        assert_eq!(nets, ["127.0.0.0/8", "::1/128", "10.1.2.3/32", "fd00::/8"]);
        assert_eq!(
            AllowList::parse("127.0.0.1/8").expect("host bits").nets(),
            AllowList::parse("127.0.0.0/8").expect("net").nets()
        );
        for bad in [
            "127.0.0.0/33",
            "localhost",
            "10.0.0.0/8;192.168.0.0/16",
            "::1/129",
            "1.2.3",
        ] {
            let err = AllowList::parse(&format!("127.0.0.0/8, {bad}")).expect_err(bad);
            assert!(err.contains(&format!("\"{bad}\"")), "{err}");
        }
        assert_eq!(
            AllowList::new(vec!["127.0.0.0/8".parse().expect("net")]),
            AllowList::parse("127.0.0.0/8").expect("net")
        );
    }

    #[test]
    fn allow_list_opens_ips_only() {
        let allow = AllowList::parse("127.0.0.0/8, fd00::/8").expect("valid");
        for ok in [
            "https://127.0.0.1/",
            "https://2130706433:8443/",
            "https://[::ffff:127.0.0.1]/",
            "https://[fd12::1]/",
        ] {
            assert!(WebhookUrl::parse(ok, &allow).is_ok(), "{ok}");
        }
        for (bad, text) in [
            ("https://localhost/", "not allowed"),
            ("https://intranet/", "single-label"),
            ("http://127.0.0.1/", "https"),
            ("https://u:p@127.0.0.1/", "user name or password"),
            ("https://127.0.0.1:0/", "port 0"),
            ("https://10.0.0.1/", "private"),
            ("https://[::1]/", "loopback"),
        ] {
            match WebhookUrl::parse(bad, &allow) {
                Err(UrlError::Unsafe(msg)) => assert!(msg.contains(text), "{bad}: {msg}"),
                other => panic!("{bad}: {other:?}"),
            }
        }
        // An entry written as IPv4-mapped IPv6 still matches the canonical address.
        let mapped = AllowList::parse("::ffff:127.0.0.0/104").expect("valid");
        assert!(check_ip("127.0.0.1".parse().expect("ip"), &mapped).is_ok());
        assert!(check_ip("::ffff:127.0.0.1".parse().expect("ip"), &mapped).is_ok());
        assert_eq!(
            check_ip("10.0.0.1".parse().expect("ip"), &mapped),
            Err(BlockReason::Private)
        );
    }

    #[test]
    fn check_ip_reasons() {
        let cases = [
            ("0.1.2.3", BlockReason::ThisNetwork),
            ("10.0.0.0", BlockReason::Private),
            ("100.64.0.0", BlockReason::SharedAddressSpace),
            ("127.255.255.255", BlockReason::Loopback),
            ("169.254.169.254", BlockReason::LinkLocal),
            ("192.0.0.255", BlockReason::IetfProtocol),
            ("192.0.2.0", BlockReason::Documentation),
            ("192.88.99.255", BlockReason::SixToFour),
            ("198.18.0.0", BlockReason::Benchmarking),
            ("224.0.0.0", BlockReason::Multicast),
            ("240.0.0.0", BlockReason::Reserved),
            ("255.255.255.255", BlockReason::Broadcast),
            ("::", BlockReason::Unspecified),
            ("::1", BlockReason::Loopback),
            ("::2", BlockReason::Ipv4Compatible),
            ("::ffff:255.255.255.255", BlockReason::Broadcast),
            ("::ffff:0.0.0.0", BlockReason::ThisNetwork),
            ("fc00::", BlockReason::UniqueLocal),
            (
                "fdff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
                BlockReason::UniqueLocal,
            ),
            ("febf:ffff::", BlockReason::LinkLocal),
            ("ff00::", BlockReason::Multicast),
            ("64:ff9b::", BlockReason::Nat64),
            ("64:ff9b:1:ffff::", BlockReason::Nat64),
            ("64:ff9b:2::", BlockReason::NotGlobalUnicast),
            ("2001::", BlockReason::Teredo),
            ("2001:0:ffff::", BlockReason::Teredo),
            ("2001:1::1", BlockReason::IetfProtocol),
            ("2001:2::", BlockReason::Benchmarking),
            ("2001:2:1::", BlockReason::IetfProtocol),
            ("2001:db8::", BlockReason::Documentation),
            ("2002::", BlockReason::SixToFour),
            ("3fff::", BlockReason::Documentation),
            ("e000::", BlockReason::NotGlobalUnicast),
        ];
        for (ip, want) in cases {
            let ip: IpAddr = ip.parse().expect("ip");
            assert_eq!(check_ip(ip, &allow_none()), Err(want), "{ip}");
        }
        for ip in [
            "8.8.8.8",
            "1.0.0.0",
            "223.255.255.255",
            "::ffff:1.1.1.1",
            "2000::",
            "2001:200::",
            "2001:db7:ffff:ffff:ffff:ffff:ffff:ffff",
            "3fff:1000::",
            "3fff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
        ] {
            let ip: IpAddr = ip.parse().expect("ip");
            assert_eq!(check_ip(ip, &allow_none()), Ok(()), "{ip}");
        }
    }

    #[test]
    fn reasons_display_distinct_text() {
        let all = [
            BlockReason::ThisNetwork,
            BlockReason::Private,
            BlockReason::SharedAddressSpace,
            BlockReason::Loopback,
            BlockReason::LinkLocal,
            BlockReason::IetfProtocol,
            BlockReason::Documentation,
            BlockReason::Benchmarking,
            BlockReason::Multicast,
            BlockReason::Broadcast,
            BlockReason::Reserved,
            BlockReason::Unspecified,
            BlockReason::UniqueLocal,
            BlockReason::Nat64,
            BlockReason::SixToFour,
            BlockReason::Teredo,
            BlockReason::Ipv4Compatible,
            BlockReason::NotGlobalUnicast,
        ];
        let texts: std::collections::BTreeSet<String> =
            all.iter().map(ToString::to_string).collect();
        assert_eq!(texts.len(), all.len());
    }

    /// Property tests against an independent list of ranges, written here as
    /// plain (first address, prefix length) numbers rather than reusing the
    /// module's tables.
    mod props {
        use super::super::*;
        use proptest::prelude::*;

        /// Blocked IPv4 ranges: (network as u32, prefix length).
        const BLOCKED_V4: &[(u32, u32)] = &[
            (0x0000_0000, 8),  // 0.0.0.0/8
            (0x0a00_0000, 8),  // 10/8
            (0x6440_0000, 10), // 100.64/10
            (0x7f00_0000, 8),  // 127/8
            (0xa9fe_0000, 16), // 169.254/16
            (0xac10_0000, 12), // 172.16/12
            (0xc000_0000, 24), // 192.0.0/24
            (0xc000_0200, 24), // 192.0.2/24
            (0xc058_6300, 24), // 192.88.99/24
            (0xc0a8_0000, 16), // 192.168/16
            (0xc612_0000, 15), // 198.18/15
            (0xc633_6400, 24), // 198.51.100/24
            (0xcb00_7100, 24), // 203.0.113/24
            (0xe000_0000, 4),  // 224/4
            (0xf000_0000, 4),  // 240/4
        ];

        /// Blocked IPv6 ranges: (network as u128, prefix length).
        const BLOCKED_V6: &[(u128, u32)] = &[
            (0, 96),                                         // ::/96 incl. :: and ::1
            (0x0064_ff9b_0000_0000_0000_0000_0000_0000, 96), // NAT64
            (0x0064_ff9b_0001_0000_0000_0000_0000_0000, 48), // local NAT64
            (0x0100_0000_0000_0000_0000_0000_0000_0000, 64), // discard-only
            (0x2001_0000_0000_0000_0000_0000_0000_0000, 23), // IETF protocol
            (0x2001_0db8_0000_0000_0000_0000_0000_0000, 32), // documentation
            (0x2002_0000_0000_0000_0000_0000_0000_0000, 16), // 6to4
            (0x3fff_0000_0000_0000_0000_0000_0000_0000, 20), // documentation
            (0xfc00_0000_0000_0000_0000_0000_0000_0000, 7),  // unique local
            (0xfe80_0000_0000_0000_0000_0000_0000_0000, 10), // link-local
            (0xff00_0000_0000_0000_0000_0000_0000_0000, 8),  // multicast
        ];

        fn v4_range(i: usize) -> (u32, u32) {
            let (net, len) = BLOCKED_V4[i];
            (net, net | (u32::MAX >> len))
        }

        fn v6_range(i: usize) -> (u128, u128) {
            let (net, len) = BLOCKED_V6[i];
            (net, net | (u128::MAX >> len))
        }

        fn in_blocked_v4(a: u32) -> bool {
            (0..BLOCKED_V4.len()).any(|i| {
                let (lo, hi) = v4_range(i);
                (lo..=hi).contains(&a)
            })
        }

        /// Public per the independent list: inside 2000::/3, outside the blocks.
        fn public_v6(a: u128) -> bool {
            a >> 125 == 0b001
                && !(0..BLOCKED_V6.len()).any(|i| {
                    let (lo, hi) = v6_range(i);
                    (lo..=hi).contains(&a)
                })
        }

        /// Every notation of an IPv4 host that the url crate accepts.
        fn v4_spellings(a: u32) -> Vec<String> {
            let [b0, b1, b2, b3] = a.to_be_bytes();
            let dotted = format!("{b0}.{b1}.{b2}.{b3}");
            let fullwidth: String = dotted
                .chars()
                .map(|c| match c.to_digit(10) {
                    Some(d) => char::from_u32(0xff10 + d).unwrap_or(c),
                    None => c,
                })
                .collect();
            let percent: String = dotted.bytes().map(|b| format!("%{b:02X}")).collect();
            vec![
                dotted.clone(),
                format!("{a}"),
                format!("0x{a:x}"),
                format!("0X{a:08X}"),
                format!("0{a:o}"),
                format!("0{b0:o}.0{b1:o}.0{b2:o}.0{b3:o}"),
                format!("0x{b0:02x}.0x{b1:02x}.0x{b2:02x}.0x{b3:02x}"),
                format!("{b0}.{b1}.{}", u16::from_be_bytes([b2, b3])),
                format!("{b0}.{}", a & 0x00ff_ffff),
                format!("0x{b0:x}.0{:o}", a & 0x00ff_ffff),
                format!("{dotted}."),
                fullwidth,
                percent,
                format!("[::ffff:{dotted}]"),
                format!("[::ffff:{:x}:{:x}]", a >> 16, a & 0xffff),
                format!("[0:0:0:0:0:FFFF:{:04X}:{:04X}]", a >> 16, a & 0xffff),
            ]
        }

        fn v6_spellings(a: u128) -> Vec<String> {
            let ip = Ipv6Addr::from(a);
            let expanded = ip
                .segments()
                .iter()
                .map(|s| format!("{s:04x}"))
                .collect::<Vec<_>>()
                .join(":");
            vec![
                format!("[{ip}]"),
                format!("[{expanded}]"),
                format!("[{}]", expanded.to_uppercase()),
                format!("[{}]", ip.to_string().to_uppercase()),
            ]
        }

        fn blocked_v4_addr() -> impl Strategy<Value = u32> {
            (0..BLOCKED_V4.len(), any::<u32>()).prop_map(|(i, r)| {
                let (lo, hi) = v4_range(i);
                lo | (r & (hi - lo))
            })
        }

        fn blocked_v6_addr() -> impl Strategy<Value = u128> {
            (0..BLOCKED_V6.len(), any::<u128>()).prop_map(|(i, r)| {
                let (lo, hi) = v6_range(i);
                lo | (r & (hi - lo))
            })
        }

        fn assert_unsafe(host: &str) {
            let input = format!("https://{host}/hook");
            match WebhookUrl::parse(&input, &AllowList::default()) {
                Err(UrlError::Unsafe(msg)) => {
                    assert!(
                        msg.contains("webhook URLs must be publicly reachable"),
                        "{input}: {msg}"
                    );
                }
                other => panic!("{input}: expected Unsafe, got {other:?}"),
            }
        }

        fn assert_accepted(host: &str) {
            let input = format!("https://{host}/hook");
            let got = WebhookUrl::parse(&input, &AllowList::default());
            assert!(got.is_ok(), "{input}: expected accepted, got {got:?}");
        }

        /// The neighbours just outside each blocked range that are public.
        fn public_v4_neighbours() -> Vec<u32> {
            let mut out: Vec<u32> = (0..BLOCKED_V4.len())
                .flat_map(|i| {
                    let (lo, hi) = v4_range(i);
                    [lo.checked_sub(1), hi.checked_add(1)]
                })
                .flatten()
                .filter(|&a| !in_blocked_v4(a))
                .collect();
            out.sort_unstable();
            out.dedup();
            out
        }

        #[test]
        fn neighbours_match_hand_list() {
            let hand: Vec<u32> = [
                "1.0.0.0",
                "9.255.255.255",
                "11.0.0.0",
                "100.63.255.255",
                "100.128.0.0",
                "126.255.255.255",
                "128.0.0.0",
                "169.253.255.255",
                "169.255.0.0",
                "172.15.255.255",
                "172.32.0.0",
                "191.255.255.255",
                "192.0.1.0",
                "192.0.1.255",
                "192.0.3.0",
                "192.88.98.255",
                "192.88.100.0",
                "192.167.255.255",
                "192.169.0.0",
                "198.17.255.255",
                "198.20.0.0",
                "198.51.99.255",
                "198.51.101.0",
                "203.0.112.255",
                "203.0.114.0",
                "223.255.255.255",
            ]
            .iter()
            .map(|s| u32::from(s.parse::<Ipv4Addr>().expect("ip")))
            .collect();
            let mut hand_sorted = hand.clone();
            hand_sorted.sort_unstable();
            hand_sorted.dedup();
            assert_eq!(public_v4_neighbours(), hand_sorted);
            for a in hand {
                for host in v4_spellings(a) {
                    assert_accepted(&host);
                }
            }
        }

        #[test]
        fn v6_neighbours_accepted() {
            for i in 0..BLOCKED_V6.len() {
                let (lo, hi) = v6_range(i);
                for n in [lo.checked_sub(1), hi.checked_add(1)].into_iter().flatten() {
                    if public_v6(n) {
                        for host in v6_spellings(n) {
                            assert_accepted(&host);
                        }
                    }
                }
            }
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(512))]

            #[test]
            fn blocked_v4_refused_in_every_notation(a in blocked_v4_addr()) {
                for host in v4_spellings(a) {
                    assert_unsafe(&host);
                }
            }

            #[test]
            fn blocked_v6_refused_in_every_notation(a in blocked_v6_addr()) {
                for host in v6_spellings(a) {
                    assert_unsafe(&host);
                }
            }

            #[test]
            fn outside_global_unicast_refused(a in any::<u128>()) {
                let ip = Ipv6Addr::from(a);
                // IPv4-mapped addresses are judged as IPv4, covered elsewhere.
                prop_assume!(ip.to_ipv4_mapped().is_none());
                if a >> 125 == 0b001 {
                    // Global unicast: covered by the other properties.
                    return Ok(());
                }
                for host in v6_spellings(a) {
                    assert_unsafe(&host);
                }
            }

            #[test]
            fn v4_classifier_matches_independent_list(a in any::<u32>()) {
                let ip = IpAddr::V4(Ipv4Addr::from(a));
                prop_assert_eq!(check_ip(ip, &AllowList::default()).is_ok(), !in_blocked_v4(a));
            }

            #[test]
            fn v6_classifier_matches_independent_list(a in any::<u128>()) {
                let ip = Ipv6Addr::from(a);
                prop_assume!(ip.to_ipv4_mapped().is_none());
                prop_assert_eq!(
                    check_ip(IpAddr::V6(ip), &AllowList::default()).is_ok(),
                    public_v6(a)
                );
            }

            #[test]
            fn v6_global_unicast_public_accepted(r in any::<u128>()) {
                // Bias towards 2000::/3 so the property bites.
                let a = (r & (u128::MAX >> 3)) | (1 << 125);
                prop_assume!(public_v6(a));
                for host in v6_spellings(a) {
                    assert_accepted(&host);
                }
            }

            #[test]
            fn public_v4_accepted(a in any::<u32>()) {
                if in_blocked_v4(a) {
                    // About 14% of the space: covered by the blocked property.
                    return Ok(());
                }
                for host in v4_spellings(a) {
                    assert_accepted(&host);
                }
            }

            #[test]
            fn mapped_v6_judged_as_v4(a in any::<u32>(), allow_prefix in 0u8..=32, allow_base in any::<u32>()) {
                let v4 = Ipv4Addr::from(a);
                let mapped = IpAddr::V6(v4.to_ipv6_mapped());
                let none = AllowList::default();
                prop_assert_eq!(check_ip(IpAddr::V4(v4), &none), check_ip(mapped, &none));
                let net = Ipv4Net::new(Ipv4Addr::from(allow_base), allow_prefix).expect("prefix <= 32");
                let some = AllowList::new(vec![IpNet::V4(net)]);
                prop_assert_eq!(check_ip(IpAddr::V4(v4), &some), check_ip(mapped, &some));
            }

            #[test]
            fn allow_list_lets_its_v4_through(base in any::<u32>(), prefix in 0u32..=32, r in any::<u32>()) {
                let mask = u32::MAX.checked_shr(prefix).unwrap_or(0);
                let addr = (base & !mask) | (r & mask);
                let net = Ipv4Net::new(Ipv4Addr::from(base), u8::try_from(prefix).expect("<= 32")).expect("prefix");
                let allow = AllowList::parse(&net.to_string()).expect("cidr");
                let ip = Ipv4Addr::from(addr);
                prop_assert!(allow.contains(IpAddr::V4(ip)));
                prop_assert_eq!(check_ip(IpAddr::V4(ip), &allow), Ok(()));
                prop_assert_eq!(check_ip(IpAddr::V6(ip.to_ipv6_mapped()), &allow), Ok(()));
                let url = format!("https://{ip}/");
                prop_assert!(WebhookUrl::parse(&url, &allow).is_ok(), "{}", url);
            }

            #[test]
            fn allow_list_lets_its_v6_through(base in any::<u128>(), prefix in 0u32..=128, r in any::<u128>()) {
                let mask = u128::MAX.checked_shr(prefix).unwrap_or(0);
                let addr = (base & !mask) | (r & mask);
                let net = Ipv6Net::new(Ipv6Addr::from(base), u8::try_from(prefix).expect("<= 128")).expect("prefix");
                let allow = AllowList::new(vec![IpNet::V6(net)]);
                let ip = IpAddr::V6(Ipv6Addr::from(addr));
                prop_assert_eq!(check_ip(ip, &allow), Ok(()));
            }

            #[test]
            fn allow_list_parse_round_trips(nets in proptest::collection::vec((any::<u32>(), 0u8..=32), 0..5)) {
                let nets: Vec<IpNet> = nets
                    .into_iter()
                    .map(|(a, p)| IpNet::V4(Ipv4Net::new(Ipv4Addr::from(a), p).expect("prefix").trunc()))
                    .collect();
                let text = nets.iter().map(ToString::to_string).collect::<Vec<_>>().join(" , ");
                let parsed = AllowList::parse(&text).expect("valid");
                prop_assert_eq!(parsed.nets(), nets.as_slice());
            }
        }
    }
}
