//! `agentctl`: inspects the node's pods and images straight from the machine, so that it
//! works while the agent is down. The commands live in `skiff_agent::agentctl`.

fn main() -> std::process::ExitCode {
    skiff_agent::agentctl::main()
}
