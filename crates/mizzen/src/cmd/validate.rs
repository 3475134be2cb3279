//! `mizzen validate`.

#[derive(clap::Args)]
pub struct ValidateArgs {}

pub fn run(_args: ValidateArgs) -> anyhow::Result<u8> {
    anyhow::bail!("mizzen validate is not implemented yet")
}
