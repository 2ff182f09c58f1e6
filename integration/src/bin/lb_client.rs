//! The load balancer tests' client. It moves itself into `--cgroup` (the socket hooks
//! translate only sockets of processes below the cgroup they are attached to), enters the
//! network namespace `--netns`, then talks to `--to` and prints one line per exchange:
//! `peer=<address the socket reports> reply=<what the backend answered>`, or `error=<...>`.
//!
//! - `tcp --count N`: N new connections, one request each;
//! - `udp --count N`: N datagrams, each from a new unconnected socket (`sendto`/`recvfrom`);
//! - `udp-flow --count N`: N datagrams from one unconnected socket;
//! - `hold`: one connection kept open; a request each time a line arrives on stdin;
//! - `udp-hold`: one unconnected UDP socket; a datagram each time a line arrives on stdin.

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};

#[derive(Parser)]
struct Args {
    /// A cgroup v2 directory to join first.
    #[arg(long)]
    cgroup: Option<PathBuf>,
    /// A network namespace (a bind-mounted nsfs file) to enter before any socket exists.
    #[arg(long)]
    netns: Option<PathBuf>,
    /// Where to connect or send.
    #[arg(long)]
    to: SocketAddr,
    #[command(subcommand)]
    mode: Mode,
}

#[derive(Subcommand)]
enum Mode {
    Tcp {
        #[arg(long, default_value_t = 1)]
        count: usize,
    },
    Udp {
        #[arg(long, default_value_t = 1)]
        count: usize,
    },
    UdpFlow {
        #[arg(long, default_value_t = 1)]
        count: usize,
    },
    Hold,
    UdpHold,
}

const TIMEOUT: Duration = Duration::from_secs(5);

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Some(cgroup) = &args.cgroup {
        std::fs::write(cgroup.join("cgroup.procs"), std::process::id().to_string())
            .map_err(|error| anyhow::anyhow!("join cgroup {}: {error}", cgroup.display()))?;
    }
    if let Some(netns) = &args.netns {
        let file = std::fs::File::open(netns)
            .map_err(|error| anyhow::anyhow!("open netns {}: {error}", netns.display()))?;
        nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET)
            .map_err(|error| anyhow::anyhow!("enter netns {}: {error}", netns.display()))?;
    }
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    match args.mode {
        Mode::Tcp { count } => {
            for _ in 0..count {
                writeln!(out, "{}", line(tcp_exchange(args.to)))?;
            }
        }
        Mode::Udp { count } => {
            for _ in 0..count {
                writeln!(out, "{}", line(udp_exchange(args.to)))?;
            }
        }
        Mode::UdpFlow { count } => {
            let socket = UdpSocket::bind("0.0.0.0:0")?;
            socket.set_read_timeout(Some(TIMEOUT))?;
            for _ in 0..count {
                writeln!(out, "{}", line(udp_send_receive(&socket, args.to)))?;
            }
        }
        Mode::UdpHold => {
            let socket = UdpSocket::bind("0.0.0.0:0")?;
            socket.set_read_timeout(Some(TIMEOUT))?;
            writeln!(out, "bound")?;
            out.flush()?;
            for request in std::io::stdin().lock().lines() {
                request?;
                writeln!(out, "{}", line(udp_send_receive(&socket, args.to)))?;
                out.flush()?;
            }
        }
        Mode::Hold => {
            let stream = TcpStream::connect_timeout(&args.to, TIMEOUT)?;
            stream.set_read_timeout(Some(TIMEOUT))?;
            let peer = stream.peer_addr()?;
            let mut reader = BufReader::new(stream.try_clone()?);
            let mut writer = stream;
            writeln!(out, "connected peer={peer}")?;
            out.flush()?;
            for request in std::io::stdin().lock().lines() {
                let request = request?;
                let result = writer
                    .write_all(format!("{request}\n").as_bytes())
                    .and_then(|()| {
                        let mut reply = String::new();
                        reader.read_line(&mut reply).map(|_| reply)
                    });
                match result {
                    Ok(reply) if !reply.is_empty() => {
                        writeln!(out, "peer={peer} reply={}", reply.trim())?
                    }
                    Ok(_) => writeln!(out, "error=closed")?,
                    Err(error) => writeln!(out, "error={error}")?,
                }
                out.flush()?;
            }
        }
    }
    Ok(())
}

fn line(result: std::io::Result<(SocketAddr, String)>) -> String {
    match result {
        Ok((peer, reply)) => format!("peer={peer} reply={}", reply.trim()),
        Err(error) => format!("error={error}"),
    }
}

fn tcp_exchange(to: SocketAddr) -> std::io::Result<(SocketAddr, String)> {
    let mut stream = TcpStream::connect_timeout(&to, TIMEOUT)?;
    stream.set_read_timeout(Some(TIMEOUT))?;
    let peer = stream.peer_addr()?;
    stream.write_all(b"hello\n")?;
    stream.shutdown(std::net::Shutdown::Write)?;
    let mut reply = String::new();
    stream.read_to_string(&mut reply)?;
    Ok((peer, reply))
}

fn udp_exchange(to: SocketAddr) -> std::io::Result<(SocketAddr, String)> {
    let socket = UdpSocket::bind("0.0.0.0:0")?;
    socket.set_read_timeout(Some(TIMEOUT))?;
    udp_send_receive(&socket, to)
}

fn udp_send_receive(socket: &UdpSocket, to: SocketAddr) -> std::io::Result<(SocketAddr, String)> {
    socket.send_to(b"hello\n", to)?;
    let mut buffer = [0; 256];
    let (length, from) = socket.recv_from(&mut buffer)?;
    Ok((
        from,
        String::from_utf8_lossy(&buffer[..length]).into_owned(),
    ))
}
