//! Masquerade for traffic leaving the pod CIDR, written straight to nf_tables over
//! netlink (NETLINK_NETFILTER, one transaction); no `nft` or `iptables` binary is run.
//!
//! Layout, per address family: table `ip skiff-cni` (or `ip6 skiff-cni`), one NAT base
//! chain per network, `masq-<network>`, hooked at postrouting with priority srcnat (100),
//! holding one rule per pod subnet:
//! `ip saddr <subnet> ip daddr != <subnet> ip daddr != 224.0.0.0/4 masquerade`.
//! The chain and its rules are created in one atomic batch, so a chain that exists is
//! complete; ADD only checks for it (one GETCHAIN) on the common path.

use std::net::IpAddr;

use ipnet::IpNet;
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_NETFILTER};

use crate::error::{CniError, CniResult, ErrorCode};

pub const TABLE: &str = "skiff-cni";

const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFNL_MSG_BATCH_BEGIN: u16 = 0x10;
const NFNL_MSG_BATCH_END: u16 = 0x11;
const NFT_MSG_NEWTABLE: u16 = 0;
const NFT_MSG_NEWCHAIN: u16 = 3;
const NFT_MSG_GETCHAIN: u16 = 4;
const NFT_MSG_NEWRULE: u16 = 6;

const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_EXCL: u16 = 0x200;
const NLM_F_CREATE: u16 = 0x400;
const NLM_F_APPEND: u16 = 0x800;
const NLMSG_ERROR: u16 = 0x2;
const NLA_F_NESTED: u16 = 0x8000;

const NFPROTO_IPV4: u8 = 2;
const NFPROTO_IPV6: u8 = 10;
const NF_INET_POST_ROUTING: u32 = 4;
const NF_IP_PRI_NAT_SRC: u32 = 100;
const NF_ACCEPT: u32 = 1;
const NFT_REG_1: u32 = 1;
const NFT_PAYLOAD_NETWORK_HEADER: u32 = 1;
const NFT_CMP_EQ: u32 = 0;
const NFT_CMP_NEQ: u32 = 1;

fn nft_error(what: &str, err: impl std::fmt::Display) -> CniError {
    CniError::new(ErrorCode::Datapath, format!("{what}: {err}"))
}

/// A netlink attribute list under construction.
#[derive(Default)]
struct Attrs(Vec<u8>);

impl Attrs {
    fn raw(mut self, kind: u16, payload: &[u8]) -> Self {
        let len = 4 + payload.len();
        self.0.extend_from_slice(&(len as u16).to_ne_bytes());
        self.0.extend_from_slice(&kind.to_ne_bytes());
        self.0.extend_from_slice(payload);
        while !self.0.len().is_multiple_of(4) {
            self.0.push(0);
        }
        self
    }

    fn string(self, kind: u16, value: &str) -> Self {
        let mut bytes = value.as_bytes().to_vec();
        bytes.push(0);
        self.raw(kind, &bytes)
    }

    /// nf_tables integers are big-endian.
    fn be32(self, kind: u16, value: u32) -> Self {
        self.raw(kind, &value.to_be_bytes())
    }

    fn nested(self, kind: u16, inner: Attrs) -> Self {
        self.raw(kind | NLA_F_NESTED, &inner.0)
    }
}

/// One netlink message: header, nfgenmsg, attributes.
fn message(msg_type: u16, flags: u16, seq: u32, family: u8, res_id: u16, attrs: &Attrs) -> Vec<u8> {
    let len = 16 + 4 + attrs.0.len();
    let mut out = Vec::with_capacity(len);
    out.extend_from_slice(&(len as u32).to_ne_bytes());
    out.extend_from_slice(&msg_type.to_ne_bytes());
    out.extend_from_slice(&flags.to_ne_bytes());
    out.extend_from_slice(&seq.to_ne_bytes());
    out.extend_from_slice(&0u32.to_ne_bytes());
    out.push(family);
    out.push(0); // NFNETLINK_V0
    out.extend_from_slice(&res_id.to_be_bytes());
    out.extend_from_slice(&attrs.0);
    out
}

fn nft_type(msg: u16) -> u16 {
    (NFNL_SUBSYS_NFTABLES << 8) | msg
}

fn chain_name(network: &str) -> String {
    format!("masq-{network}")
}

fn expr(name: &str, data: Option<Attrs>) -> Attrs {
    let e = Attrs::default().string(1, name); // NFTA_EXPR_NAME
    let e = match data {
        Some(d) => e.nested(2, d), // NFTA_EXPR_DATA
        None => e,
    };
    Attrs::default().nested(1, e) // NFTA_LIST_ELEM
}

fn payload_load(offset: u32, len: u32) -> Attrs {
    expr(
        "payload",
        Some(
            Attrs::default()
                .be32(1, NFT_REG_1) // NFTA_PAYLOAD_DREG
                .be32(2, NFT_PAYLOAD_NETWORK_HEADER) // NFTA_PAYLOAD_BASE
                .be32(3, offset) // NFTA_PAYLOAD_OFFSET
                .be32(4, len), // NFTA_PAYLOAD_LEN
        ),
    )
}

fn data_value(bytes: &[u8]) -> Attrs {
    Attrs::default().raw(1, bytes) // NFTA_DATA_VALUE
}

fn bitwise_mask(mask: &[u8]) -> Attrs {
    let zero = vec![0u8; mask.len()];
    expr(
        "bitwise",
        Some(
            Attrs::default()
                .be32(1, NFT_REG_1) // NFTA_BITWISE_SREG
                .be32(2, NFT_REG_1) // NFTA_BITWISE_DREG
                .be32(3, mask.len() as u32) // NFTA_BITWISE_LEN
                .nested(4, data_value(mask)) // NFTA_BITWISE_MASK
                .nested(5, data_value(&zero)), // NFTA_BITWISE_XOR
        ),
    )
}

fn cmp(op: u32, value: &[u8]) -> Attrs {
    expr(
        "cmp",
        Some(
            Attrs::default()
                .be32(1, NFT_REG_1) // NFTA_CMP_SREG
                .be32(2, op) // NFTA_CMP_OP
                .nested(3, data_value(value)), // NFTA_CMP_DATA
        ),
    )
}

fn octets(ip: IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    }
}

/// `<addr field> & mask ==/!= network`, as nft compiles a prefix match.
fn prefix_match(field_offset: u32, net: IpNet, op: u32) -> Vec<Attrs> {
    let len = if net.addr().is_ipv4() { 4 } else { 16 };
    vec![
        payload_load(field_offset, len),
        bitwise_mask(&octets(net.netmask())),
        cmp(op, &octets(net.network())),
    ]
}

/// The expressions of one subnet's masquerade rule.
pub fn rule_expressions(subnet: IpNet) -> Vec<u8> {
    let v4 = subnet.addr().is_ipv4();
    let (saddr, daddr) = if v4 { (12, 16) } else { (8, 24) };
    let multicast: IpNet = if v4 {
        "224.0.0.0/4".parse().expect("literal")
    } else {
        "ff00::/8".parse().expect("literal")
    };
    let mut exprs = Vec::new();
    exprs.extend(prefix_match(saddr, subnet, NFT_CMP_EQ));
    exprs.extend(prefix_match(daddr, subnet, NFT_CMP_NEQ));
    exprs.extend(prefix_match(daddr, multicast, NFT_CMP_NEQ));
    exprs.push(expr("masq", None));
    exprs.into_iter().flat_map(|a| a.0).collect()
}

struct Conn {
    socket: Socket,
    seq: u32,
}

impl Conn {
    fn open() -> CniResult<Conn> {
        let mut socket = Socket::new(NETLINK_NETFILTER)
            .map_err(|e| nft_error("open nftables netlink socket", e))?;
        socket
            .bind_auto()
            .map_err(|e| nft_error("bind nftables netlink socket", e))?;
        socket
            .connect(&SocketAddr::new(0, 0))
            .map_err(|e| nft_error("connect nftables netlink socket", e))?;
        Ok(Conn {
            socket,
            seq: rand::random::<u32>() >> 1,
        })
    }

    fn next_seq(&mut self) -> u32 {
        self.seq = self.seq.wrapping_add(1);
        self.seq
    }

    /// Sends `buf` and waits for the acks of `acked` sequence numbers; returns the first
    /// error's errno, if any. `replies` collects non-ack messages' types.
    fn exchange(&mut self, buf: &[u8], acked: &[u32]) -> CniResult<Result<Vec<u16>, i32>> {
        self.socket
            .send(buf, 0)
            .map_err(|e| nft_error("send to nftables", e))?;
        let mut pending: Vec<u32> = acked.to_vec();
        let mut replies = Vec::new();
        let mut rbuf = vec![0u8; 64 * 1024];
        while !pending.is_empty() {
            let n = self
                .socket
                .recv(&mut &mut rbuf[..], 0)
                .map_err(|e| nft_error("receive from nftables", e))?;
            let mut off = 0;
            while off + 16 <= n {
                let len =
                    u32::from_ne_bytes(rbuf[off..off + 4].try_into().expect("4 bytes")) as usize;
                let msg_type =
                    u16::from_ne_bytes(rbuf[off + 4..off + 6].try_into().expect("2 bytes"));
                let seq = u32::from_ne_bytes(rbuf[off + 8..off + 12].try_into().expect("4 bytes"));
                if len < 16 || off + len > n {
                    break;
                }
                if msg_type == NLMSG_ERROR && len >= 20 {
                    let code =
                        i32::from_ne_bytes(rbuf[off + 16..off + 20].try_into().expect("4 bytes"));
                    pending.retain(|s| *s != seq);
                    if code != 0 {
                        return Ok(Err(-code));
                    }
                } else {
                    replies.push(msg_type);
                }
                off += (len + 3) & !3;
            }
        }
        Ok(Ok(replies))
    }

    fn chain_exists(&mut self, family: u8, chain: &str) -> CniResult<bool> {
        let seq = self.next_seq();
        let attrs = Attrs::default().string(1, TABLE).string(3, chain);
        let msg = message(
            nft_type(NFT_MSG_GETCHAIN),
            NLM_F_REQUEST | NLM_F_ACK,
            seq,
            family,
            0,
            &attrs,
        );
        match self.exchange(&msg, &[seq])? {
            Ok(_) => Ok(true),
            Err(errno) if errno == libc::ENOENT => Ok(false),
            Err(errno) => Err(nft_error(
                &format!("look up nftables chain {TABLE}/{chain}"),
                std::io::Error::from_raw_os_error(errno),
            )),
        }
    }

    /// Creates table (if needed), chain and rules in one transaction.
    fn create_chain(&mut self, family: u8, chain: &str, subnets: &[IpNet]) -> CniResult<()> {
        let mut buf = Vec::new();
        let mut acked = Vec::new();
        let res_id = NFNL_SUBSYS_NFTABLES;
        let begin = self.next_seq();
        buf.extend(message(
            NFNL_MSG_BATCH_BEGIN,
            NLM_F_REQUEST,
            begin,
            0,
            res_id,
            &Attrs::default(),
        ));

        let seq = self.next_seq();
        acked.push(seq);
        buf.extend(message(
            nft_type(NFT_MSG_NEWTABLE),
            NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE,
            seq,
            family,
            0,
            &Attrs::default().string(1, TABLE),
        ));

        let seq = self.next_seq();
        acked.push(seq);
        let hook = Attrs::default()
            .be32(1, NF_INET_POST_ROUTING) // NFTA_HOOK_HOOKNUM
            .be32(2, NF_IP_PRI_NAT_SRC); // NFTA_HOOK_PRIORITY
        let chain_attrs = Attrs::default()
            .string(1, TABLE) // NFTA_CHAIN_TABLE
            .string(3, chain) // NFTA_CHAIN_NAME
            .nested(4, hook) // NFTA_CHAIN_HOOK
            .be32(5, NF_ACCEPT) // NFTA_CHAIN_POLICY
            .string(7, "nat"); // NFTA_CHAIN_TYPE
        // EXCL: of two plugins racing to create the chain, one transaction wins whole and
        // the other aborts whole (EEXIST), so rules are never doubled.
        buf.extend(message(
            nft_type(NFT_MSG_NEWCHAIN),
            NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL,
            seq,
            family,
            0,
            &chain_attrs,
        ));

        for subnet in subnets {
            let seq = self.next_seq();
            acked.push(seq);
            let rule = Attrs::default()
                .string(1, TABLE) // NFTA_RULE_TABLE
                .string(2, chain) // NFTA_RULE_CHAIN
                .raw(4 | NLA_F_NESTED, &rule_expressions(*subnet)); // NFTA_RULE_EXPRESSIONS
            buf.extend(message(
                nft_type(NFT_MSG_NEWRULE),
                NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_APPEND,
                seq,
                family,
                0,
                &rule,
            ));
        }
        let end = self.next_seq();
        buf.extend(message(
            NFNL_MSG_BATCH_END,
            NLM_F_REQUEST,
            end,
            0,
            res_id,
            &Attrs::default(),
        ));
        match self.exchange(&buf, &acked)? {
            Ok(_) => Ok(()),
            Err(errno) if errno == libc::EEXIST => Ok(()),
            Err(errno) => Err(nft_error(
                &format!("create nftables chain {TABLE}/{chain}"),
                std::io::Error::from_raw_os_error(errno),
            )),
        }
    }
}

/// Makes sure traffic from `subnets` to anywhere outside them (and outside multicast) is
/// masqueraded, in the plugin's own network namespace.
pub fn ensure_masquerade(network: &str, subnets: &[IpNet]) -> CniResult<()> {
    let chain = chain_name(network);
    let mut conn = Conn::open()?;
    for (family, v4) in [(NFPROTO_IPV4, true), (NFPROTO_IPV6, false)] {
        let mut family_subnets: Vec<IpNet> = subnets
            .iter()
            .filter(|s| s.addr().is_ipv4() == v4)
            .map(|s| s.trunc())
            .collect();
        family_subnets.dedup();
        if family_subnets.is_empty() || conn.chain_exists(family, &chain)? {
            continue;
        }
        conn.create_chain(family, &chain, &family_subnets)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attributes_are_padded_and_nested() {
        let a = Attrs::default().string(1, "ab");
        // len 4 + "ab\0" = 7, padded to 8.
        assert_eq!(a.0, vec![7, 0, 1, 0, b'a', b'b', 0, 0]);
        let n = Attrs::default().nested(4, Attrs::default().be32(1, 4));
        assert_eq!(&n.0[..4], &[12, 0, 4, 0x80]);
        assert_eq!(&n.0[8..12], &[0, 0, 0, 4]);
    }

    #[test]
    fn rule_matches_subnet_prefix() {
        let exprs = rule_expressions("10.1.0.0/16".parse().unwrap());
        let text = String::from_utf8_lossy(&exprs);
        assert!(text.contains("payload") && text.contains("bitwise") && text.contains("masq"));
        // The mask and network of 10.1.0.0/16 appear as data values.
        assert!(exprs.windows(4).any(|w| w == [255, 255, 0, 0]));
        assert!(exprs.windows(4).any(|w| w == [10, 1, 0, 0]));
    }
}
