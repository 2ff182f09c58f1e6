//! `agentctl`: inspects the node's datapath and pods.

fn main() {
    println!("agentctl: not yet wired");
}
