//! What can be checked of the ESP32-S3 firmware shell on a host without the Xtensa toolchain:
//! its Rust type-checks against declarations of the esp-idf-svc 0.52 / esp-idf-sys 0.37 API
//! it uses (`src/host_idf`), it flashes the simulator's partition table, and it trusts
//! exactly the test keys' public halves. (It is built for the chip on a bench: `just fw-build`.)

use std::path::Path;

use otarig_esp32s3::partition::PartitionTable;
use otarig_server::keys::{fixture_dir, NamedKey};

fn shell() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../firmware-under-test/esp32s3")
}

/// `cargo test` of the shell for the host, warnings denied: the binary type-checks against
/// `src/host_idf`, and the library's unit tests (the shell's bounds on what it reads) run. From
/// the repository root, so neither the shell's `rust-toolchain.toml` (the Xtensa toolchain)
/// nor its `.cargo/config.toml` (the chip target) applies; in a target directory of its own.
#[test]
fn the_firmware_shell_type_checks_against_the_esp_idf_api_it_uses() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let out = std::process::Command::new(env!("CARGO"))
        .current_dir(&root)
        .args(["test", "--quiet", "--manifest-path"])
        .arg(shell().join("Cargo.toml"))
        .arg("--target-dir")
        .arg(root.join("target/fw-host-check"))
        .env("RUSTFLAGS", "-D warnings")
        .env_remove("CARGO_TARGET_DIR")
        .output()
        .expect("running cargo");
    assert!(
        out.status.success(),
        "the firmware shell does not type-check or its tests fail:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_firmware_partition_table_is_the_simulators() {
    let csv = std::fs::read_to_string(shell().join("partitions.csv")).unwrap();
    let fw = PartitionTable::from_csv("partitions.csv", &csv).unwrap();
    assert_eq!(
        fw.to_binary().unwrap(),
        PartitionTable::default_two_ota().to_binary().unwrap()
    );
}

#[test]
fn the_firmware_trusts_the_test_keys_public_halves() {
    for id in ["ed25519-test", "rsa-test"] {
        let key = NamedKey::load(&fixture_dir(), id)
            .unwrap()
            .trusted()
            .unwrap();
        let (file, want) = match &key.key {
            otarig_agent::PublicKey::Ed25519(k) => (format!("{id}.ed25519"), k.to_bytes().to_vec()),
            otarig_agent::PublicKey::Rsa(k) => {
                use rsa::pkcs1::EncodeRsaPublicKey;
                (
                    format!("{id}.rsa.der"),
                    k.to_pkcs1_der().unwrap().as_bytes().to_vec(),
                )
            }
        };
        let got = std::fs::read(shell().join("keys").join(&file)).unwrap();
        assert_eq!(got, want, "{file} is `otarig keys export {id}`");
    }
}

#[test]
fn rollback_is_enabled_in_the_firmware_config() {
    let cfg = std::fs::read_to_string(shell().join("sdkconfig.defaults")).unwrap();
    assert!(cfg
        .lines()
        .any(|l| l.trim() == "CONFIG_BOOTLOADER_APP_ROLLBACK_ENABLE=y"));
    assert!(cfg
        .lines()
        .any(|l| l.trim() == "CONFIG_PARTITION_TABLE_CUSTOM_FILENAME=\"partitions.csv\""));
}
