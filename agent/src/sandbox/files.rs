//! The text of the files a pod's containers get as `/etc/hosts`, `/etc/resolv.conf` and
//! `/etc/hostname`, as the kubelet builds them (`resolv.conf` rendered the way containerd's
//! CRI writes the kubelet's DNS config). Pure functions of the pod and the node's settings;
//! [`super::Sandbox::write_files`] puts the text on disk.

use std::collections::HashSet;
use std::net::IpAddr;
use std::path::PathBuf;

use k8s_openapi::api::core::v1::{HostAlias, Pod, PodDNSConfig};

use super::SandboxError;

/// The first line of every hosts file the kubelet writes for a pod network pod.
pub const MANAGED_HOSTS_HEADER: &str = "# Kubernetes-managed hosts file.\n";
/// The first line of the hosts file of a `hostNetwork` pod, above the node's own.
pub const MANAGED_HOSTS_HEADER_HOST_NETWORK: &str =
    "# Kubernetes-managed hosts file (host network).\n";

/// The options the kubelet gives ClusterFirst pods.
const CLUSTER_FIRST_OPTIONS: &[&str] = &["ndots:5"];
/// Upstream validation limits (`MaxDNSNameservers`, and the expanded DNS config limits that
/// are always on since Kubernetes 1.28).
const MAX_NAMESERVERS: usize = 3;
const MAX_SEARCH_PATHS: usize = 32;
const MAX_SEARCH_LINE_CHARS: usize = 2048;
/// glibc aborts on a search path longer than a DNS-1123 subdomain, so the kubelet drops them.
const MAX_SEARCH_PATH_CHARS: usize = 253;
/// A pod's hostname is a DNS label.
const MAX_HOSTNAME_CHARS: usize = 63;
/// The FQDN as kernel hostname must fit the kernel's 64-byte nodename.
const MAX_FQDN_CHARS: usize = 64;

/// The files of one pod, ready to write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodFiles {
    pub hosts: String,
    pub resolv_conf: String,
    pub hostname: String,
    /// What the kubelet reports as `DNSConfigForming` or `MissingClusterDNS` events.
    pub warnings: Vec<String>,
}

impl PodFiles {
    /// Every file of `pod`, whose network namespace got `pod_ips`. `node_resolv_conf` is
    /// the text of the node's resolv.conf ([`DnsSettings::read_node_resolv_conf`]).
    pub fn for_pod(
        pod: &Pod,
        pod_ips: &[IpAddr],
        settings: &DnsSettings,
        node_resolv_conf: Option<&str>,
    ) -> Result<PodFiles, SandboxError> {
        let names = pod_hostname(pod, &settings.cluster_domain)?;
        let aliases = host_aliases(pod);
        let dns = pod_dns(pod, settings, node_resolv_conf);
        Ok(PodFiles {
            hosts: hosts_file(pod_ips, &names.hostname, names.domain.as_deref(), aliases),
            resolv_conf: dns.config.render(),
            hostname: hostname_file(&names.kernel_hostname),
            warnings: dns.warnings,
        })
    }
}

/// The pod's `hostAliases` (none when unset).
fn host_aliases(pod: &Pod) -> &[HostAlias] {
    pod.spec
        .as_ref()
        .and_then(|s| s.host_aliases.as_deref())
        .unwrap_or_default()
}

/// What a `hostNetwork` pod's files are made of besides the pod: the node's own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeFiles {
    /// The text of the node's `/etc/hosts`.
    pub hosts: String,
    /// The node's hostname, which the pod shares with its UTS namespace.
    pub hostname: String,
}

impl PodFiles {
    /// Every file of a `hostNetwork` pod: the node's hosts file under the kubelet's header
    /// with `hostAliases` appended, the node's hostname (what containerd's CRI writes when
    /// the kubelet gives a host-network sandbox no hostname), and the resolver as
    /// [`pod_dns`] computes it for any pod.
    pub fn for_host_network_pod(
        pod: &Pod,
        settings: &DnsSettings,
        node_resolv_conf: Option<&str>,
        node: &NodeFiles,
    ) -> PodFiles {
        let aliases = host_aliases(pod);
        let dns = pod_dns(pod, settings, node_resolv_conf);
        PodFiles {
            hosts: node_hosts_file(&node.hosts, aliases),
            resolv_conf: dns.config.render(),
            hostname: hostname_file(&node.hostname),
            warnings: dns.warnings,
        }
    }
}

/// A pod's names, as the kubelet derives them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodHostname {
    /// `spec.hostname`, else the pod name, cut to 63 characters.
    pub hostname: String,
    /// `<subdomain>.<namespace>.svc.<cluster domain>` when `spec.subdomain` is set.
    pub domain: Option<String>,
    /// What the UTS namespace holds: the FQDN with `setHostnameAsFQDN`, else `hostname`.
    pub kernel_hostname: String,
}

fn invalid_pod(pod: &Pod, reason: String) -> SandboxError {
    SandboxError::InvalidPod {
        pod: format!(
            "{}/{}",
            pod.metadata.namespace.as_deref().unwrap_or_default(),
            pod.metadata.name.as_deref().unwrap_or_default()
        ),
        reason,
    }
}

fn is_dns1123_label(s: &str) -> bool {
    let bytes = s.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 63
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
        && bytes[0] != b'-'
        && bytes[bytes.len() - 1] != b'-'
}

/// The pod's hostname, domain and kernel hostname (the kubelet's
/// `GeneratePodHostNameAndDomain` and `GetNodenameForKernel`).
pub fn pod_hostname(pod: &Pod, cluster_domain: &str) -> Result<PodHostname, SandboxError> {
    let spec = pod.spec.clone().unwrap_or_default();
    let mut hostname = pod.metadata.name.clone().unwrap_or_default();
    if let Some(wanted) = spec.hostname.as_deref().filter(|h| !h.is_empty()) {
        if !is_dns1123_label(wanted) {
            return Err(invalid_pod(
                pod,
                format!("spec.hostname {wanted:?} is not a DNS label"),
            ));
        }
        hostname = wanted.to_owned();
    }
    if hostname.len() > MAX_HOSTNAME_CHARS {
        // A pod name is ASCII (a DNS subdomain), so cutting bytes cuts characters; a name
        // must not end with '-' or '.'.
        hostname.truncate(MAX_HOSTNAME_CHARS);
        let kept = hostname.trim_end_matches(['-', '.']).len();
        hostname.truncate(kept);
    }
    if hostname.is_empty() {
        return Err(invalid_pod(
            pod,
            "the pod has no name to use as hostname".into(),
        ));
    }
    let domain = match spec.subdomain.as_deref().filter(|s| !s.is_empty()) {
        Some(subdomain) if !is_dns1123_label(subdomain) => {
            return Err(invalid_pod(
                pod,
                format!("spec.subdomain {subdomain:?} is not a DNS label"),
            ));
        }
        Some(subdomain) => Some(format!(
            "{subdomain}.{}.svc.{cluster_domain}",
            pod.metadata.namespace.as_deref().unwrap_or("default")
        )),
        None => None,
    };
    let kernel_hostname = match (&domain, spec.set_hostname_as_fqdn) {
        (Some(domain), Some(true)) => {
            let fqdn = format!("{hostname}.{domain}");
            if fqdn.len() > MAX_FQDN_CHARS {
                return Err(invalid_pod(
                    pod,
                    format!(
                        "FQDN {fqdn} is too long for setHostnameAsFQDN ({MAX_FQDN_CHARS} characters is the max, {} requested)",
                        fqdn.len()
                    ),
                ));
            }
            fqdn
        }
        _ => hostname.clone(),
    };
    Ok(PodHostname {
        hostname,
        domain,
        kernel_hostname,
    })
}

/// The kubelet's managed hosts file: the header, localhost and IPv6 lines, one line per pod
/// IP naming the pod (with its FQDN first when it has a domain), then `hostAliases`.
pub fn hosts_file(
    pod_ips: &[IpAddr],
    hostname: &str,
    domain: Option<&str>,
    host_aliases: &[HostAlias],
) -> String {
    let mut out = String::from(MANAGED_HOSTS_HEADER);
    out.push_str("127.0.0.1\tlocalhost\n");
    out.push_str("::1\tlocalhost ip6-localhost ip6-loopback\n");
    out.push_str("fe00::0\tip6-localnet\n");
    out.push_str("fe00::0\tip6-mcastprefix\n");
    out.push_str("fe00::1\tip6-allnodes\n");
    out.push_str("fe00::2\tip6-allrouters\n");
    for ip in pod_ips {
        match domain {
            Some(domain) => out.push_str(&format!("{ip}\t{hostname}.{domain}\t{hostname}\n")),
            None => out.push_str(&format!("{ip}\t{hostname}\n")),
        }
    }
    push_host_aliases(&mut out, host_aliases);
    out
}

/// A `hostNetwork` pod's hosts file, the kubelet's `nodeHostsFileContent`: its header, the
/// node's hosts file as it is, then `hostAliases`.
pub fn node_hosts_file(node_hosts: &str, host_aliases: &[HostAlias]) -> String {
    let mut out = String::from(MANAGED_HOSTS_HEADER_HOST_NETWORK);
    out.push_str(node_hosts);
    push_host_aliases(&mut out, host_aliases);
    out
}

fn push_host_aliases(out: &mut String, host_aliases: &[HostAlias]) {
    if !host_aliases.is_empty() {
        out.push_str("\n# Entries added by HostAliases.\n");
        for alias in host_aliases {
            let names = alias.hostnames.as_deref().unwrap_or_default().join("\t");
            out.push_str(&format!("{}\t{names}\n", alias.ip));
        }
    }
}

/// `/etc/hostname`, as containerd's CRI writes it.
pub fn hostname_file(hostname: &str) -> String {
    format!("{hostname}\n")
}

/// The node's DNS settings, the kubelet's `--cluster-dns`, `--cluster-domain`,
/// `--resolv-conf` and its node IPs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DnsSettings {
    pub cluster_dns: Vec<IpAddr>,
    pub cluster_domain: String,
    /// `None` is the kubelet's `--resolv-conf=""`: pods that would copy the node's
    /// resolver get a local one instead.
    pub resolv_conf: Option<PathBuf>,
    pub node_ips: Vec<IpAddr>,
}

impl DnsSettings {
    /// The text of the node's resolv.conf, `None` when none is configured.
    pub fn read_node_resolv_conf(&self) -> Result<Option<String>, SandboxError> {
        let Some(path) = &self.resolv_conf else {
            return Ok(None);
        };
        std::fs::read_to_string(path)
            .map(Some)
            .map_err(|source| SandboxError::Io {
                what: format!("read node resolv.conf {}", path.display()),
                source,
            })
    }
}

/// A resolver configuration: the three things the kubelet hands the runtime.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ResolvConf {
    pub nameservers: Vec<String>,
    pub searches: Vec<String>,
    pub options: Vec<String>,
}

impl ResolvConf {
    /// Reads a resolv.conf as the kubelet does: `nameserver` lines accumulate, the last
    /// `search` line wins (trailing dots dropped), the last `options` line wins; `#`
    /// comments and everything else are ignored.
    pub fn parse(text: &str) -> ResolvConf {
        let mut conf = ResolvConf::default();
        for line in text.lines() {
            let line = line.trim();
            if line.starts_with('#') {
                continue;
            }
            let mut fields = line.split_whitespace();
            match fields.next() {
                Some("nameserver") => {
                    if let Some(server) = fields.next() {
                        conf.nameservers.push(server.to_owned());
                    }
                }
                Some("search") => {
                    conf.searches = fields
                        .map(|s| s.strip_suffix('.').unwrap_or(s).to_owned())
                        .collect();
                }
                Some("options") => conf.options = fields.map(str::to_owned).collect(),
                _ => {}
            }
        }
        conf
    }

    /// The file text, as containerd's CRI renders a DNS config: search, nameservers,
    /// options.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if !self.searches.is_empty() {
            out.push_str(&format!("search {}\n", self.searches.join(" ")));
        }
        for server in &self.nameservers {
            out.push_str(&format!("nameserver {server}\n"));
        }
        if !self.options.is_empty() {
            out.push_str(&format!("options {}\n", self.options.join(" ")));
        }
        out
    }
}

/// A pod's resolver configuration and the warnings building it raised.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodDns {
    pub config: ResolvConf,
    pub warnings: Vec<String>,
}

/// The pod's resolver configuration by `dnsPolicy`, as the kubelet's `GetPodDNS`:
/// - `ClusterFirst` (the default; `Default` for host-network pods) and
///   `ClusterFirstWithHostNet`: the cluster DNS servers only, the search list
///   `<ns>.svc.<domain> svc.<domain> <domain>` then the node's, `options ndots:5`; with no
///   cluster DNS configured it falls back to `Default` with a warning.
/// - `Default`: the node's resolv.conf (nameservers, search, options).
/// - `None`: empty.
///
/// `dnsConfig` is merged in every case (nameservers and searches appended without
/// duplicates, options overriding by name), then the upstream limits are applied.
pub fn pod_dns(pod: &Pod, settings: &DnsSettings, node_resolv_conf: Option<&str>) -> PodDns {
    let spec = pod.spec.clone().unwrap_or_default();
    let mut warnings = Vec::new();
    let host = node_resolv_conf.map(ResolvConf::parse).unwrap_or_default();
    let host_network = spec.host_network.unwrap_or(false);
    let cluster_first = match spec.dns_policy.as_deref().unwrap_or("ClusterFirst") {
        "None" => None,
        "ClusterFirstWithHostNet" => Some(true),
        "ClusterFirst" => Some(!host_network),
        "Default" => Some(false),
        other => {
            warnings.push(format!(
                "invalid dnsPolicy {other:?}; falling back to \"ClusterFirst\""
            ));
            Some(true)
        }
    };
    let mut config = match cluster_first {
        None => ResolvConf::default(),
        Some(true) if !settings.cluster_dns.is_empty() => ResolvConf {
            nameservers: settings
                .cluster_dns
                .iter()
                .map(ToString::to_string)
                .collect(),
            searches: cluster_searches(pod, &settings.cluster_domain, host.searches.clone()),
            options: CLUSTER_FIRST_OPTIONS
                .iter()
                .map(|o| o.to_string())
                .collect(),
        },
        Some(cluster) => {
            if cluster {
                warnings.push(
                    "the agent has no cluster DNS IP configured and cannot create a pod using \
                     \"ClusterFirst\" policy; falling back to \"Default\" policy"
                        .to_owned(),
                );
            }
            node_default_dns(host, node_resolv_conf.is_some(), &settings.node_ips)
        }
    };
    if let Some(dns_config) = &spec.dns_config {
        merge_dns_config(&mut config, dns_config);
    }
    fit_limits(&mut config, &mut warnings);
    PodDns { config, warnings }
}

/// The `Default` policy: the node's resolver, or a local one when the node has none
/// configured (the kubelet's answer to `--resolv-conf=""`).
fn node_default_dns(host: ResolvConf, have_resolv_conf: bool, node_ips: &[IpAddr]) -> ResolvConf {
    if have_resolv_conf {
        return host;
    }
    let mut config = host;
    config.nameservers = node_ips
        .iter()
        .map(|ip| if ip.is_ipv6() { "::1" } else { "127.0.0.1" }.to_owned())
        .collect();
    if config.nameservers.is_empty() {
        config.nameservers.push("127.0.0.1".to_owned());
    }
    config.searches = vec![".".to_owned()];
    config
}

fn cluster_searches(pod: &Pod, cluster_domain: &str, host_searches: Vec<String>) -> Vec<String> {
    if cluster_domain.is_empty() {
        return host_searches;
    }
    let namespace = pod.metadata.namespace.as_deref().unwrap_or("default");
    let mut searches = vec![
        format!("{namespace}.svc.{cluster_domain}"),
        format!("svc.{cluster_domain}"),
        cluster_domain.to_owned(),
    ];
    searches.extend(host_searches);
    dedup(searches)
}

fn dedup(items: Vec<String>) -> Vec<String> {
    let mut seen = HashSet::new();
    items
        .into_iter()
        .filter(|item| seen.insert(item.clone()))
        .collect()
}

/// `dnsConfig` on top of the policy's config. Options keep their first position and take
/// the pod's value; the kubelet goes through a Go map here, so its order is random, and a
/// stable one is kept instead.
fn merge_dns_config(config: &mut ResolvConf, dns_config: &PodDNSConfig) {
    let mut nameservers = std::mem::take(&mut config.nameservers);
    nameservers.extend(dns_config.nameservers.iter().flatten().cloned());
    config.nameservers = dedup(nameservers);
    let mut searches = std::mem::take(&mut config.searches);
    searches.extend(dns_config.searches.iter().flatten().cloned());
    config.searches = dedup(searches);
    let mut options: Vec<(String, Option<String>)> = Vec::new();
    let mut set = |name: &str, value: Option<&str>| {
        let value = value.filter(|v| !v.is_empty()).map(str::to_owned);
        match options.iter_mut().find(|(n, _)| n == name) {
            Some(entry) => entry.1 = value,
            None => options.push((name.to_owned(), value)),
        }
    };
    for option in &config.options {
        match option.split_once(':') {
            Some((name, value)) => set(name, Some(value)),
            None => set(option, None),
        }
    }
    for option in dns_config.options.iter().flatten() {
        set(
            option.name.as_deref().unwrap_or_default(),
            option.value.as_deref(),
        );
    }
    config.options = options
        .into_iter()
        .map(|(name, value)| match value {
            Some(value) => format!("{name}:{value}"),
            None => name,
        })
        .collect();
}

/// The kubelet's `formDNSConfigFitsLimits`: at most three nameservers; at most 32 search
/// paths, none longer than 253 characters, 2048 characters in all.
fn fit_limits(config: &mut ResolvConf, warnings: &mut Vec<String>) {
    if config.nameservers.len() > MAX_NAMESERVERS {
        config.nameservers.truncate(MAX_NAMESERVERS);
        warnings.push(format!(
            "Nameserver limits were exceeded, some nameservers have been omitted, the applied nameserver line is: {}",
            config.nameservers.join(" ")
        ));
    }
    let mut exceeded = false;
    if config.searches.len() > MAX_SEARCH_PATHS {
        config.searches.truncate(MAX_SEARCH_PATHS);
        exceeded = true;
    }
    let before = config.searches.len();
    config.searches.retain(|s| s.len() <= MAX_SEARCH_PATH_CHARS);
    exceeded |= config.searches.len() != before;
    while config.searches.join(" ").len() > MAX_SEARCH_LINE_CHARS {
        config.searches.pop();
        exceeded = true;
    }
    if exceeded {
        warnings.push(format!(
            "Search Line limits were exceeded, some search paths have been omitted, the applied search line is: {}",
            config.searches.join(" ")
        ));
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::{PodDNSConfigOption, PodSpec};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    use super::*;

    fn pod(name: &str, namespace: &str, spec: PodSpec) -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some(namespace.into()),
                ..Default::default()
            },
            spec: Some(spec),
            ..Default::default()
        }
    }

    fn settings() -> DnsSettings {
        DnsSettings {
            cluster_dns: vec!["10.96.0.10".parse().unwrap()],
            cluster_domain: "cluster.local".into(),
            resolv_conf: Some("/etc/resolv.conf".into()),
            node_ips: vec!["192.168.1.5".parse().unwrap()],
        }
    }

    const NODE_RESOLV_CONF: &str = "\
# generated by the node
nameserver 192.168.1.1
search first.example
nameserver 192.168.1.2
search corp.example. lab.example
options timeout:2
options edns0 attempts:3
";

    const BOILERPLATE: &str = "# Kubernetes-managed hosts file.
127.0.0.1\tlocalhost
::1\tlocalhost ip6-localhost ip6-loopback
fe00::0\tip6-localnet
fe00::0\tip6-mcastprefix
fe00::1\tip6-allnodes
fe00::2\tip6-allrouters
";

    #[test]
    fn hosts_file_as_the_kubelet_writes_it() {
        let ips: Vec<IpAddr> = vec!["10.244.1.7".parse().unwrap(), "fd00::7".parse().unwrap()];
        assert_eq!(
            hosts_file(&ips[..1], "web-0", None, &[]),
            format!("{BOILERPLATE}10.244.1.7\tweb-0\n")
        );
        let aliases = [
            HostAlias {
                ip: "127.0.0.1".into(),
                hostnames: Some(vec!["foo.local".into(), "bar.local".into()]),
            },
            HostAlias {
                ip: "10.1.2.3".into(),
                hostnames: Some(vec!["foo.remote".into()]),
            },
        ];
        assert_eq!(
            hosts_file(
                &ips,
                "web-0",
                Some("web.default.svc.cluster.local"),
                &aliases
            ),
            format!(
                "{BOILERPLATE}\
                 10.244.1.7\tweb-0.web.default.svc.cluster.local\tweb-0\n\
                 fd00::7\tweb-0.web.default.svc.cluster.local\tweb-0\n\
                 \n\
                 # Entries added by HostAliases.\n\
                 127.0.0.1\tfoo.local\tbar.local\n\
                 10.1.2.3\tfoo.remote\n"
            )
        );
        // No pod IP yet (or host network): the boilerplate alone.
        assert_eq!(hosts_file(&[], "web-0", None, &[]), BOILERPLATE);
    }

    #[test]
    fn hostname_domain_and_kernel_hostname() {
        let plain = pod("web-0", "shop", PodSpec::default());
        assert_eq!(
            pod_hostname(&plain, "cluster.local").unwrap(),
            PodHostname {
                hostname: "web-0".into(),
                domain: None,
                kernel_hostname: "web-0".into()
            }
        );
        let named = pod(
            "web-0",
            "shop",
            PodSpec {
                hostname: Some("db".into()),
                subdomain: Some("backend".into()),
                ..Default::default()
            },
        );
        let names = pod_hostname(&named, "cluster.local").unwrap();
        assert_eq!(names.hostname, "db");
        assert_eq!(
            names.domain.as_deref(),
            Some("backend.shop.svc.cluster.local")
        );
        assert_eq!(names.kernel_hostname, "db");
        let mut fqdn = named.clone();
        fqdn.spec.as_mut().unwrap().set_hostname_as_fqdn = Some(true);
        assert_eq!(
            pod_hostname(&fqdn, "cluster.local")
                .unwrap()
                .kernel_hostname,
            "db.backend.shop.svc.cluster.local"
        );
        let mut too_long = fqdn.clone();
        too_long.spec.as_mut().unwrap().hostname = Some("d".repeat(40));
        let err = pod_hostname(&too_long, "cluster.local").unwrap_err();
        assert!(err.to_string().contains("too long"), "{err}");
        // A long pod name is cut to 63 characters, without a trailing '-' or '.'.
        let long_name = format!("{}-{}", "a".repeat(62), "b".repeat(10));
        let long = pod(&long_name, "shop", PodSpec::default());
        assert_eq!(
            pod_hostname(&long, "cluster.local").unwrap().hostname,
            "a".repeat(62)
        );
        let bad = pod(
            "web-0",
            "shop",
            PodSpec {
                hostname: Some("Not_A_Label".into()),
                ..Default::default()
            },
        );
        assert_eq!(
            pod_hostname(&bad, "cluster.local").unwrap_err().to_string(),
            "invalid pod shop/web-0: spec.hostname \"Not_A_Label\" is not a DNS label"
        );
    }

    #[test]
    fn node_resolv_conf_is_read_as_the_kubelet_reads_it() {
        let conf = ResolvConf::parse(NODE_RESOLV_CONF);
        assert_eq!(conf.nameservers, ["192.168.1.1", "192.168.1.2"]);
        assert_eq!(conf.searches, ["corp.example", "lab.example"]);
        assert_eq!(conf.options, ["edns0", "attempts:3"]);
    }

    #[test]
    fn cluster_first() {
        let web = pod("web-0", "shop", PodSpec::default());
        let dns = pod_dns(&web, &settings(), Some(NODE_RESOLV_CONF));
        assert!(dns.warnings.is_empty());
        assert_eq!(
            dns.config.render(),
            "search shop.svc.cluster.local svc.cluster.local cluster.local corp.example lab.example\n\
             nameserver 10.96.0.10\n\
             options ndots:5\n"
        );
        // A host-network pod with ClusterFirst gets the node's resolver; with
        // ClusterFirstWithHostNet the cluster's.
        let mut host_net = PodSpec {
            host_network: Some(true),
            ..Default::default()
        };
        let dns = pod_dns(
            &pod("h", "shop", host_net.clone()),
            &settings(),
            Some(NODE_RESOLV_CONF),
        );
        assert_eq!(dns.config.nameservers, ["192.168.1.1", "192.168.1.2"]);
        host_net.dns_policy = Some("ClusterFirstWithHostNet".into());
        let dns = pod_dns(
            &pod("h", "shop", host_net),
            &settings(),
            Some(NODE_RESOLV_CONF),
        );
        assert_eq!(dns.config.nameservers, ["10.96.0.10"]);
        // No cluster domain: the node's search list alone.
        let mut no_domain = settings();
        no_domain.cluster_domain.clear();
        let dns = pod_dns(&web, &no_domain, Some(NODE_RESOLV_CONF));
        assert_eq!(dns.config.searches, ["corp.example", "lab.example"]);
    }

    #[test]
    fn cluster_first_without_cluster_dns_falls_back_to_default() {
        let web = pod("web-0", "shop", PodSpec::default());
        let mut no_dns = settings();
        no_dns.cluster_dns.clear();
        let dns = pod_dns(&web, &no_dns, Some(NODE_RESOLV_CONF));
        assert_eq!(dns.warnings.len(), 1);
        assert!(dns.warnings[0].contains("falling back to \"Default\""));
        assert_eq!(dns.config, ResolvConf::parse(NODE_RESOLV_CONF));
    }

    #[test]
    fn default_copies_the_node_resolver() {
        let spec = PodSpec {
            dns_policy: Some("Default".into()),
            ..Default::default()
        };
        let dns = pod_dns(
            &pod("a", "b", spec.clone()),
            &settings(),
            Some(NODE_RESOLV_CONF),
        );
        assert_eq!(
            dns.config.render(),
            "search corp.example lab.example\n\
             nameserver 192.168.1.1\n\
             nameserver 192.168.1.2\n\
             options edns0 attempts:3\n"
        );
        // --resolv-conf="": a local resolver per node IP family.
        let mut no_file = settings();
        no_file.resolv_conf = None;
        no_file.node_ips = vec!["192.168.1.5".parse().unwrap(), "fd00::5".parse().unwrap()];
        let dns = pod_dns(&pod("a", "b", spec), &no_file, None);
        assert_eq!(
            dns.config.render(),
            "search .\nnameserver 127.0.0.1\nnameserver ::1\n"
        );
    }

    #[test]
    fn none_takes_dns_config_alone_and_dns_config_merges_everywhere() {
        let dns_config = PodDNSConfig {
            nameservers: Some(vec!["1.1.1.1".into(), "10.96.0.10".into()]),
            searches: Some(vec!["extra.example".into(), "svc.cluster.local".into()]),
            options: Some(vec![
                PodDNSConfigOption {
                    name: Some("ndots".into()),
                    value: Some("2".into()),
                },
                PodDNSConfigOption {
                    name: Some("edns0".into()),
                    value: None,
                },
            ]),
        };
        let none = PodSpec {
            dns_policy: Some("None".into()),
            dns_config: Some(dns_config.clone()),
            ..Default::default()
        };
        let dns = pod_dns(&pod("a", "shop", none), &settings(), Some(NODE_RESOLV_CONF));
        assert_eq!(
            dns.config.render(),
            "search extra.example svc.cluster.local\n\
             nameserver 1.1.1.1\n\
             nameserver 10.96.0.10\n\
             options ndots:2 edns0\n"
        );
        let cluster = PodSpec {
            dns_config: Some(dns_config),
            ..Default::default()
        };
        let dns = pod_dns(&pod("a", "shop", cluster), &settings(), None);
        assert_eq!(
            dns.config.render(),
            "search shop.svc.cluster.local svc.cluster.local cluster.local extra.example\n\
             nameserver 10.96.0.10\n\
             nameserver 1.1.1.1\n\
             options ndots:2 edns0\n"
        );
    }

    #[test]
    fn limits_as_upstream() {
        let dns_config = PodDNSConfig {
            nameservers: Some((1..=5).map(|i| format!("10.0.0.{i}")).collect()),
            searches: Some(
                (0..40)
                    .map(|i| format!("d{i}.example"))
                    .chain(std::iter::once("x".repeat(254)))
                    .collect(),
            ),
            options: None,
        };
        let spec = PodSpec {
            dns_policy: Some("None".into()),
            dns_config: Some(dns_config),
            ..Default::default()
        };
        let dns = pod_dns(&pod("a", "b", spec), &settings(), None);
        assert_eq!(dns.config.nameservers.len(), 3);
        assert_eq!(dns.config.searches.len(), 32);
        assert_eq!(dns.warnings.len(), 2, "{:?}", dns.warnings);
        let mut long = ResolvConf {
            searches: (0..20)
                .map(|i| format!("{i:02}{}", "y".repeat(150)))
                .collect(),
            ..Default::default()
        };
        let mut warnings = Vec::new();
        fit_limits(&mut long, &mut warnings);
        assert!(long.searches.join(" ").len() <= 2048);
        assert_eq!(long.searches.len(), 13);
    }

    #[test]
    fn pod_files_together() {
        let web = pod(
            "web-0",
            "shop",
            PodSpec {
                subdomain: Some("web".into()),
                ..Default::default()
            },
        );
        let files = PodFiles::for_pod(
            &web,
            &["10.244.1.7".parse().unwrap()],
            &settings(),
            Some(NODE_RESOLV_CONF),
        )
        .unwrap();
        assert!(
            files
                .hosts
                .ends_with("10.244.1.7\tweb-0.web.shop.svc.cluster.local\tweb-0\n")
        );
        assert!(
            files
                .resolv_conf
                .starts_with("search shop.svc.cluster.local ")
        );
        assert_eq!(files.hostname, "web-0\n");
        assert!(files.warnings.is_empty());
    }

    #[test]
    fn host_network_pods_get_the_node_files() {
        let spec = PodSpec {
            host_network: Some(true),
            host_aliases: Some(vec![HostAlias {
                ip: "10.1.2.3".into(),
                hostnames: Some(vec!["foo".into(), "bar".into()]),
            }]),
            ..Default::default()
        };
        let node = NodeFiles {
            hosts: "127.0.0.1\tlocalhost\n192.0.2.10\tnode-1\n".into(),
            hostname: "node-1".into(),
        };
        let files = PodFiles::for_host_network_pod(
            &pod("agent", "kube-system", spec),
            &settings(),
            Some(NODE_RESOLV_CONF),
            &node,
        );
        assert_eq!(
            files.hosts,
            "# Kubernetes-managed hosts file (host network).\n\
             127.0.0.1\tlocalhost\n192.0.2.10\tnode-1\n\
             \n# Entries added by HostAliases.\n10.1.2.3\tfoo\tbar\n"
        );
        assert_eq!(files.hostname, "node-1\n");
        // ClusterFirst is Default for a host-network pod: the node's resolver.
        assert_eq!(
            files.resolv_conf,
            ResolvConf::parse(NODE_RESOLV_CONF).render()
        );
        assert_eq!(node_hosts_file("", &[]), MANAGED_HOSTS_HEADER_HOST_NETWORK);
    }
}
