//! `mizzen pilot`.

#[derive(clap::Args)]
pub struct PilotArgs {}

pub fn run(_args: PilotArgs) -> anyhow::Result<u8> {
    anyhow::bail!("mizzen pilot is not implemented yet")
}
