//! `skiff-agent`: the node agent.

fn main() {
    println!("skiff-agent: not yet wired");
}
