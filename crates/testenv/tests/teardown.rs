//! `scripts/testenv down` stops every process `up` started. This starts a second,
//! private environment so the shared one is left alone.

use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result};
use testenv::script_path;

fn pid_alive(pid: u32) -> bool {
    // A zombie still has a /proc entry; it is not running.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit_once(')')
            .map(|(_, rest)| rest.trim_start().starts_with('Z'))
            .unwrap_or(false),
        Err(_) => false,
    }
}

fn pids_in(dir: &Path) -> Result<Vec<u32>> {
    let mut pids = Vec::new();
    for entry in std::fs::read_dir(dir.join("pids")).context("reading pid dir")? {
        let text = std::fs::read_to_string(entry?.path())?;
        pids.push(text.trim().parse().context("pid file holds a number")?);
    }
    Ok(pids)
}

#[test]
fn down_leaves_no_process_running() -> Result<()> {
    let dir = tempfile_dir()?;
    let status = Command::new("bash")
        .arg(script_path())
        .args(["up", "--with", "consul,eureka", "--dir"])
        .arg(&dir)
        .stdout(std::process::Stdio::null())
        .status()?;
    assert!(status.success(), "testenv up failed");
    let pids = pids_in(&dir)?;
    assert!(
        pids.len() >= 5,
        "etcd, apiserver, controller-manager, consul, eureka: {pids:?}"
    );
    assert!(pids.iter().all(|p| pid_alive(*p)), "all started: {pids:?}");

    let status = Command::new("bash")
        .arg(script_path())
        .arg("down")
        .arg(&dir)
        .status()?;
    assert!(status.success(), "testenv down failed");
    let alive: Vec<u32> = pids.into_iter().filter(|p| pid_alive(*p)).collect();
    assert!(alive.is_empty(), "still running after down: {alive:?}");
    Ok(())
}

fn tempfile_dir() -> Result<std::path::PathBuf> {
    let dir = std::env::temp_dir().join(testenv::unique_name("rc-teardown"));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}
