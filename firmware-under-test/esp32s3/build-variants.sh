#!/usr/bin/env bash
# Build the firmware under test for each version (and the variants scenarios ask for) into
# dist/: bootloader.bin, VERSION.bin, VERSION-selftest-fail.bin. Needs the Espressif Rust
# toolchain (espup install; . ~/export-esp.sh) and espflash (cargo install espflash).
set -euo pipefail
cd "$(dirname "$0")"
mkdir -p dist target
versions=("$@")
[ ${#versions[@]} -eq 0 ] && versions=(1.0.0 2.0.0 3.0.0)
for version in "${versions[@]}"; do
  for variant in "" selftest-fail; do
    printf 'CONFIG_APP_PROJECT_VER="%s"\n' "$version" > target/sdkconfig.version
    export ESP_IDF_SDKCONFIG_DEFAULTS="$PWD/sdkconfig.defaults;$PWD/target/sdkconfig.version"
    name="$version${variant:+-$variant}"
    OTARIG_FW_VERSION="$version" cargo build --release ${variant:+--features $variant}
    elf=target/xtensa-esp32s3-espidf/release/otarig-esp32s3
    espflash save-image --chip esp32s3 --partition-table partitions.csv "$elf" "dist/$name.bin"
    echo "built dist/$name.bin"
  done
done
# The second-stage bootloader esp-idf-sys built with the same sdkconfig (rollback enabled).
find target/xtensa-esp32s3-espidf/release/build -name bootloader.bin -path '*esp-idf-sys*' \
  -newer build.rs | head -n1 | xargs -I{} cp {} dist/bootloader.bin
echo "bootloader: dist/bootloader.bin"
