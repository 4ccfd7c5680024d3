//! `otarig image`: ESP-IDF app images for simulated firmware.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::ValueEnum;
use otarig_esp32s3::appimage::{
    self, AppSpec, Behaviour, BootBehaviour, NetworkBehaviour, SelfTest,
};

#[derive(clap::Subcommand)]
pub enum Cmd {
    /// Build an app image.
    Build {
        #[arg(long)]
        version: String,
        #[arg(long, default_value = "otarig-demo")]
        project: String,
        #[arg(long, default_value_t = 0)]
        secure_version: u32,
        /// Size in bytes (within 16 bytes), from 1024 to 16 MiB. Images of about 70,000 bytes
        /// and more have an IROM segment, laid out at the second 64 KiB page as elf2image does.
        #[arg(long, default_value_t = 256 * 1024)]
        size: u32,
        #[arg(long, value_enum, default_value = "pass")]
        self_test: SelfTestArg,
        #[arg(long)]
        crash_on_boot: bool,
        #[arg(long)]
        no_network: bool,
        #[arg(short, long)]
        out: PathBuf,
    },
    /// Verify an image as the bootloader would and print its descriptor.
    Info { file: PathBuf },
}

#[derive(Clone, Copy, ValueEnum)]
pub enum SelfTestArg {
    Pass,
    Fail,
}

pub fn run(cmd: Cmd) -> anyhow::Result<ExitCode> {
    match cmd {
        Cmd::Build {
            version,
            project,
            secure_version,
            size,
            self_test,
            crash_on_boot,
            no_network,
            out,
        } => {
            let behaviour = Behaviour {
                self_test: match self_test {
                    SelfTestArg::Pass => SelfTest::Pass,
                    SelfTestArg::Fail => SelfTest::Fail,
                },
                boot: if crash_on_boot {
                    BootBehaviour::Crash
                } else {
                    BootBehaviour::Ok
                },
                network: if no_network {
                    NetworkBehaviour::Never
                } else {
                    NetworkBehaviour::Ok
                },
            };
            appimage::check_size(size).map_err(|e| {
                anyhow::anyhow!("--size {size}: {e}; an app image needs room for its header, descriptor and segments")
            })?;
            let bytes = appimage::build(&AppSpec {
                project,
                version,
                secure_version,
                size,
                behaviour,
                chip_id: otarig_agent::image::CHIP_ID_ESP32S3,
            });
            super::write(&out, &bytes)?;
            println!(
                "wrote {} ({} bytes, sha256 {})",
                out.display(),
                bytes.len(),
                hex::encode(otarig_server::store::sha256(&bytes))
            );
        }
        Cmd::Info { file } => {
            let bytes = super::read(&file)?;
            let info = super::verify_image(&bytes).with_context(|| {
                format!("{} is not a bootable ESP32-S3 app image", file.display())
            })?;
            match &info.desc {
                Some(d) => {
                    println!("version         {}", d.version);
                    println!("project         {}", d.project_name);
                    println!("secure_version  {}", d.secure_version);
                }
                None => println!("app descriptor  none (no magic 0xABCD5432 at offset 32)"),
            }
            println!("segments        {}", info.segment_count);
            println!("length          {} bytes", info.len);
            println!("sha256          {}", hex::encode(info.sha256));
        }
    }
    Ok(ExitCode::SUCCESS)
}
