//! Running the external tools (iptables-restore, nft, ip) with optional stdin.

use std::io::Write;
use std::process::{Command, Stdio};

use crate::error::CaptureError;

/// Output of a finished command.
pub(crate) struct Output {
    pub success: bool,
    pub stdout: String,
}

fn describe(program: &str, args: &[&str]) -> String {
    std::iter::once(program)
        .chain(args.iter().copied())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Run `program args`, feeding `stdin` if given. Never fails on a non-zero exit; callers decide.
pub(crate) fn run_raw(
    program: &str,
    args: &[&str],
    stdin: Option<&str>,
) -> Result<(Output, String), CaptureError> {
    let mut cmd = Command::new(program);
    cmd.args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().map_err(|source| CaptureError::Spawn {
        command: describe(program, args),
        source,
    })?;
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        // Dropping the pipe at the end of this block closes it, so the tool sees EOF.
        pipe.write_all(input.as_bytes())
            .map_err(|source| CaptureError::Spawn {
                command: describe(program, args),
                source,
            })?;
    }
    let out = child
        .wait_with_output()
        .map_err(|source| CaptureError::Spawn {
            command: describe(program, args),
            source,
        })?;
    let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
    Ok((
        Output {
            success: out.status.success(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        },
        stderr,
    ))
}

/// Run and require success.
pub(crate) fn run(
    program: &str,
    args: &[&str],
    stdin: Option<&str>,
) -> Result<String, CaptureError> {
    let (out, stderr) = run_raw(program, args, stdin)?;
    if out.success {
        Ok(out.stdout)
    } else {
        Err(CaptureError::Command {
            command: describe(program, args),
            status: "non-zero exit".to_string(),
            stderr,
        })
    }
}
