//! `lab up`: every lab service in one process, each on its default port,
//! against backing services on localhost. One Ctrl-C drains them all; the
//! first lab to fail stops the others, because a half-running lab misleads.

use anyhow::bail;
use clap::Args;

use crate::labs::{Backing, Lab, LabSettings};

#[derive(Args)]
pub struct Up {
    /// Run only these labs (comma-separated); all of them when absent.
    #[arg(long, value_enum, value_delimiter = ',')]
    only: Vec<Lab>,
    #[command(flatten)]
    backing: Backing,
    #[command(flatten)]
    labs: LabSettings,
}

pub async fn run(up: Up) -> anyhow::Result<()> {
    let wanted: Vec<Lab> = Lab::ALL
        .into_iter()
        .filter(|lab| up.only.is_empty() || up.only.contains(lab))
        .collect();
    if wanted.is_empty() {
        bail!("no lab selected");
    }
    let shutdown = lab_core::shutdown::on_signal();
    let tasks = wanted
        .into_iter()
        .map(|lab| {
            let running = lab.run(&up.backing, &up.labs, shutdown.child_token());
            (lab.name(), running)
        })
        .collect();
    lab_core::shutdown::supervise(&shutdown, tasks).await
}
