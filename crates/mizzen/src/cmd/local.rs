//! `mizzen local`.

#[derive(clap::Args)]
pub struct LocalArgs {}

pub fn run(_args: LocalArgs) -> anyhow::Result<u8> {
    anyhow::bail!("mizzen local is not implemented yet")
}
