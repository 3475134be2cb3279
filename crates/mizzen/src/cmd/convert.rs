//! `mizzen convert`.

#[derive(clap::Args)]
pub struct ConvertArgs {}

pub fn run(_args: ConvertArgs) -> anyhow::Result<u8> {
    anyhow::bail!("mizzen convert is not implemented yet")
}
